"""The figure of the geometry task (the paper's Fig. 9 and its subspace experiment).

A pure function, numbers in, a matplotlib ``Figure`` out (written by
:func:`uap_lightning.report.figures.save_figure` as a 200-dpi PNG and a PDF). Size 11.0 × 4.2 in
→ 1100 × 420 pixels at 100 dpi (TensorBoard), 2200 × 840 in the PNG file.
"""

from __future__ import annotations

from typing import Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from uap_lightning.report.figures import DPI

GEOMETRY_SIZE = (11.0, 4.2)


def geometry_figure(
    normal_values: Sequence[float],
    random_values: Sequence[float],
    ks: Sequence[int],
    subspace_mean: Sequence[float],
    subspace_std: Sequence[float],
    whole_mean: float,
    whole_std: float,
    *,
    draws: int,
    normals_label: str,
    vectors_label: str,
) -> Figure:
    """Left: the singular values σ_i/σ_1 (log scale) of the boundary normals against index i,
    beside those of as many random unit vectors. Right: the fooling rate (share of images) of a
    random vector from the top-k singular subspace of the normals, mean ± std per k of ``ks``,
    and of a random vector from the whole space (independent of k: a line and a ±std band).

    ``draws``: the random vectors behind each mean; ``normals_label`` says whose normals these are,
    ``vectors_label`` what the random vectors are (their norm).
    """
    fig = Figure(figsize=GEOMETRY_SIZE, dpi=DPI, layout="constrained")
    left, right = fig.subplots(1, 2)

    for values, style, label in (
        (normal_values, dict(color="tab:blue", linewidth=2.0), "boundary normals"),
        (random_values, dict(color="0.45", linestyle="--", linewidth=1.5), "as many random unit vectors"),
    ):
        top = values[0] if values and values[0] > 0 else 1.0
        index = [i + 1 for i, value in enumerate(values) if value > 0]  # log scale: zeros have no place
        left.plot(index, [values[i - 1] / top for i in index], label=label, **style)
    for k in ks:
        left.axvline(k, color="tab:red", alpha=0.25, linewidth=1.0)
    left.set_yscale("log")
    shown = [v / values[0] for values in (normal_values, random_values) for v in values if v > 0]
    left.set_ylim(min(0.1, min(shown) / 1.5), 1.25)  # at least a decade: a flat spectrum looks flat
    left.set_xlim(1, max(len(normal_values), len(random_values), 2))
    left.set_xlabel("index i of the singular value (red lines: the k on the right)")
    left.set_ylabel(r"$\sigma_i\,/\,\sigma_1$ (log scale)")
    left.set_title(f"normalised singular values of the normals' matrix N\n{normals_label}", fontsize=9)
    left.grid(alpha=0.3, which="both")
    left.legend(fontsize=8, loc="best")

    ks = list(ks)
    right.errorbar(
        ks,
        subspace_mean,
        yerr=subspace_std,
        fmt="o-",
        color="tab:red",
        capsize=4,
        label="random vector in the span of the normals' top-k singular vectors",
    )
    span = (min(ks) / 1.5, max(ks) * 1.5) if len(ks) > 1 else (ks[0] / 2, ks[0] * 2)
    right.axhline(whole_mean, color="0.45", linestyle="--", label="random vector from the whole space (band: ± std)")
    right.axhspan(whole_mean - whole_std, whole_mean + whole_std, color="0.45", alpha=0.2, linewidth=0)
    right.set_xscale("log")
    right.set_xlim(*span)
    right.set_xticks(ks, [str(k) for k in ks])
    right.xaxis.set_minor_locator(NullLocator())  # no unlabelled log ticks between the ks
    right.set_ylim(
        0.0,
        min(1.0, max(max(m + s for m, s in zip(subspace_mean, subspace_std)), whole_mean + whole_std) * 1.25 + 0.05),
    )
    right.set_xlabel("k, dimension of the subspace (log scale)")
    right.set_ylabel("fooling rate on the eval set (share of images)")
    right.set_title(f"fooling rate of {vectors_label}\n(mean ± std of {draws} draws)", fontsize=9)
    right.grid(alpha=0.3)
    handles, labels = right.get_legend_handles_labels()
    right.legend(handles[::-1], labels[::-1], fontsize=8, loc="best")  # the subspace vector first
    return fig
