"""The table of a compare (``task=compare``): engines × sources, each victim's fooling rate over seeds.

A compare is a sweep folder of cells, one run folder per (engine, source, attack seed), each with
a ``metrics.json`` whose ``"task"`` is ``"compare"`` and whose ``"victims"`` maps each victim to
its ``fooling_rate``, ``white_box`` (the victim is, or is in, the source) and
``random_fooling_rate``. The sweep writes ``compare_plan.json`` (every planned cell, and the
pairs not run) beside them. :func:`write_compare` assembles, from the cells found (a partial
compare too):

- ``compare.csv``: a row per (engine, source), its ``label`` (the engine with the options that
  change what it computes, e.g. ``sgd_uap-loss_logit_margin``: the cells' ``engine_label``), columns
  ``<victim>_mean``, ``<victim>_sd``, ``<victim>_white_box`` per victim, ``n`` (seeds), ``seeds``,
  and the mean and sd of ``attack_seconds``, ``norm_l2``, ``norm_linf`` (0–255 units) and
  ``fooling_rate_attack_set``;
  a last row (engine ``random``) holds each victim's random ℓp-noise baseline over the seeds;
- ``compare.md``: the same as mean ± sd cells, the missing cells listed;
- ``compare.png`` (and ``.pdf``): the heatmap;
- ``tensorboard/compare/``: the table as text, the heatmap, and the numbers as scalars.

Standard deviations are over seeds (ddof 1); one seed gives none.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np
import pandas as pd

from uap_lightning.atomic import atomic_write_text
from uap_lightning.attacks.threat import P_SYMBOLS, parse_p
from uap_lightning.report.figures import compare_figure, save_figure
from uap_lightning.rundir import METRICS_FILE

TASK_NAME = "compare"
PLAN_FILE = "compare_plan.json"
COMPARE_CSV = "compare.csv"
COMPARE_MD = "compare.md"
COMPARE_FIGURE = "compare"  # compare.png and compare.pdf
TENSORBOARD_DIR = Path("tensorboard") / "compare"
RANDOM_ROW = "random"
# per-cell numbers summarised per row besides the victims' fooling rates: key, markdown header, format
CELL_NUMBERS = (
    ("attack_seconds", "attack s", ".1f"),
    ("norm_l2", "‖v‖₂", ".1f"),
    ("norm_linf", "‖v‖∞", ".1f"),
    ("fooling_rate_attack_set", "fooling on X", ".3f"),
)


def source_label(members: Sequence[str]) -> str:
    """The name of a source: its model preset, or an ensemble's presets joined by ``+``."""
    return "+".join(members)


def cell_name(engine: str, members: Sequence[str], seed: int) -> str:
    """The folder (under the sweep folder) of the cell ``engine`` on ``members`` with attack seed ``seed``."""
    return f"{engine}-{source_label(members)}-seed{seed}"


def write_plan(root: str | os.PathLike, cells: Sequence[Mapping[str, Any]], skipped: Sequence[str]) -> Path:
    """Write ``compare_plan.json`` into ``root``: ``cells`` (each ``name``, ``engine``, ``source``,
    ``seed``, in the table's order) and ``skipped`` (why an (engine, source) pair is not run)."""
    path = Path(root) / PLAN_FILE
    atomic_write_text(path, json.dumps({"cells": list(cells), "skipped": list(skipped)}, indent=2) + "\n")
    return path


def read_plan(root: Path) -> Dict[str, Any]:
    """The plan in ``root`` (empty lists when there is none or it cannot be read)."""
    try:
        plan = json.loads((root / PLAN_FILE).read_text(encoding="utf-8"))
        return {"cells": list(plan["cells"]), "skipped": list(plan["skipped"])}
    except (OSError, ValueError, KeyError, TypeError):
        return {"cells": [], "skipped": []}


def read_cells(runs: pd.DataFrame) -> List[Dict[str, Any]]:
    """The metrics of every finished compare cell among ``runs`` (a ``collect_runs`` table)."""
    cells = []
    for run_dir in runs.loc[runs["status"] == "ok", "run_dir"]:
        try:
            metrics = json.loads((Path(run_dir) / METRICS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(metrics, dict) and metrics.get("task") == TASK_NAME and isinstance(metrics.get("victims"), dict):
            cells.append(metrics)
    return cells


def compare_table(cells: Sequence[Mapping[str, Any]], order: Sequence[Tuple[str, str]] = ()) -> pd.DataFrame:
    """A row per (engine, source) of ``cells`` (in ``order``, then as found), then the random
    baseline's row; columns as in ``compare.csv`` (see the module's docstring)."""
    victims = list(dict.fromkeys(v for cell in cells for v in cell["victims"]))
    groups: Dict[Tuple[str, str], List[Mapping[str, Any]]] = {key: [] for key in order}
    for cell in sorted(cells, key=lambda c: int(c["attack_seed"])):
        groups.setdefault((cell["engine"], cell["source"]), []).append(cell)
    rows = [_row(engine, source, group, victims) for (engine, source), group in groups.items() if group]
    # seed → victim → rate: the random noise depends on the victim and the seed only
    baseline: Dict[int, Dict[str, float]] = {}
    for cell in cells:
        for victim, scores in cell["victims"].items():
            baseline.setdefault(int(cell["attack_seed"]), {})[victim] = scores["random_fooling_rate"]
    random_row: Dict[str, Any] = {
        "engine": RANDOM_ROW,
        "label": RANDOM_ROW,
        "source": _noise_name(cells),
        "n": len(baseline),
        "seeds": _seeds_text(baseline),
    }
    for victim in victims:
        mean, sd = _mean_sd([rates[victim] for rates in baseline.values() if victim in rates])
        random_row.update({f"{victim}_mean": mean, f"{victim}_sd": sd, f"{victim}_white_box": False})
    return pd.DataFrame([*rows, random_row])


def _row(engine: str, source: str, group: Sequence[Mapping[str, Any]], victims: Sequence[str]) -> Dict[str, Any]:
    """The row of one (engine, source): mean and sd over its cells (one per seed)."""
    labels = dict.fromkeys(str(c.get("engine_label") or engine) for c in group)
    row: Dict[str, Any] = {
        "engine": engine,
        "label": ", ".join(labels),
        "source": source,
        "n": len(group),
        "seeds": _seeds_text(int(c["attack_seed"]) for c in group),
    }
    for victim in victims:
        scores = [c["victims"][victim] for c in group if victim in c["victims"]]
        mean, sd = _mean_sd([s["fooling_rate"] for s in scores])
        row.update(
            {
                f"{victim}_mean": mean,
                f"{victim}_sd": sd,
                f"{victim}_white_box": any(bool(s["white_box"]) for s in scores),
            }
        )
    for key, *_ in CELL_NUMBERS:
        row[f"{key}_mean"], row[f"{key}_sd"] = _mean_sd([c[key] for c in group if c.get(key) is not None])
    return row


def _mean_sd(values: Sequence[Any]) -> Tuple[float, float]:
    """Mean and sample standard deviation (ddof 1) of ``values``; NaN where undefined."""
    array = np.asarray([float(v) for v in values], dtype=float)
    if array.size == 0:
        return math.nan, math.nan
    return float(array.mean()), (float(array.std(ddof=1)) if array.size > 1 else math.nan)


def _seeds_text(seeds: Any) -> str:
    """The distinct seeds, ascending, separated by spaces."""
    return " ".join(str(s) for s in sorted(set(seeds)))


def _noise_name(cells: Sequence[Mapping[str, Any]]) -> str:
    """What the random baseline is: ``ℓ∞ noise`` (the cells' norm), or ``noise`` if they differ."""
    norms = {str(c.get("p")) for c in cells}
    return f"{P_SYMBOLS[parse_p(norms.pop())]} noise" if len(norms) == 1 else "noise"


def victim_names(table: pd.DataFrame) -> List[str]:
    """The victims of a :func:`compare_table`, in order."""
    return [c[: -len("_white_box")] for c in table.columns if c.endswith("_white_box")]


def markdown(table: pd.DataFrame, cells: Sequence[Mapping[str, Any]], plan: Mapping[str, Any]) -> str:
    """``compare.md``: the settings, the table as mean ± sd (white-box cells marked), the cells
    still missing and the pairs not run."""
    victims = victim_names(table)
    header = ["engine", "source", *victims, *(title for _, title, _ in CELL_NUMBERS), "seeds"]
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join([":--", ":--", *["--:"] * (len(header) - 3), ":--"]) + " |",
    ]
    for _, row in table.iterrows():
        random = row["engine"] == RANDOM_ROW
        fooling = [
            _cell(row[f"{v}_mean"], row[f"{v}_sd"], ".3f") + (" (white-box)" if row[f"{v}_white_box"] else "")
            for v in victims
        ]
        numbers = ["" if random else _cell(row[f"{key}_mean"], row[f"{key}_sd"], fmt) for key, _, fmt in CELL_NUMBERS]
        lines.append(
            "| "
            + " | ".join(
                [str(row["label"]), str(row["source"]), *fooling, *numbers, str(row["seeds"]).replace(" ", ", ")]
            )
            + " |"
        )
    found = {c.get("cell") for c in cells}
    missing = [c["name"] for c in plan.get("cells", []) if c["name"] not in found]
    text = [
        f"# Compare: {_settings(cells)}",
        "",
        f"{len(cells)} of {len(plan.get('cells') or cells)} cells. Fooling rate of each perturbation on the eval "
        "images of each victim, mean ± sd over the attack seeds; (white-box): the victim is, or is in, the source "
        "the perturbation was computed on; the other victims' rates are transfer. Attack seconds and ‖v‖ (0–255 "
        "units) per cell, mean ± sd; fooling on X: on the source, the attack's own images.",
        "",
        *lines,
    ]
    if missing:
        text += [
            "",
            f"Missing cells ({len(missing)}; run the same command again to complete them): " + ", ".join(missing) + ".",
        ]
    if plan.get("skipped"):
        text += ["", "Not run: " + "; ".join(plan["skipped"]) + "."]
    return "\n".join(text) + "\n"


def _cell(mean: float, sd: float, fmt: str) -> str:
    """``mean ± sd``, ``mean`` when sd is undefined, empty when mean is."""
    if pd.isna(mean):
        return ""
    return f"{mean:{fmt}}" if pd.isna(sd) else f"{mean:{fmt}} ± {sd:{fmt}}"


def _settings(cells: Sequence[Mapping[str, Any]]) -> str:
    """The cells' data, norm and ε, and sizes of X and of the eval set (each value list when they differ)."""

    def values(key: str) -> str:
        return ", ".join(str(v) for v in dict.fromkeys(c.get(key) for c in cells))

    norms = ", ".join(f"{P_SYMBOLS[parse_p(p)]}" for p in dict.fromkeys(c["p"] for c in cells if c.get("p")))
    eps = ", ".join(f"{float(e):g}" for e in dict.fromkeys(c["eps"] for c in cells if c.get("eps") is not None))
    return (
        f"{values('data')}, {norms} ε={eps}; X = {values('attack_images')} images, {values('eval_images')} eval images"
    )


def heatmap(table: pd.DataFrame, cells: Sequence[Mapping[str, Any]]) -> Any:
    """The heatmap of ``table``: a row per (engine, source) labelled with its attack seconds and
    norms, the random baseline's row last."""
    victims = victim_names(table)
    rows = []
    for _, row in table.iterrows():
        if row["engine"] == RANDOM_ROW:
            rows.append(f"random {row['source']}")
            continue
        rows.append(
            f"{row['label']} on {row['source']}\n{row['attack_seconds_mean']:.1f} s, "
            f"‖v‖₂ {row['norm_l2_mean']:.0f}, ‖v‖∞ {row['norm_linf_mean']:.0f}"
        )
    seed_list = sorted({int(c["attack_seed"]) for c in cells})
    seeds = _seeds_text(seed_list).replace(" ", ", ")
    over = f"mean ± sd over attack seeds {seeds}" if len(seed_list) > 1 else f"attack seed {seeds}"
    return compare_figure(
        table[[f"{v}_mean" for v in victims]].to_numpy(dtype=float),
        table[[f"{v}_sd" for v in victims]].to_numpy(dtype=float),
        table[[f"{v}_white_box" for v in victims]].to_numpy(dtype=bool),
        rows,
        victims,
        f"Fooling rate, {over}: {_settings(cells)}",
    )


def write_compare(root: str | os.PathLike, runs: pd.DataFrame) -> Dict[str, Path]:
    """Write ``compare.csv``, ``compare.md``, ``compare.png`` (and ``.pdf``) and the TensorBoard
    logdir ``tensorboard/compare`` into ``root`` from the finished cells among ``runs`` (a
    ``collect_runs`` table of ``root``; those of the plan when ``root`` has one); nothing when it
    holds none. Returns the paths by name."""
    root = Path(root)
    plan = read_plan(root)
    planned = {c["name"] for c in plan["cells"]}
    cells = [c for c in read_cells(runs) if not planned or c.get("cell") in planned]  # the last command's
    if not cells:
        return {}
    order = [(c["engine"], c["source"]) for c in plan["cells"]]
    table = compare_table(cells, list(dict.fromkeys(order)))
    text = markdown(table, cells, plan)
    paths = {
        COMPARE_CSV: root / COMPARE_CSV,
        COMPARE_MD: root / COMPARE_MD,
        f"{COMPARE_FIGURE}.png": root / f"{COMPARE_FIGURE}.png",
    }
    atomic_write_text(paths[COMPARE_CSV], table.to_csv(index=False))
    atomic_write_text(paths[COMPARE_MD], text)
    figure = heatmap(table, cells)
    paths[str(TENSORBOARD_DIR)] = write_tensorboard(root / TENSORBOARD_DIR, table, text, figure)
    save_figure(figure, paths[f"{COMPARE_FIGURE}.png"])
    return paths


def write_tensorboard(logdir: Path, table: pd.DataFrame, text: str, figure: Any) -> Path:
    """The table as TensorBoard text, the heatmap as an image and, per row, each victim's mean
    fooling rate and sd, attack seconds and norms as scalars (``compare/<label> on
    <source>/<what>``), in ``logdir`` (replacing what an earlier report wrote there)."""
    from torch.utils.tensorboard import SummaryWriter  # loads TensorBoard: only when writing

    staging = logdir.with_name(f".{logdir.name}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    writer = SummaryWriter(log_dir=str(staging))
    try:
        writer.add_text("compare/table", text)
        writer.add_figure("compare/heatmap", figure, close=False)
        for tag, value in scalars(table).items():
            writer.add_scalar(tag, value, global_step=0)
    finally:
        writer.close()
    shutil.rmtree(logdir, ignore_errors=True)
    os.replace(staging, logdir)
    return logdir


def scalars(table: pd.DataFrame) -> Dict[str, float]:
    """The defined numbers of ``table`` as TensorBoard tags: ``compare/<label> on <source>/<victim>``
    (mean fooling rate), ``.../<victim>_sd``, ``.../attack_seconds``, ``.../norm_l2``,
    ``.../norm_linf``; the random baseline's row as ``compare/random <noise>/<victim>``."""
    values = {}
    for _, row in table.iterrows():
        name = (
            f"{row['label']} {row['source']}" if row["engine"] == RANDOM_ROW else f"{row['label']} on {row['source']}"
        )
        prefix = f"compare/{_tag(name)}"
        for victim in victim_names(table):
            values[f"{prefix}/{_tag(victim)}"] = row[f"{victim}_mean"]
            values[f"{prefix}/{_tag(victim)}_sd"] = row[f"{victim}_sd"]
        if row["engine"] != RANDOM_ROW:
            values.update({f"{prefix}/{key}": row[f"{key}_mean"] for key, *_ in CELL_NUMBERS})
    return {tag: float(value) for tag, value in values.items() if not pd.isna(value)}


def _tag(label: str) -> str:
    """``label`` as one level of a TensorBoard tag: spaces and slashes as underscores."""
    return re.sub(r"[\s/]+", "_", label)
