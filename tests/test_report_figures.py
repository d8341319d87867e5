"""The run figures: each renders to a PNG of the documented size; fixed perturbation scale; example picking."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.patches import Rectangle

from uap_lightning.attacks import ThreatModel
from uap_lightning.report.figures import (
    DominantLabels,
    curve_figure,
    dominant_labels,
    examples_figure,
    labels_figure,
    perturbation_figure,
    perturbation_scale,
    pick_examples,
    save_figure,
    transfer_figure,
)

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def figure_image(fig) -> np.ndarray:
    """``fig`` rendered at its own dpi as an H×W×3 uint8 array."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _png_shape(fig, path: Path) -> tuple[int, ...]:
    """Save ``fig`` to ``path`` (and its PDF), read the PNG back and check it is a non-blank image;
    its shape at 100 dpi (the saved PNG has 200 dpi: twice the pixels each way)."""
    save_figure(fig, path)
    assert path.with_suffix(".pdf").read_bytes().startswith(b"%PDF")
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.size > 0
    assert image[..., :3].std() > 0  # something was drawn
    return (image.shape[0] // 2, image.shape[1] // 2, image.shape[2])


def _sign_pattern(channels: int, size: int = 16) -> torch.Tensor:
    """A fixed ±1 pattern, C×size×size."""
    return torch.sign(torch.randn(channels, size, size, generator=torch.Generator().manual_seed(1)))


def _history(passes: int = 4, clean: bool = True) -> list[dict]:
    return [
        {
            "pass": k,
            "fooling_rate": 0.1 * k,
            "fooling_rate_attack_set": 0.12 * k,
            "perturbed_accuracy": 0.8 - 0.1 * k,
            **({"clean_accuracy": 0.85} if clean else {}),
        }
        for k in range(1, passes + 1)
    ]


@pytest.mark.parametrize(
    "best_pass, random_rates, clean",
    [
        (3, {"random ℓp noise": 0.05, "random same-ℓ2 noise": 0.04}, True),
        (None, None, False),
        (7, None, True),  # a kept pass outside the history still gets its line
    ],
)
def test_curve_figure_renders_640x400(tmp_path, best_pass, random_rates, clean):
    fig = curve_figure(_history(clean=clean), best_pass, random_rates)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    if best_pass is not None:
        assert f"kept pass {best_pass}" in labels
    for name in random_rates or {}:
        assert any(label.startswith(name) for label in labels)
    assert ("clean accuracy" in labels) == clean
    assert fig.axes[0].get_ylim() == (0.0, 1.04)  # room above 1: an accuracy near 1 stays visible
    assert fig.axes[0].get_ylabel() == "share of images"
    assert _png_shape(fig, tmp_path / "curve.png") == (460, 640, 4)


@pytest.mark.parametrize("p", ["inf", "2", "1", math.inf, 2.0, 1.0])
@pytest.mark.parametrize("channels, width", [(1, 350), (3, 1100)])
def test_perturbation_figure_renders(tmp_path, p, channels, width):
    v = 8 / 255 * _sign_pattern(channels)
    fig = perturbation_figure(v, ThreatModel.parse(8, p))
    assert len(fig.axes) == channels + (1 if channels == 3 else 0) + 1  # panels and one colorbar
    assert fig.axes[-1].get_ylabel() == "v (0–255 units)"
    assert _png_shape(fig, tmp_path / "perturbation.png") == (300, width, 4)


def test_perturbation_scale():
    def scale(eps, p, shape):
        return perturbation_scale(ThreatModel.parse(eps, p), shape)

    assert scale(8, "inf", (3, 32, 32)) == 8
    assert scale(300, math.inf, (3, 32, 32)) == 300
    assert scale(1000, "2", (3, 32, 32)) == pytest.approx(3 * 1000 / math.sqrt(3 * 32 * 32))
    assert scale(1e6, 2.0, (1, 8, 8)) == 255
    assert scale(40, "1", (1, 8, 8)) == 40
    assert scale(4000, 1.0, (1, 8, 8)) == 255
    with pytest.raises(ValueError):
        scale(0, "inf", (1, 8, 8))


def test_perturbation_colour_range_is_fixed_by_eps():
    """The colours are ±s from ε, not from the peak of v: two runs with different ε differ."""
    for channels in (1, 3):
        pattern = _sign_pattern(channels)
        low, high, again = (
            figure_image(perturbation_figure(e / 255 * pattern, ThreatModel.parse(e, "inf"))) for e in (32, 96, 32)
        )
        assert low.shape == high.shape
        assert not np.array_equal(low, high)
        assert np.array_equal(low, again)
        # Same ε, v at a third of it: a peak-normalised picture would be identical; this one is not.
        fig_full = perturbation_figure(96 / 255 * pattern, ThreatModel.parse(96, "inf"))
        fig_third = perturbation_figure(32 / 255 * pattern, ThreatModel.parse(96, "inf"))
        for fig in (fig_full, fig_third):
            assert fig.axes[0].images[0].get_clim() == (-96, 96)
        full, third = figure_image(fig_full), figure_image(fig_third)
        panel = fig_full.axes[0].get_window_extent()  # after drawing: the laid-out position
        crop = np.s_[int(panel.y0) : int(panel.y1), int(panel.x0) : int(panel.x1)]
        assert not np.array_equal(np.flipud(full)[crop], np.flipud(third)[crop])


def test_perturbation_rgb_panel_is_grey_for_zero():
    fig = perturbation_figure(torch.zeros(3, 8, 8), ThreatModel.parse(10, "inf"))
    rgb = fig.axes[3].images[0].get_array()
    assert np.allclose(rgb, 0.5)


def test_pick_examples_covers_classes_on_sorted_labels():
    labels = torch.arange(10).repeat_interleave(100)  # CIFAR-10's class-sorted eval set
    picked = pick_examples(labels, 10, seed=0)
    assert picked.dtype == torch.int64 and picked.shape == (10,)
    assert labels[picked].tolist() == list(range(10))  # every class, in label order
    assert torch.equal(picked, pick_examples(labels, 10, seed=0))
    assert not torch.equal(picked, pick_examples(labels, 10, seed=1))
    twenty = pick_examples(labels, 20, seed=0)
    assert labels[twenty].tolist() == list(range(10)) * 2
    assert len(set(twenty.tolist())) == 20
    assert torch.equal(twenty[:10], picked)


def test_pick_examples_puts_the_dominant_label_first_and_samples_many_classes():
    """The dominant label's class is always shown; with more classes than images, a seeded sample of them."""
    labels = torch.arange(10).repeat_interleave(100)
    assert labels[pick_examples(labels, 10, seed=0, first_class=8)].tolist() == [8, 0, 1, 2, 3, 4, 5, 6, 7, 9]
    imagenet = torch.arange(1000)
    shown = labels_shown = imagenet[pick_examples(imagenet, 10, seed=0, first_class=700)].tolist()
    assert shown[0] == 700 and len(set(labels_shown)) == 10 and max(shown[1:]) > 100


def test_pick_examples_never_more_than_available():
    labels = torch.tensor([2, 2, 5, 7, 7, 7])
    picked = pick_examples(labels, 100, seed=3)
    assert sorted(picked.tolist()) == list(range(6))
    assert labels[picked[:3]].tolist() == [2, 5, 7]
    assert labels[picked[3:5]].tolist() == [2, 7]
    assert pick_examples(labels, 0).numel() == 0
    assert pick_examples(torch.empty(0, dtype=torch.long), 5).numel() == 0


def test_dominant_labels_counts_only_fooled_images():
    clean = torch.tensor([0, 1, 2, 3, 3, 4, 5, 6])
    perturbed = torch.tensor([3, 3, 3, 3, 1, 4, 3, 0])  # positions 3 and 5 unchanged
    dominant = dominant_labels(clean, perturbed, num_classes=7)
    assert dominant == DominantLabels(counts=[1, 1, 0, 4, 0, 0, 0], fooled=6, label=3, share=4 / 6)


def test_dominant_labels_tie_and_nothing_fooled():
    assert dominant_labels(torch.tensor([0, 0]), torch.tensor([2, 1]), 3).label == 1  # lowest index on a tie
    same = torch.tensor([1, 2, 3])
    assert dominant_labels(same, same.clone(), 4) == DominantLabels(
        counts=[0, 0, 0, 0], fooled=0, label=None, share=0.0
    )
    with pytest.raises(ValueError):
        dominant_labels(torch.tensor([0]), torch.tensor([5]), 3)


def test_labels_figure_renders_640x400(tmp_path):
    dominant = dominant_labels(torch.zeros(16, dtype=torch.long), torch.tensor([3] * 8 + [1, 2, 4, 5, 6, 7, 8, 9]), 10)
    fig = labels_figure(dominant, CIFAR_NAMES)
    assert fig.axes[0].get_title() == "where fooled images go: 50% to 'cat' (n=16 fooled images)"
    assert len(fig.axes[0].patches) == 10  # ten classes fit: the one nothing went to has its (empty) place
    assert fig.axes[0].get_xticklabels()[0].get_rotation() > 0  # nine CIFAR names would overlap
    digits = labels_figure(dominant, [str(k) for k in range(10)])
    assert digits.axes[0].get_xticklabels()[0].get_rotation() == 0
    assert _png_shape(fig, tmp_path / "labels.png") == (400, 640, 4)

    nothing = labels_figure(dominant_labels(torch.zeros(4), torch.zeros(4), 10), CIFAR_NAMES)
    assert "nothing fooled" in nothing.axes[0].get_title()
    assert _png_shape(nothing, tmp_path / "labels_none.png") == (400, 640, 4)


def test_labels_figure_shows_top_30_of_many_classes(tmp_path):
    counts = [k % 37 for k in range(100)]
    dominant = DominantLabels(counts=counts, fooled=sum(counts), label=36, share=36 / sum(counts))
    fig = labels_figure(dominant, [f"class {k}" for k in range(100)])
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert len(ticks) == 30 and ticks[0] == "class 36"
    assert _png_shape(fig, tmp_path / "labels.png") == (400, 640, 4)


@pytest.mark.parametrize("channels", [1, 3])
def test_examples_figure_renders(tmp_path, channels):
    count = 8
    clean = torch.rand(count, channels, 12, 12, generator=torch.Generator().manual_seed(0))
    perturbed = (clean + 0.1).clamp(0, 1)
    true = list(range(count))
    clean_pred = torch.tensor([0, 1, 2, 3, 4, 5, 6, 8])
    perturbed_pred = torch.tensor([0, 3, 3, 3, 4, 3, 6, 8])
    title = "deepfool_uap ℓinf ε=8: fooling rate 0.62"
    fig = examples_figure(clean, perturbed, true, clean_pred, perturbed_pred, CIFAR_NAMES, title)
    axes = fig.axes
    assert axes[0].get_title() == "true: airplane\npred: airplane"
    assert axes[7].get_title() == "true: horse\npred: ship"
    assert axes[0].get_ylabel() == "clean" and axes[count].get_ylabel() == "x + v"
    reds = [ax.xaxis.label.get_color() == "red" for ax in axes[count:]]
    assert reds == [False, True, True, False, False, True, False, False]
    assert fig.get_suptitle() == title
    assert _png_shape(fig, tmp_path / "examples.png") == (450, 1490, 4)


def test_examples_figure_has_minimum_width(tmp_path):
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    fig = examples_figure(image, image, [1], [1], [2], CIFAR_NAMES, "one image")
    assert _png_shape(fig, tmp_path / "examples.png") == (450, 400, 4)


def test_figure_image_and_dpi(tmp_path):
    fig = curve_figure(_history(), 2)
    array = figure_image(fig)
    assert array.shape == (460, 640, 3) and array.dtype == np.uint8
    save_figure(fig, tmp_path / "curve.png", dpi=50)
    assert mpimg.imread(tmp_path / "curve.png").shape[:2] == (230, 320)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.pdf", "curve.png"]  # no temporary file left behind


def test_transfer_figure_frames_each_perturbation_on_its_own_victim():
    """The cell of a perturbation scored on the victim it was computed on is framed in red; rows
    whose victim is unknown (a file, the random baseline) have no frame."""
    sources = [
        "perturbation from deepfool_uap on cnn",
        "perturbation from gd_uap on lenet",
        "perturbation from uap",
        "random ℓ∞ noise",
    ]
    fig = transfer_figure(
        [[0.4, 0.2], [0.1, 0.5], [0.3, 0.3], [0.1, 0.1]], sources, ["cnn", "lenet"], "t", ["cnn", "lenet", None]
    )
    framed = [(p.get_x() + 0.5, p.get_y() + 0.5) for p in fig.axes[0].patches if isinstance(p, Rectangle)]
    assert framed == [(0.0, 0.0), (1.0, 1.0)]


def test_transfer_figure_frames_each_member_of_an_ensemble():
    """A perturbation computed on an ensemble ("cnn+lenet") is white-box on each of its members."""
    sources = ["perturbation from sgd_uap on cnn+lenet", "random ℓ∞ noise"]
    fig = transfer_figure([[0.4, 0.5, 0.2], [0.1, 0.1, 0.1]], sources, ["cnn", "lenet", "vgg"], "t", ["cnn+lenet"])
    framed = [(p.get_x() + 0.5, p.get_y() + 0.5) for p in fig.axes[0].patches if isinstance(p, Rectangle)]
    assert framed == [(0.0, 0.0), (1.0, 0.0)]


@pytest.mark.parametrize(
    "sizes, expected",
    [
        ((224, 240), ["cnn\n224 px", "lenet\n240 px"]),  # victims at their own sizes: each column says which
        ((224, 224), ["cnn", "lenet"]),  # one size for all: the names alone
        ((), ["cnn", "lenet"]),
    ],
)
def test_transfer_figure_names_each_victims_input_size_when_they_differ(sizes, expected):
    fig = transfer_figure(
        [[0.4, 0.2], [0.1, 0.1]], ["perturbation from cnn", "random"], ["cnn", "lenet"], "t", ["cnn", None], sizes
    )
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == expected


def _visible_xticks(ax) -> list[float]:
    """The x ticks inside the axis limits, after drawing (the locator runs at draw time)."""
    FigureCanvasAgg(ax.figure).draw()
    low, high = ax.get_xlim()
    return [float(t) for t in ax.get_xticks() if low <= t <= high]


@pytest.mark.parametrize("passes", [1, 2, 37])
def test_curve_figure_ticks_are_whole_passes(passes):
    ticks = _visible_xticks(curve_figure(_history(passes), 1, {"random ℓ∞ noise": 0.05}).axes[0])
    assert ticks and all(t.is_integer() and 1 <= t <= passes for t in ticks)
    if passes <= 2:
        assert ticks == [float(k) for k in range(1, passes + 1)]


def test_curve_figure_of_one_pass_shows_every_series_its_legend_lists():
    """One pass: each series is a single point, visible only with a marker; the legend names only
    what is drawn, and the kept pass's star lies under the point it marks."""
    fig = curve_figure(_history(1), 1, {"random ℓ∞ noise": 0.05})
    ax = fig.axes[0]
    visible = {
        line.get_label()
        for line in ax.lines
        if len(line.get_xdata()) > 1 or line.get_marker() not in ("None", "", " ", None)
    }
    listed = [text.get_text() for legend in fig.legends for text in legend.get_texts()]
    assert "clean accuracy" in listed
    assert set(listed) <= visible
    on_x = next(line for line in ax.lines if line.get_label() == "fooling rate on X")
    star = next(line for line in ax.lines if line.get_marker() == "*")
    assert star.get_zorder() < on_x.get_zorder()


def test_labels_figure_draws_only_classes_that_fooled_images_went_to_when_all_do_not_fit():
    names = [f"class {k}" for k in range(1000)]
    one = labels_figure(dominant_labels(torch.tensor([0]), torch.tensor([7]), 1000), names)
    ax = one.axes[0]
    assert len(ax.patches) == 1
    assert [t.get_text() for t in ax.get_xticklabels()] == ["class 7"]
    assert "(n=1 fooled image)" in ax.get_title()
    FigureCanvasAgg(one).draw()
    bar = ax.patches[0].get_window_extent()
    assert bar.width < 0.25 * ax.get_window_extent().width  # one bar, not a slab across the axes

    few = labels_figure(
        dominant_labels(torch.zeros(6, dtype=torch.long), torch.tensor([3, 3, 1, 3, 2, 1]), 10), CIFAR_NAMES
    )
    assert [t.get_text() for t in few.axes[0].get_xticklabels()] == list(CIFAR_NAMES)  # all ten, class order
    assert len(few.axes[0].patches) == 10
    assert "(the 30 most frequent)" not in few.axes[0].get_xlabel()


def test_examples_figure_tells_a_corrected_prediction_from_a_fooled_one():
    """Red is a prediction changed to a wrong label; a wrong prediction changed to the true label is
    another colour; the figure's legend explains the colours shown, and only those."""
    count = 4
    images = torch.rand(count, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    true = [0, 1, 2, 4]
    clean_pred = [0, 5, 2, 5]  # right, wrong, right, wrong
    perturbed_pred = [3, 1, 2, 6]  # fooled, corrected, unchanged, changed (one wrong label to another)
    fig = examples_figure(images, images, true, clean_pred, perturbed_pred, CIFAR_NAMES, "t")
    colours = [ax.xaxis.label.get_color() for ax in fig.axes[count:]]
    assert colours[0] == "red" and colours[3] not in ("red", "black", colours[1])  # already wrong: not "fooled"
    assert colours[1] not in ("red", "black") and colours[2] == "black"
    legend = [text.get_text() for legend in fig.legends for text in legend.get_texts()]
    assert len(legend) == 3 and any("already wrong" in t for t in legend) and any("true" in t for t in legend)

    only_fooled = examples_figure(images[:1], images[:1], [0], [0], [3], CIFAR_NAMES, "t")
    assert [text.get_text() for legend in only_fooled.legends for text in legend.get_texts()] == [
        next(t for t in legend if "wrong" in t)
    ]


def test_examples_show_the_fooling_rate_and_tell_an_already_wrong_prediction_apart():
    import torch

    from uap_lightning.report import figures

    labels = torch.arange(100) % 10
    fooled = torch.zeros(100, dtype=torch.bool)
    fooled[:41] = True  # 41% fooled
    chosen = figures.pick_examples(labels, 10, seed=0, fooled=fooled)
    assert len(set(chosen.tolist())) == 10 and int(fooled[chosen].sum()) == 4
    one = torch.arange(100) == 7  # a single fooled image is still shown
    assert int(one[figures.pick_examples(labels, 10, seed=0, fooled=one)].sum()) == 1
    assert figures._change(true=3, clean=3, perturbed=5) == "fooled"
    assert figures._change(true=3, clean=4, perturbed=5) == "changed"  # it was wrong before v
    assert figures._change(true=3, clean=4, perturbed=3) == "corrected"
    assert "4 of 10 shown" in figures.examples_caption(fooled[chosen])


def test_transfer_cells_no_better_than_noise_are_marked():
    from uap_lightning.report.figures import transfer_figure

    fig = transfer_figure(
        [[0.5, 0.1], [0.3, 0.6], [0.12, 0.2]],
        ["from a", "from b", "random"],
        ["a", "b"],
        "t",
        computed_on=["a", "b"],
        baseline=[0.12, 0.2],
    )
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts.count("0.10\n≤ noise") == 1 and "0.30" in texts and "0.12" in texts  # the baseline row unmarked


def test_labels_show_every_class_when_they_fit_and_only_the_receiving_ones_beyond():
    from uap_lightning.report.figures import DominantLabels, labels_figure

    few = labels_figure(DominantLabels(counts=[0, 3, 0, 10], fooled=13, label=3, share=10 / 13), list("abcd"))
    assert [t.get_text() for t in few.axes[0].get_xticklabels()] == list("abcd")
    counts = [0] * 1000
    counts[7], counts[9] = 4, 1
    many = labels_figure(DominantLabels(counts=counts, fooled=5, label=7, share=0.8), [str(i) for i in range(1000)])
    assert [t.get_text() for t in many.axes[0].get_xticklabels()] == ["7", "9"]
