"""The few lines an attack run prints (and logs) at its end, in words a first-time user reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from uap_lightning.attacks.threat import ThreatModel
from uap_lightning.baselines import MARGIN
from uap_lightning.threads import ThreadChoice, thread_reason

# What to try instead of each engine: a faster one, never the slow DeepFool engines.
_OTHER_ENGINES = {
    "deepfool_uap": "a faster engine (attack=sgd_uap, or attack=gd_uap attack.prior=none, which needs no data)",
    "deepfool_uap_batched": "a faster engine (attack=sgd_uap, or attack=gd_uap attack.prior=none, which needs no data)",
    "sgd_uap": "another fast engine (attack=gd_uap attack.prior=none, which needs no data)",
    "gd_uap": "another fast engine (attack=sgd_uap)",
}
_NORM_KEYS = {"inf": "norm_linf", "2": "norm_l2"}  # the norms metrics.json records, by p
BUDGET_FULL = 0.9  # share of ε above which v counts as using its whole budget


def victim_name(m: Dict[str, Any]) -> str:
    """The victim as a person names it: the architecture (``model.arch``, with the preset that
    builds it) when the model config has one, else the preset's name."""
    arch = (m.get("model_settings") or {}).get("model.arch")
    return f"{arch} (model={m['model']})" if arch else str(m["model"])


def budget_used(m: Dict[str, Any]) -> Optional[float]:
    """The share of ε that v's ℓp norm used (p of the run), or None for a norm metrics.json does not record."""
    key = _NORM_KEYS.get(str(m["p"]))
    return None if key is None or not m["eps"] > 0 else m[key] / m["eps"]


def _norm_text(value: float) -> str:
    """A norm in 0–255 units, short: two significant digits under 1, else one decimal at most."""
    return f"{value:.2g}" if value < 1 else f"{round(value, 1):g}"


def _budget_text(m: Dict[str, Any], symbol: str) -> str:
    used = budget_used(m)
    if used is None:
        return ""
    return f"v used {symbol} {_norm_text(m[_NORM_KEYS[str(m['p'])]])} of ε={m['eps']:g} ({used:.0%}); "


def weak_result_advice(m: Dict[str, Any]) -> str:
    """What to say when a perturbation does not beat the random baselines of metrics ``m``: each
    baseline by what it is, how much of ε v used, and what helps, in order: the units when ε is
    under one level, more passes when the attack stopped on attack.max_passes, a larger X, a
    faster engine, and a larger ε only when v used its budget."""
    threat = ThreatModel.parse(m["eps"], m["p"])
    used = budget_used(m)
    fixes = []
    if threat.below_one_level:
        fixes.append(threat.unit_advice())
    if not m["converged"] and not m.get("interrupted"):
        fixes.append(
            f"more passes (attack.max_passes={max(10, 2 * int(m['passes']))}; it stopped after "
            f"{m['passes']} without reaching 1−δ={1 - m['delta']:.2f} on X)"
        )
    fixes.append(f"a larger X (data.attack_images={2 * int(m['attack_images'])})")
    fixes.append(_OTHER_ENGINES.get(m["method"], _OTHER_ENGINES["deepfool_uap"]))
    if used is not None and used >= BUDGET_FULL and not threat.below_one_level:
        fixes.append(f"a larger ε if the threat model allows (attack.eps={m['eps'] * 1.5:g})")
    return (
        f"the fooling rate {m['fooling_rate']:.3f} does not beat random noise by {MARGIN} (random {threat.symbol} "
        f"noise of norm ε={m['eps']:g}: {m['random_fooling_rate']:.3f}; a random direction with v's ℓ2 norm: "
        f"{m['random_same_l2_fooling_rate']:.3f}); {_budget_text(m, threat.symbol)}try, in order: " + "; ".join(fixes)
    )


def chance_threshold(num_classes: int) -> float:
    """The clean accuracy at or below which a victim of ``num_classes`` classes is near chance:
    twice chance, or halfway from chance to 1 for few classes, whichever is lower."""
    chance = 1.0 / num_classes
    return min(2.0 * chance, (1.0 + chance) / 2.0)


def near_chance_warning(m: Dict[str, Any]) -> Optional[str]:
    """A warning when the victim's clean accuracy in ``m`` is near chance (fooling rates of such a
    victim mean little), naming the ways to a trained victim; None otherwise."""
    classes = m.get("num_classes")
    if not classes or m["clean_accuracy"] > chance_threshold(int(classes)):
        return None
    return (
        f"the victim is near chance: clean accuracy {m['clean_accuracy']:.4f} on {classes} classes (chance "
        f"{1 / classes:.4f}), so its fooling rates mean little (an untrained network's predictions flip under any "
        "noise); attack a trained victim: model.pretrained=true (ImageNet weights), model.checkpoint=PATH (your "
        "weights), or train longer (trainer.max_epochs)"
    )


def result_warnings(m: Dict[str, Any]) -> List[str]:
    """The warnings an attack run's metrics ``m`` call for: a victim near chance, a result that
    does not beat random noise."""
    found = [near_chance_warning(m)]
    if not m["beats_random"]:
        found.append(weak_result_advice(m))
    return [text for text in found if text]


def threads_text(m: Dict[str, Any]) -> str:
    """`` on 2 threads (2 cores free)``: the threads a run's metrics ``m`` record and why (metrics.json's
    ``threads_reason``, else the reason this process chose them for); empty where none are recorded."""
    if m.get("threads") is None:
        return ""
    count = int(m["threads"])
    reason = m.get("threads_reason") or thread_reason(count)
    return (
        f" on {ThreadChoice(count, reason).describe() if reason else f'{count} thread' + ('s' if count != 1 else '')}"
    )


def attack_summary(m: Dict[str, Any], output_dir: Path) -> List[str]:
    """The summary lines of an attack run's metrics ``m`` (metrics.json's keys); the warnings are
    :func:`result_warnings`."""
    p = ThreatModel.parse(m["eps"], m["p"]).symbol
    stopped = (
        "interrupted"
        if m.get("interrupted")
        else (f"{'reached' if m['converged'] else 'did not reach'} 1−δ={1 - m['delta']:.2f} on X")
    )
    strongest = max(m["random_fooling_rate"], m["random_same_l2_fooling_rate"])
    ratio = f"{m['fooling_rate'] / strongest:.1f}× the stronger" if strongest > 0 else "random noise fools nothing"
    lines = [
        f"victim   {victim_name(m)} on {m['data']} ({m['victim_source']}): accuracy {m['victim_accuracy']:.4f}",
        f"attack   {m.get('engine', m['method'])} {p} ε={m['eps']:g}: "
        f"{m['passes']} pass{'es' if m['passes'] != 1 else ''} in "
        f"{m['attack_seconds']:.1f} s{threads_text(m)}, "
        f"kept pass {m['best_pass']} ({stopped})",
        f"fooling  {m['fooling_rate']:.4f} on {m['eval_images']} eval images ({m['fooling_rate_attack_set']:.4f} on X)",
        f"random   {m['random_fooling_rate']:.4f} for random {p} noise of norm ε, "
        f"{m['random_same_l2_fooling_rate']:.4f} "
        f"for a random direction with v's ℓ2 norm (means of {m['random_draws']} draws): {ratio}",
        f"accuracy {m['clean_accuracy']:.4f} clean -> {m['perturbed_accuracy']:.4f} perturbed",
    ]
    if m.get("ensemble"):
        lines.append(
            "members  "
            + ", ".join(
                f"{name} {member['fooling_rate']:.4f} ({member['input_size']} px)"
                for name, member in m["ensemble"].items()
            )
            + " fooled on the eval images, each alone; the fooling above is the ensemble's"
        )
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
