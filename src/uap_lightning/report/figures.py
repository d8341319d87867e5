"""The figures an attack run writes: curve, perturbation, examples and dominant labels.

Pure functions, tensors and lists in, a matplotlib ``Figure`` out (only :func:`save_figure`
touches files: a PNG at 200 dpi and a PDF of every figure). Images are N×C×H×W float tensors in
[0,1]; a perturbation ``v`` is C×H×W in [0,1] scale; ε and every norm shown are in 0–255 pixel
units.

Sizes (width × height in inches → pixels at 100 dpi, as TensorBoard shows them; the PNG files
have twice as many pixels each way):

- :func:`curve_figure`: 6.4 × 4.6 → 640 × 460 (its legend below the axes); :func:`labels_figure`: 6.4 × 4.0 → 640 × 400;
- :func:`perturbation_figure`: (2.5·panels + 1.0) × 3.0, panels = C (+1 RGB panel when C = 3):
  1 channel → 350 × 300, 3 channels → 1100 × 300;
- :func:`examples_figure`: max(4.0, 1.8·count + 0.5) × 4.5: 8 images → 1490 × 450.
"""

from __future__ import annotations

import io
import math
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator, NullLocator, PercentFormatter
from torch import Tensor

from uap_lightning.atomic import atomic_write_bytes
from uap_lightning.attacks.threat import ThreatModel
from uap_lightning.metrics import norm_255
from uap_lightning.progress import phase
from uap_lightning.report.colour_scale import perturbation_scale
from uap_lightning.units import to_pixel_units

DPI = 100  # of the figures as drawn (TensorBoard shows them at this resolution)
SAVED_DPI = 200  # of the PNG files
CURVE_SIZE = (6.4, 4.6)
LABELS_SIZE = (6.4, 4.0)
PANEL_WIDTH = 2.5  # inches per perturbation panel
COLORBAR_WIDTH = 1.0
PERTURBATION_HEIGHT = 3.0
EXAMPLE_WIDTH = 1.8  # inches per example column
EXAMPLES_MARGIN = 0.5  # room for the row labels
EXAMPLES_MIN_WIDTH = 4.0
EXAMPLES_HEIGHT = 4.5
MAX_BARS = 30
LEGEND_CHARS_PER_INCH = 18  # about the 7-pt characters of a legend entry per inch
LEGEND_HANDLE_CHARS = 6  # the room of an entry's colour patch and gaps, in characters
MIN_BAR_SLOTS = 5  # the bar chart is at least this many bars wide, so that a single bar stays a bar
TITLE_CHARS = 64  # about the 12-pt characters of a title that fit across the bar chart
TICK_CHARS = 70  # about the characters of 8-pt tick labels that fit across the bar chart unrotated

# of a perturbed prediction's label
_CHANGE_COLOURS = {"fooled": "red", "changed": "tab:orange", "corrected": "tab:blue"}
_CHANGE_TEXTS = {
    "fooled": "red: fooled, a correct prediction changed to a wrong label",
    "changed": "orange: changed, but it was already wrong",
    "corrected": "blue: the prediction changed to the true label",
}
_RANDOM_STYLES = ("--", (0, (6, 2, 1, 2)), (0, (2, 2)), (0, (8, 3)))
_RANDOM_GREYS = ("0.45", "0.6", "0.3", "0.7")


@phase("drawing the curve figure")
def curve_figure(
    history: Sequence[Mapping[str, Any]],
    best_pass: Optional[int],
    random_rates: Optional[Mapping[str, float]] = None,
    title: str = "universal perturbation",
) -> Figure:
    """Fooling rate on X and on the eval set, and clean and perturbed accuracy, per pass (6.4×4.6 in).

    ``history``: one dict per pass with ``pass`` (1-based), ``fooling_rate`` (eval set),
    ``fooling_rate_attack_set`` (X) or, targeted, ``targeted_success_rate_attack_set`` (X) and
    ``targeted_success_rate`` (eval), ``perturbed_accuracy`` and optionally ``clean_accuracy``
    (drawn dotted). ``best_pass``: the kept pass, marked on the X curve (None: no mark).
    ``random_rates``: name → fooling rate of a random baseline, drawn as grey dashed lines.
    ``title`` names the attack (method, norm, ε); "per pass" is added.
    """
    fig = _new_figure(CURVE_SIZE)
    ax = fig.add_subplot()
    passes = [int(record["pass"]) for record in history]
    targeted = bool(history) and "targeted_success_rate_attack_set" in history[0]
    x_key, x_label = (
        ("targeted_success_rate_attack_set", "targeted success on X")
        if targeted
        else ("fooling_rate_attack_set", "fooling rate on X")
    )
    on_x = [float(record[x_key]) for record in history]
    ax.plot(passes, on_x, "o-", color="tab:red", label=x_label)
    if targeted:
        ax.plot(
            passes,
            [float(r["targeted_success_rate"]) for r in history],
            "D-",
            color="tab:purple",
            label="targeted success (eval)",
        )
    ax.plot(passes, [float(r["fooling_rate"]) for r in history], "s-", color="tab:blue", label="fooling rate (eval)")
    ax.plot(
        passes, [float(r["perturbed_accuracy"]) for r in history], "^-", color="tab:green", label="perturbed accuracy"
    )
    clean = [(int(r["pass"]), float(r["clean_accuracy"])) for r in history if r.get("clean_accuracy") is not None]
    if clean:  # hollow markers: a single pass has no line to show
        ax.plot(*zip(*clean), "o:", color="tab:green", markerfacecolor="none", linewidth=2, label="clean accuracy")
    for i, (name, rate) in enumerate((random_rates or {}).items()):
        style = _RANDOM_STYLES[i % len(_RANDOM_STYLES)]
        grey = _RANDOM_GREYS[i % len(_RANDOM_GREYS)]
        ax.axhline(float(rate), color=grey, linestyle=style, linewidth=1.2, label=f"{name} ({float(rate):.2f})")
    if best_pass is not None:
        ax.axvline(best_pass, color="black", linewidth=0.8, alpha=0.5, label=f"kept pass {best_pass}")
        for rate in (rate for number, rate in zip(passes, on_x) if number == best_pass):
            ax.plot(best_pass, rate, "*", color="black", markersize=14, zorder=1.5)  # under the point it marks
    last = max(passes + ([best_pass] if best_pass is not None else []), default=1)
    ax.set_xlim(0.5, last + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # whole passes, even for one
    ax.set_ylim(0.0, 1.04)  # room above 1 so that an accuracy near 1 stays visible
    ax.set_xlabel("pass over X")
    ax.set_ylabel("share of images")
    ax.set_title(f"{title}: rates per pass", fontsize=10)
    ax.grid(alpha=0.3)
    fig.legend(fontsize=7, loc="outside lower center", ncols=3, frameon=False)  # never over the last passes
    return fig


def transfer_figure(
    matrix: Sequence[Sequence[float]],
    sources: Sequence[str],
    victims: Sequence[str],
    title: str,
    computed_on: Sequence[Optional[str]] = (),
    input_sizes: Sequence[int] = (),
    baseline: Sequence[float] = (),
) -> Figure:
    """A heatmap of fooling rates: row i is the perturbation ``sources[i]``, column j the victim
    ``victims[j]`` it is scored on; each cell annotated (the paper's Table 2). ``computed_on[i]``
    names the victim row i was computed on (None: unknown; "a+b": an ensemble); that cell (each
    member's) is framed in red.
    ``input_sizes[j]`` (pixels), when the victims are scored at different sizes, goes under
    column j's name. ``baseline[j]``, victim j's random-noise rate (the last row of ``matrix``): a
    perturbation's cell at or below it is hatched and marked "≤ noise"."""
    values = np.asarray(matrix, dtype=float)
    label_inches = 0.075 * max(map(len, map(str, sources)), default=4)  # 8-pt characters of the row labels
    width = max(5.5, 2.6 + label_inches + 1.2 * len(victims))
    fig = _new_figure((width, 2.0 + 0.55 * len(sources)))
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for (i, j), value in np.ndenumerate(values):
        # a perturbation scored on its own victim, or on a member of the ensemble it was computed on ("a+b")
        source = computed_on[i] if i < len(computed_on) else None
        own = source is not None and victims[j] in source.split("+")
        weak = i < len(values) - 1 and j < len(baseline) and value <= baseline[j]
        if weak:
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//", edgecolor="0.75", linewidth=0))
        ax.text(
            j,
            i,
            f"{value:.2f}" + ("\n≤ noise" if weak else ""),
            ha="center",
            va="center",
            fontsize=9,
            fontweight="bold" if own else "normal",
            color="white" if value < 0.6 else "black",
        )
        if own:
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    column_labels = [str(v) for v in victims]
    if len(set(input_sizes)) > 1:
        column_labels = [f"{label}\n{size} px" for label, size in zip(column_labels, input_sizes)]
    ax.set_xticks(range(len(victims)), column_labels, rotation=30 if len(victims) > 4 else 0, fontsize=8)
    ax.set_yticks(range(len(sources)), [str(v) for v in sources], fontsize=8)
    ax.set_xlabel("victim it is scored on")
    ax.set_ylabel("perturbation")
    note = "red: a perturbation on its own victim" + ("; hatched: no better than random noise" if len(baseline) else "")
    ax.set_title(textwrap.fill(title, 70) + f"\n({note})", fontsize=9)
    fig.colorbar(image, ax=ax, label="fooling rate")
    return fig


def compare_figure(
    means: Sequence[Sequence[float]],
    sds: Sequence[Sequence[float]],
    white_box: Sequence[Sequence[bool]],
    rows: Sequence[str],
    victims: Sequence[str],
    title: str,
    baseline_rows: int = 1,
) -> Figure:
    """A heatmap of fooling rates (``task=compare``): row i is a perturbation ``rows[i]`` (its label
    may hold a second line), column j the victim ``victims[j]``; each cell shows the mean and, when
    defined, ± the sd (``means``, ``sds``: R×V, NaN for none). ``white_box[i][j]`` frames the cell in
    red (the victim is in the source). The last ``baseline_rows`` rows are baselines, set apart by
    a white gap and labelled in italics. Width 3 in + the labels + 1.3 in per victim, height 1.6 in
    + 0.6 in per row."""
    values = np.asarray(means, dtype=float)
    spread = np.asarray(sds, dtype=float)
    label_inches = 0.07 * max((len(line) for row in rows for line in str(row).splitlines()), default=4)
    fig = _new_figure((max(6.0, 3.0 + label_inches + 1.3 * len(victims)), 1.6 + 0.6 * len(rows)))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for (i, j), value in np.ndenumerate(values):
        if np.isnan(value):
            ax.text(j, i, "–", ha="center", va="center", fontsize=9, color="0.4")
            continue
        own = bool(white_box[i][j])
        text = (
            f"{value:.2f}"
            + ("" if np.isnan(spread[i, j]) else f"\n± {spread[i, j]:.2f}")
            + ("\nwhite-box" if own else "")
        )
        ax.text(
            j,
            i,
            text,
            ha="center",
            va="center",
            fontsize=8,
            linespacing=1.1,
            fontweight="bold" if own else "normal",
            color="white" if value < 0.6 else "black",
        )
        if own:
            ax.add_patch(Rectangle((j - 0.47, i - 0.47), 0.94, 0.94, fill=False, edgecolor="red", linewidth=2))
    if 0 < baseline_rows < len(rows):
        ax.axhline(len(rows) - baseline_rows - 0.5, color="white", linewidth=4)
    ax.set_xticks(range(len(victims)), [str(v) for v in victims], rotation=30 if len(victims) > 4 else 0, fontsize=8)
    ax.set_yticks(range(len(rows)), [str(r) for r in rows], fontsize=8)
    for label in ax.get_yticklabels()[len(rows) - baseline_rows :]:
        label.set_fontstyle("italic")
    ax.set_xlabel("victim it is scored on")
    ax.set_ylabel("perturbation: engine on source")
    ax.set_title(
        textwrap.fill(title, 80) + "\n(red frame: white-box, the victim is the source or in it; other cells: transfer)",
        fontsize=9,
    )
    fig.colorbar(image, ax=ax, label="fooling rate")
    return fig


def size_curve_figure(
    sizes: Sequence[int],
    fooling_rate: Sequence[float],
    fooling_rate_attack_set: Sequence[float],
    random_rates: Mapping[str, Sequence[float]],
    title: str,
) -> Figure:
    """Fooling rate on the eval set (and on X) against the number of images in X, log-scaled x;
    ``random_rates`` (name → one rate per size) dashed (the paper's Fig. 6)."""
    fig = _new_figure(CURVE_SIZE)
    ax = fig.add_subplot()
    ax.plot(sizes, fooling_rate, "o-", color="tab:blue", label="fooling rate (eval)")
    ax.plot(sizes, fooling_rate_attack_set, "s:", color="tab:red", label="fooling rate on X")
    for i, (name, rates) in enumerate(random_rates.items()):
        ax.plot(
            sizes,
            rates,
            linestyle=_RANDOM_STYLES[i % len(_RANDOM_STYLES)],
            color=_RANDOM_GREYS[i % len(_RANDOM_GREYS)],
            label=name,
        )
    ax.set_xscale("log")
    ax.set_xticks(list(sizes), [str(n) for n in sizes])
    ax.xaxis.set_minor_locator(NullLocator())  # no unlabelled log ticks between the sizes
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("images in X (log scale)")
    ax.set_ylabel("fooling rate (share of images)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return fig


@phase("drawing the perturbation figure")
def perturbation_figure(v: Tensor, threat: ThreatModel) -> Figure:
    """Each channel of ``v`` (C×H×W, [0,1] scale) in 0–255 units on the fixed scale ±s of
    :func:`perturbation_scale` (ℓ2 and ℓ1: at least ‖v‖∞, so that no pixel saturates).

    For 3 channels an RGB panel shows 0.5 + v·255/(2s), clipped (grey = no change). Size
    (2.5·panels + 1.0)×3.0 in.
    """
    v = v.detach().cpu().double()
    channels = v.shape[0]
    scale = perturbation_scale(threat, v.shape)
    if threat.p != math.inf:  # an ℓ2 or ℓ1 perturbation can peak beyond the fixed scale: show its peak
        scale = max(scale, norm_255(v, math.inf))
    values = to_pixel_units(v).numpy()
    panels = channels + (1 if channels == 3 else 0)
    fig = _new_figure((PANEL_WIDTH * panels + COLORBAR_WIDTH, PERTURBATION_HEIGHT))
    axes = fig.subplots(1, panels, squeeze=False)[0]
    names = ("R", "G", "B") if channels == 3 else tuple(f"channel {c}" for c in range(channels))
    for c in range(channels):
        image = axes[c].imshow(values[c], cmap="RdBu_r", vmin=-scale, vmax=scale, interpolation="nearest")
        axes[c].set_title(names[c], fontsize=9)
        axes[c].set_axis_off()
    if channels == 3:
        rgb = np.clip(0.5 + np.transpose(values, (1, 2, 0)) / (2.0 * scale), 0.0, 1.0)
        axes[-1].imshow(rgb, interpolation="nearest")
        axes[-1].set_title("RGB (grey = 0)", fontsize=9)
        axes[-1].set_axis_off()
    fig.colorbar(image, ax=list(axes[:channels]), label="v (0–255 units)", shrink=0.8)
    fig.suptitle(
        f"{threat.symbol} ε={threat.eps:g} (colour scale ±{scale:.3g})\n"
        f"‖v‖∞={norm_255(v, math.inf):.1f}  ‖v‖₂={norm_255(v, 2.0):.1f}",
        fontsize=9,
    )
    return fig


def pick_examples(
    true_labels: Tensor,
    count: int,
    seed: int = 0,
    first_class: Optional[int] = None,
    fooled: Optional[Tensor] = None,
) -> Tensor:
    """Positions (int64, at most ``min(count, N)``) of images spread over the classes in ``true_labels`` (N,).

    With ``fooled`` (a bool mask, N), round(count × its share) of the positions, at least one
    when any image is fooled, are fooled images and the others not, so that the examples show
    the fooling rate; each part is picked as below, the fooled ones first.

    Round-robin over the classes present: ``first_class`` (say, the dominant label) first when
    present, then the others in label order, or, when there are more classes than ``count``, in a
    seeded random order; each round takes one not yet taken, seeded-random image of each class
    that has one left. The same seed gives the same positions.
    """
    labels = true_labels.detach().cpu().flatten()
    count = max(0, min(int(count), labels.numel()))
    if fooled is not None:
        mask = torch.as_tensor(fooled).detach().cpu().flatten().bool()
        wanted = round(count * float(mask.float().mean())) if mask.numel() else 0
        wanted = min(int(mask.sum()), max(wanted, 1 if bool(mask.any()) else 0))
        wanted = max(wanted, count - int((~mask).sum()))  # too few unfooled images: more fooled ones
        parts = []
        for part, size in ((mask, wanted), (~mask, count - wanted)):
            positions = torch.nonzero(part).flatten()
            parts.append(positions[pick_examples(labels[positions], size, seed, first_class)])
        return torch.cat(parts)
    generator = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels).tolist()  # sorted
    if len(classes) > count:
        classes = [classes[i] for i in torch.randperm(len(classes), generator=generator).tolist()]
    if first_class in classes:
        classes.remove(first_class)
        classes.insert(0, first_class)
    pools = []
    for label in classes:
        positions = torch.nonzero(labels == label).flatten()
        pools.append(positions[torch.randperm(positions.numel(), generator=generator)].tolist())
    picked: list[int] = []
    for round_ in range(max((len(pool) for pool in pools), default=0)):
        picked.extend(pool[round_] for pool in pools if round_ < len(pool))
        if len(picked) >= count:
            break
    return torch.tensor(picked[:count], dtype=torch.int64)


def examples_caption(fooled: Tensor) -> str:
    """How the examples were chosen, for a title: "3 of 8 shown changed by v, as in the eval set ..."."""
    shown = int(torch.as_tensor(fooled).numel())
    changed = int(torch.as_tensor(fooled).sum())
    return (
        f"{changed} of {shown} shown have their prediction changed by v, in the proportion of the eval set; "
        "picked at random, spread over the classes"
    )


@phase("drawing the examples figure")
def examples_figure(
    clean: Tensor,
    perturbed: Tensor,
    true_labels: Union[Tensor, Sequence[int]],
    clean_pred: Union[Tensor, Sequence[int]],
    perturbed_pred: Union[Tensor, Sequence[int]],
    class_names: Sequence[str],
    title: str,
) -> Figure:
    """Clean images (N×C×H×W, [0,1]) above with true and predicted labels, x + v below with its prediction.

    A perturbed prediction that differs from the clean one is written in red when it is wrong
    (fooled), in blue when it is the true label (v corrected a mistake); a legend below explains
    the colours shown. Size max(4.0, 1.8·N + 0.5) × 4.5 in.
    """
    count = clean.shape[0]
    true_labels, clean_pred, perturbed_pred = (_ints(x) for x in (true_labels, clean_pred, perturbed_pred))
    fig = _new_figure((max(EXAMPLES_MIN_WIDTH, EXAMPLE_WIDTH * count + EXAMPLES_MARGIN), EXAMPLES_HEIGHT))
    axes = fig.subplots(2, count, squeeze=False)
    for i in range(count):
        for row, images in enumerate((clean, perturbed)):
            ax = axes[row][i]
            picture = images[i].detach().cpu().float().clamp(0, 1).permute(1, 2, 0).numpy()
            if picture.shape[-1] == 1:
                ax.imshow(picture[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.imshow(picture, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
        axes[0][i].set_title(
            f"true: {_wrapped(_short(_name(class_names, true_labels[i])))}\n"
            f"pred: {_wrapped(_short(_name(class_names, clean_pred[i])))}",
            fontsize=8,
        )
        change = _change(true_labels[i], clean_pred[i], perturbed_pred[i])
        axes[1][i].set_xlabel(
            f"pred: {_wrapped(_short(_name(class_names, perturbed_pred[i])))}",
            fontsize=8,
            color=_CHANGE_COLOURS.get(change, "black"),
        )
    axes[0][0].set_ylabel("clean")
    axes[1][0].set_ylabel("x + v")
    changes = {_change(*labels) for labels in zip(true_labels, clean_pred, perturbed_pred)}
    _change_legend(fig, [c for c in _CHANGE_TEXTS if c in changes])
    fig.suptitle(title, fontsize=10)
    return fig


def _change_legend(fig: Figure, shown: Sequence[str]) -> None:
    """A legend under the examples naming the colours of the changes ``shown`` (none: no legend);
    its entries side by side when they fit across the figure, else one per line."""
    if not shown:
        return
    texts = [_CHANGE_TEXTS[c] for c in shown]
    inches = sum(len(t) + LEGEND_HANDLE_CHARS for t in texts) / LEGEND_CHARS_PER_INCH
    fig.legend(
        handles=[Patch(color=_CHANGE_COLOURS[c], label=t) for c, t in zip(shown, texts)],
        labelcolor=[_CHANGE_COLOURS[c] for c in shown],
        loc="outside lower center",
        ncols=len(texts) if inches <= fig.get_figwidth() else 1,
        fontsize=7,
        frameon=False,
    )


def _change(true: int, clean: int, perturbed: int) -> str:
    """How v changed a prediction: "fooled" (a correct one to a wrong label), "changed" (a wrong one
    to another wrong label), "corrected" (to the true label) or "unchanged"."""
    if perturbed == clean:
        return "unchanged"
    if perturbed == true:
        return "corrected"
    return "fooled" if clean == true else "changed"


@dataclass(frozen=True)
class DominantLabels:
    """Where fooled images (clean_pred ≠ perturbed_pred) are sent (the paper's Fig. 7).

    ``counts[k]``: fooled images sent to class k; ``fooled``: their total; ``label``: the most
    frequent destination (lowest index on a tie; None when nothing is fooled); ``share``:
    counts[label] / fooled (0.0 when nothing is fooled).
    """

    counts: list[int]
    fooled: int
    label: Optional[int]
    share: float


def dominant_labels(clean_pred: Tensor, perturbed_pred: Tensor, num_classes: int) -> DominantLabels:
    """Count, per class, the fooled images whose perturbed prediction (N,) is that class."""
    clean_pred = torch.as_tensor(clean_pred).detach().cpu().flatten().long()
    perturbed_pred = torch.as_tensor(perturbed_pred).detach().cpu().flatten().long()
    sent = perturbed_pred[clean_pred != perturbed_pred]
    if sent.numel() and (int(sent.min()) < 0 or int(sent.max()) >= num_classes):
        raise ValueError(f"predicted labels must lie in [0, {num_classes}); got {sent.min()}..{sent.max()}")
    counts = torch.bincount(sent, minlength=num_classes).tolist()
    fooled = int(sent.numel())
    if fooled == 0:
        return DominantLabels(counts=counts, fooled=0, label=None, share=0.0)
    label = max(range(num_classes), key=counts.__getitem__)
    return DominantLabels(counts=counts, fooled=fooled, label=label, share=counts[label] / fooled)


@phase("drawing the labels figure")
def labels_figure(dominant: DominantLabels, class_names: Sequence[str]) -> Figure:
    """Bar chart of the share of fooled images sent to each class they were sent to, the dominant
    label in red (6.4×4.0 in).

    Every class when there are at most 30 (those that received nothing at 0), else the classes
    that received some: up to 30 in class order; more: the 30 largest shares, largest first. The chart is
    at least 5 bars wide (a lone bar stays narrow); class names are rotated when they would overlap.
    """
    fig = _new_figure(LABELS_SIZE)
    ax = fig.add_subplot()
    # every class when they fit (a class that received nothing is part of the picture), else those that received some
    few = len(dominant.counts) <= MAX_BARS
    classes = [k for k, count in enumerate(dominant.counts) if few or count > 0]
    truncated = len(classes) > MAX_BARS
    if truncated:
        classes = sorted(classes, key=lambda k: -dominant.counts[k])[:MAX_BARS]
    heights = [dominant.counts[k] / max(1, dominant.fooled) for k in classes]
    colours = ["tab:red" if k == dominant.label else "tab:gray" for k in classes]
    ax.bar(range(len(classes)), heights, color=colours)
    margin = max(0, MIN_BAR_SLOTS - len(classes)) / 2
    ax.set_xlim(-0.5 - margin, len(classes) - 0.5 + margin)
    # the axis ends a tenth above the tallest bar (on the 10% grid): small shares stay readable
    ax.set_ylim(0.0, min(1.05, math.ceil(10 * max(heights, default=0.0) + 1e-9) / 10 + 0.05))
    names = [_name(class_names, k) for k in classes]
    crowded = len(names) * max(map(len, names), default=0) > TICK_CHARS  # would the names overlap side by side?
    ax.set_xticks(range(len(classes)))
    ax.set_xticklabels(
        names,
        rotation=60 if crowded else 0,
        ha="right" if crowded else "center",
        rotation_mode="anchor",
        fontsize=8,
    )
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_ylabel("share of fooled images sent there")
    ax.set_xlabel("predicted class under the perturbation" + (f" (the {MAX_BARS} most frequent)" if truncated else ""))
    if dominant.label is None:
        ax.set_title("where fooled images go: nothing fooled (n=0)")
        ax.text(0.5, 0.5, "no image was fooled", transform=ax.transAxes, ha="center", va="center", color="0.4")
    else:
        head = f"where fooled images go: {dominant.share:.0%} to '{_name(class_names, dominant.label)}'"
        count = f"(n={dominant.fooled} fooled image{'' if dominant.fooled == 1 else 's'})"
        ax.set_title(head + ("\n" if len(head) + len(count) >= TITLE_CHARS else " ") + count)
    return fig


def save_figure(fig: Figure, path: Union[str, os.PathLike], dpi: int = SAVED_DPI) -> None:
    """Write ``fig`` as a PNG of figsize × ``dpi`` pixels at ``path`` (a ``.png`` name) and as a
    vector PDF beside it (the same name, ``.pdf``), each atomically; then close it."""
    path = Path(path)
    try:
        # no creation date in the PDF, so that the same figure gives the same file
        for suffix, options in ((".png", {"dpi": dpi}), (".pdf", {"metadata": {"CreationDate": None}})):
            buffer = io.BytesIO()
            fig.savefig(buffer, format=suffix[1:], **options)
            atomic_write_bytes(path.with_suffix(suffix), buffer.getvalue())
    finally:
        plt.close(fig)


def _new_figure(size: tuple[float, float]) -> Figure:
    """A figure outside pyplot's registry (nothing to leak if never closed), constrained layout, 100 dpi."""
    return Figure(figsize=size, dpi=DPI, layout="constrained")


def _ints(values: Union[Tensor, Sequence[int]]) -> list[int]:
    return [int(x) for x in (values.tolist() if isinstance(values, Tensor) else values)]


def _wrapped(text: str, width: int = 16) -> str:
    """``text`` on lines of at most ``width`` characters, underscores as spaces."""
    return "\n".join(textwrap.wrap(text.replace("_", " "), width)) or text


def _short(name: str) -> str:
    """A class name's first form (ImageNet's "tabby, tabby cat" → "tabby"), for narrow columns."""
    return name.split(",")[0].strip() or name


def _name(class_names: Sequence[str], label: int) -> str:
    return str(class_names[label]) if 0 <= label < len(class_names) else str(label)
