"""The few lines an attack run prints (and logs) at its end, in words a first-time user reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from uap_lightning.attacks.threat import ThreatModel
from uap_lightning.baselines import MARGIN



def weak_result_advice(m: Dict[str, Any]) -> str:
    """What to try when a perturbation does not beat random noise."""
    strongest = max(m["random_fooling_rate"], m["random_same_l2_fooling_rate"])
    larger = f"a larger ε (attack.eps={m['eps'] * 1.5:g}), " if strongest < 0.5 else ""  # not where noise already fools
    return (
        f"the fooling rate {m['fooling_rate']:.3f} does not beat random noise of the same norm "
        f"({strongest:.3f}) by {MARGIN}: try {larger}more passes (attack.max_passes={2 * int(m['passes']) or 10}) "
        f"or another engine (attack={'deepfool_uap' if m['method'] == 'sgd_uap' else 'sgd_uap'})"
    )


def attack_summary(m: Dict[str, Any], output_dir: Path) -> List[str]:
    """The summary lines of an attack run's metrics ``m`` (metrics.json's keys); a weak result's
    warning is :func:`weak_result_advice`."""
    p = ThreatModel.parse(m["eps"], m["p"]).symbol
    stopped = "interrupted" if m.get("interrupted") else (
        f"{'reached' if m['converged'] else 'did not reach'} 1−δ={1 - m['delta']:.2f} on X"
    )
    strongest = max(m["random_fooling_rate"], m["random_same_l2_fooling_rate"])
    ratio = f"{m['fooling_rate'] / strongest:.1f}× the stronger" if strongest > 0 else "random noise fools nothing"
    lines = [
        f"victim   {m['model']} on {m['data']} ({m['victim_source']}): accuracy {m['victim_accuracy']:.4f}",
        f"attack   {m['method']} {p} ε={m['eps']:g}: {m['passes']} pass{'es' if m['passes'] != 1 else ''} in "
        f"{m['attack_seconds']:.1f} s, "
        f"kept pass {m['best_pass']} ({stopped})",
        f"fooling  {m['fooling_rate']:.4f} on {m['eval_images']} eval images ({m['fooling_rate_attack_set']:.4f} on X)",
        f"random   {m['random_fooling_rate']:.4f} for random {p} noise of norm ε, {m['random_same_l2_fooling_rate']:.4f} "
        f"for a random direction of the same ℓ2 norm (means of {m['random_draws']} draws): {ratio}",
        f"accuracy {m['clean_accuracy']:.4f} clean -> {m['perturbed_accuracy']:.4f} perturbed",
    ]
    if "targeted_success_rate" in m:
        lines.append(
            f"target   {m['targeted_success_rate']:.4f} of eval images sent to class {m['target_class']} "
            f"({m['targeted_success_rate_attack_set']:.4f} on X; the attack stops on this rate)"
        )
    if m.get("dominant_label_name") is not None:
        lines.append(f"labels   {m['dominant_label_share']:.0%} of fooled images go to '{m['dominant_label_name']}'")
    lines += [
        f"norm     ℓ2 {m['norm_l2']:.1f}, ℓ∞ {m['norm_linf']:.1f} (0–255 units)",
        f"files    {output_dir.resolve()}",
    ]
    return lines
