"""The report of a sweep: one table of all runs under a folder, and fooling-rate plots.

A run folder is a directory holding ``.hydra/overrides.yaml`` (a Hydra job) or
``metrics.json`` (a finished run). Its status comes from the files it left:

- ``metrics.json`` with ``"interrupted": true``: ``interrupted``;
- ``metrics.json``: ``ok``;
- ``failure.json`` (``{"status": "failed", "error": "<ExceptionType>: <message>",
  "traceback": "..."}``, written by a failing job): ``failed``, with the error's first line;
- neither: ``incomplete`` (still running, or killed).

``summarize(folder)`` writes ``summary.csv``, ``summary.md`` and one
``fooling_vs_<key>.png`` (and ``.pdf``) per swept numeric override into the folder (and, for a
``task=compare``, ``compare.csv``, ``compare.md``, ``compare.png`` and ``tensorboard/compare``);
``SweepSummaryCallback`` does so at the end of a Hydra multirun. Runs that differ only in their
seeds (``seed``, ``attack.seed``) are also aggregated: mean, standard deviation and count per
group in ``summary_seeds.csv`` and summary.md, and as error bars in the plots, whose x axes are
never a seed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Optional

import pandas as pd
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from omegaconf import DictConfig

from uap_lightning.atomic import atomic_write_text
from uap_lightning.console import quiet_sweep_plugins
from uap_lightning.report.compare import write_compare
from uap_lightning.report.figures import save_figure
from uap_lightning.rundir import FAILURE_FILE, METRICS_FILE, STALE_DIR

log = logging.getLogger(__name__)

OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
OPTUNA_RESULTS = "optimization_results.yaml"  # what Hydra's Optuna sweeper leaves in the sweep folder
SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
SEEDS_CSV = "summary_seeds.csv"
SEED_KEYS = ("seed", "attack.seed")  # overrides whose runs are repeats, aggregated, never plotted as x
# How a swept key reads on a plot's axis (units where it has them).
AXIS_LABELS = {
    "attack.eps": "ε, 0–255 pixel units",
    "attack.delta": "δ (stop at a fooling rate of 1 − δ on X)",
    "attack.max_passes": "passes over X at most",
    "data.attack_images": "images in X",
}

STATUSES = ("ok", "interrupted", "failed", "incomplete")
PLOTTED_STATUSES = ("ok", "interrupted")
SKIPPED_DIRS = frozenset({STALE_DIR, ".hydra"})
RESERVED_COLUMNS = ("job", "overrides", "status", "error", "run_dir")
MARKDOWN_METRICS = (
    "fooling_rate",
    "fooling_rate_attack_set",
    "random_fooling_rate",
    "random_same_l2_fooling_rate",
    "clean_accuracy",
    "perturbed_accuracy",
    "norm_linf",
    "norm_l2",
    "attack_seconds",
)
# Random baselines drawn beside each fooling-rate line: column, legend text, line style.
BASELINES = (
    ("random_fooling_rate", "random noise of norm ε", "--"),
    ("random_same_l2_fooling_rate", "random direction, ℓ2 norm of v", "-."),
)
SHARED_BASELINE_GREYS = ("0.35", "0.6", "0.15", "0.75")  # of baselines that several lines share
_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def collect_runs(root: str | os.PathLike) -> pd.DataFrame:
    """One row per run folder under ``root`` (recursive, ``stale`` folders skipped), in natural order.

    Columns: ``job`` (path relative to ``root``), ``overrides`` (space-joined), one column per
    override key (parsed value), ``status``, ``error``, every scalar metric, ``run_dir`` (absolute).
    A metric named like an override key or a fixed column is stored as ``metrics.<name>``.
    ``df.attrs["override_keys"]`` lists the override-key columns.
    """
    root = Path(root).resolve()
    runs = sorted(_run_dirs(root), key=lambda d: _natural_key(d.relative_to(root).as_posix()))
    records = [_read_run(run_dir) for run_dir in runs]
    override_keys = _ordered_union(record["overrides"] for record in records)
    taken = set(RESERVED_COLUMNS) | set(override_keys)
    rows: List[Dict[str, Any]] = []
    for run_dir, record in zip(runs, records):
        row: Dict[str, Any] = {
            "job": run_dir.relative_to(root).as_posix(),
            "overrides": " ".join(record["override_texts"]),
            **record["overrides"],
            "status": record["status"],
            "error": record["error"],
        }
        row.update({(f"metrics.{k}" if k in taken else k): v for k, v in record["metrics"].items()})
        row["run_dir"] = str(run_dir)
        rows.append(row)
    metric_columns = [c for c in _ordered_union(rows) if c not in taken]
    df = pd.DataFrame(rows, columns=["job", "overrides", *override_keys, "status", "error", *metric_columns, "run_dir"])
    df.attrs["override_keys"] = override_keys
    return df


def swept_keys(df: pd.DataFrame) -> List[str]:
    """The override keys of ``collect_runs`` whose value is not the same in every row."""
    return [key for key in df.attrs.get("override_keys", []) if df[key].nunique(dropna=False) > 1]


def write_summary(root: str | os.PathLike, df: Optional[pd.DataFrame] = None) -> Dict[str, Path]:
    """Write ``summary.csv``, ``summary.md``, ``summary_seeds.csv`` (when a seed is swept), the
    ``fooling_vs_<key>.png``/``.pdf`` plots and, for the cells of a ``task=compare``, its table
    (:func:`~uap_lightning.report.compare.write_compare`) into ``root``.

    ``df`` defaults to ``collect_runs(root)``. Returns the written paths by file name (PNG names
    for the plots).
    """
    root = Path(root)
    if df is None:
        df = collect_runs(root)
    swept = swept_keys(df)
    seeds = aggregate_seeds(df)
    paths = {SUMMARY_CSV: root / SUMMARY_CSV, SUMMARY_MD: root / SUMMARY_MD}
    atomic_write_text(paths[SUMMARY_CSV], df.to_csv(index=False))
    atomic_write_text(paths[SUMMARY_MD], _markdown(df, swept, seeds))
    if seeds is not None:
        paths[SEEDS_CSV] = root / SEEDS_CSV
        atomic_write_text(paths[SEEDS_CSV], seeds.to_csv(index=False))
    paths.update(write_compare(root, df))
    plotted = df[df["status"].isin(PLOTTED_STATUSES)]
    if "fooling_rate" not in plotted or plotted["fooling_rate"].isna().all():
        return paths
    best = _optuna_best(root)
    for key in (k for k in swept if k not in SEED_KEYS):
        values = pd.to_numeric(plotted[key], errors="coerce")  # failed jobs' values may be text
        if values.notna().all() and not pd.api.types.is_bool_dtype(plotted[key]):
            png = root / f"fooling_vs_{key.replace('.', '_')}.png"
            others = [k for k in swept if k != key and k not in SEED_KEYS]
            save_figure(fooling_figure(plotted.assign(**{key: values}), key, others, best), png)
            paths[png.name] = png
    return paths


def aggregate_seeds(df: pd.DataFrame) -> Optional[pd.DataFrame]:
    """Mean, standard deviation (ddof 1) and count of every metric over runs (ok or interrupted)
    that differ only in a swept seed, one row per group of the other swept keys; None when no
    seed is swept."""
    swept = swept_keys(df)
    seeds = [key for key in swept if key in SEED_KEYS]
    if not seeds:
        return None
    groups = [key for key in swept if key not in SEED_KEYS]
    runs = df[df["status"].isin(PLOTTED_STATUSES)]
    metrics = [m for m in MARKDOWN_METRICS if m in runs and _is_number_column(runs[m])]
    grouped = runs.groupby(groups, sort=False, dropna=False) if groups else runs.groupby(lambda _: 0)
    table = grouped[metrics].agg(["mean", "std"])
    table.columns = [f"{metric}_{stat.replace('std', 'sd')}" for metric, stat in table.columns]
    table.insert(0, "n", grouped.size())
    return table.reset_index(drop=not groups)


def summarize(root: str | os.PathLike) -> Dict[str, Path]:
    """``collect_runs`` and ``write_summary`` for ``root``; writes nothing when it holds no runs."""
    df = collect_runs(root)
    if df.empty:
        log.warning("No runs under %s: no sweep summary written", root)
        return {}
    paths = write_summary(root, df)
    log.info("Sweep summary of %d runs: %s", len(df), ", ".join(str(p) for p in paths.values()))
    return paths


class SweepSummaryCallback(Callback):
    """Hydra callback: summarize the sweep folder when a multirun ends, and count its failed jobs
    (``SweepSummaryCallback.failed``, which sets the sweep's exit status).

    On by default as ``hydra.callbacks.sweep_summary`` (conf/hydra/default.yaml).
    A failing report is logged, never raised, so it cannot hide the sweep's results.
    """

    failed = 0  # failed or incomplete jobs of the last sweep that ended in this process

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Quiet the sweep plugins' settings lines before the sweeper starts."""
        quiet_sweep_plugins()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Write the summary into ``hydra.sweep.dir``."""
        try:
            summarize(config.hydra.sweep.dir)
            statuses = collect_runs(config.hydra.sweep.dir)["status"]
            SweepSummaryCallback.failed = int(statuses.isin(("failed", "incomplete")).sum())
        except Exception:
            log.exception("Sweep summary of %s failed", config.hydra.sweep.dir)


def _run_dirs(root: Path) -> List[Path]:
    """Run folders under ``root`` (``root`` included), never inside ``stale`` or ``.hydra`` folders."""
    found = []
    for folder, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in SKIPPED_DIRS]
        folder_path = Path(folder)
        if METRICS_FILE in files or (folder_path / OVERRIDES_FILE).is_file():
            found.append(folder_path)
    return found


def _natural_key(text: str) -> List[Any]:
    """Sort key that orders digit runs by value: ``job2`` before ``job10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _ordered_union(mappings) -> List[str]:
    """All keys of ``mappings``, in order of first appearance."""
    return list(dict.fromkeys(key for mapping in mappings for key in mapping))


def _read_run(run_dir: Path) -> Dict[str, Any]:
    """Overrides (texts and parsed key → value), status, error and scalar metrics of one run folder."""
    texts = _read_overrides(run_dir / OVERRIDES_FILE)
    record: Dict[str, Any] = {
        "override_texts": texts,
        "overrides": _parse_overrides(texts),
        "status": "incomplete",
        "error": "",
        "metrics": {},
    }
    metrics_path, failure_path = run_dir / METRICS_FILE, run_dir / FAILURE_FILE
    if metrics_path.is_file():
        try:
            metrics = _read_json_object(metrics_path)
        except ValueError as exc:
            return {**record, "status": "failed", "error": f"unreadable {METRICS_FILE}: {exc}"}
        scalars = {k: _number_or_text(v) for k, v in metrics.items() if isinstance(v, (int, float, bool, str))}
        return {**record, "status": "interrupted" if metrics.get("interrupted") is True else "ok", "metrics": scalars}
    if failure_path.is_file():
        try:
            error = str(_read_json_object(failure_path).get("error", ""))
        except ValueError as exc:
            error = f"unreadable {FAILURE_FILE}: {exc}"
        return {**record, "status": "failed", "error": error.splitlines()[0] if error else ""}
    return record


def _read_json_object(path: Path) -> Dict[str, Any]:
    """The JSON object in ``path``; ``ValueError`` when it is not valid JSON or not an object."""
    with open(path, encoding="utf-8") as f:
        value = json.load(f)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _read_overrides(path: Path) -> List[str]:
    """The override strings Hydra stored for a job; empty when there is no such file."""
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        overrides = yaml.safe_load(f)
    return [str(item) for item in overrides] if isinstance(overrides, list) else []


def _parse_overrides(texts: List[str]) -> Dict[str, Any]:
    """Overrides as key → value, parsed by Hydra's own parser (``+``/``++`` dropped, ``hydra.*`` and
    deletions skipped). Lists, mappings and non-finite numbers (``attack.p=inf``) stay text, so
    that they are categories, not positions on an axis."""
    try:
        overrides = OverridesParser.create().parse_overrides(texts)
    except HydraException:
        return {}
    parsed: Dict[str, Any] = {}
    for override in overrides:
        key = override.key_or_group
        if override.is_delete() or key.startswith("hydra."):
            continue
        value = override.value()
        scalar = (
            value is None or isinstance(value, (int, bool, str)) or (isinstance(value, float) and math.isfinite(value))
        )
        parsed[key] = value if scalar else override.get_value_element_as_str()
    return parsed


def _number_or_text(value: Any) -> Any:
    """``"inf"``, ``"-inf"`` and ``"nan"`` (as metrics.json stores them) as floats; other values unchanged."""
    return _NON_FINITE.get(value, value) if isinstance(value, str) else value


def _is_number_column(column: pd.Series) -> bool:
    """Whether ``column`` holds numbers (not booleans) that a plot can use as x."""
    return pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)


def _markdown(df: pd.DataFrame, swept: List[str], seeds: Optional[pd.DataFrame]) -> str:
    """A count of runs by status, a readable table of the runs, and (seeds swept) the mean ± sd
    and count per group of runs that differ only in their seeds."""
    counts = df["status"].value_counts()
    by_status = ", ".join(f"{counts[s]} {s}" for s in STATUSES if s in counts)
    columns = ["job", *swept, "status", "error", *(m for m in MARKDOWN_METRICS if m in df)]
    table = df[columns]
    text_columns = [i for i, c in enumerate(columns) if not _is_number_column(table[c])]
    cells = table.astype(object).where(table.notna(), None)
    for i in text_columns:
        cells[columns[i]] = cells[columns[i]].map(lambda v: v.replace("|", r"\|") if isinstance(v, str) else v)
    body = cells.to_markdown(index=False, floatfmt=".4g", missingval="", disable_numparse=text_columns)
    text = f"# Sweep summary\n\n{len(df)} runs: {by_status}.\n\n{body}\n"
    if seeds is not None:
        text += f"\n## Over seeds (mean ± sd, n runs)\n\n{_seeds_markdown(seeds)}\n"
    return text


def _seeds_markdown(seeds: pd.DataFrame) -> str:
    """The seed aggregate as mean ± sd cells."""
    metrics = [c[: -len("_mean")] for c in seeds.columns if c.endswith("_mean")]
    keys = [c for c in seeds.columns if c != "n" and not c.endswith(("_mean", "_sd"))]
    cells = seeds[keys + ["n"]].astype(object).copy()
    for metric in metrics:
        mean, sd = seeds[f"{metric}_mean"], seeds[f"{metric}_sd"]
        cells[metric] = [f"{m:.4g} ± {d:.2g}" if pd.notna(d) else f"{m:.4g}" for m, d in zip(mean, sd)]
    return cells.to_markdown(index=False, disable_numparse=True)


def _optuna_best(root: Path) -> Dict[str, Any]:
    """The best trial's parameters of an Optuna sweep in ``root`` (empty when there is none)."""
    path = root / OPTUNA_RESULTS
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        results = yaml.safe_load(f) or {}
    return dict(results.get("best_params") or {})


def fooling_figure(df: pd.DataFrame, key: str, others: List[str], best: Dict[str, Any]) -> Figure:
    """Fooling rate against ``key``, one solid line per combination of ``others``: the mean over the
    runs at each x (seeds and repeats), with error bars of their standard deviation when there are
    several; the random baselines dashed, each distinct curve once (:func:`_draw_baselines`); an
    Optuna sweep's target (a dotted line) and best trial (a star). The title names the victims and
    the data of the runs."""
    baselines = [b for b in BASELINES if b[0] in df and df[b[0]].notna().any()]
    groups = list(df.groupby(others, sort=False, dropna=False)) if others else [((), df)]
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    handles: List[Any] = []  # what the legend shows: error bars, lines
    for i, (group_values, group) in enumerate(groups):
        label = ", ".join(f"{k}={v}" for k, v in zip(others, group_values)) or "universal perturbation"
        points = group.groupby(key)["fooling_rate"].agg(["mean", "std", "count"])
        spread = points["std"].where(points["count"] > 1)
        handles.append(
            ax.errorbar(
                points.index,
                points["mean"],
                yerr=spread,
                fmt="-o",
                color=f"C{i % 10}",
                capsize=3,
                label=label + (" (mean ± sd)" if spread.notna().any() else ""),
            )
        )
    handles += _draw_baselines(ax, df, key, others, groups, baselines)
    if "target_fooling_rate" in df and df["target_fooling_rate"].notna().any():
        target = float(df["target_fooling_rate"].dropna().iloc[0])
        handles.append(ax.axhline(target, color="black", linestyle=":", label=f"target fooling rate {target:g}"))
    if key in best:
        trial = df[df[key] == best[key]]
        if not trial.empty:
            handles += ax.plot(
                best[key],
                trial["fooling_rate"].mean(),
                "*",
                color="black",
                markersize=15,
                label=f"best trial: {key}={best[key]:.4g}",
            )
    ax.legend(handles=handles, fontsize=8)
    ax.set_xlabel(_axis_label(df, key))
    ax.set_ylabel("fooling rate (share of eval images)")
    ax.set_title(textwrap.fill(f"Fooling rate against {key}{_victims_and_data(df)}", 90), fontsize=10)
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.3)
    return fig


def _draw_baselines(
    ax, df: pd.DataFrame, key: str, others: List[str], groups: List[Any], baselines: List[Any]
) -> List[Line2D]:
    """Draw each random baseline once per distinct curve: lines of the same victim and data whose
    baseline has the same points (the noise of norm ε of several engines) share one line, in grey,
    with a legend entry naming what those lines have in common; a baseline of one line alone is
    drawn in that line's colour, under one legend entry per baseline. Returns the legend handles."""
    handles: List[Line2D] = []
    for column, name, style in baselines:
        curves: Dict[Any, List[int]] = {}  # (victim, data, points) → indices of the groups that have it
        for i, (_, group) in enumerate(groups):
            points = group.groupby(key)[column].mean().dropna()
            if points.empty:
                continue
            identity = (_victims_and_data(group), tuple(points.index), tuple(points.to_numpy()))
            curves.setdefault(identity, []).append(i)
        alone = False
        for shade, ((_, xs, ys), members) in enumerate(curves.items()):
            if len(members) == 1 and len(groups) > 1:
                ax.plot(xs, ys, linestyle=style, color=f"C{members[0] % 10}")
                alone = True
                continue
            common = [
                f"{k}={v}"
                for k, v in zip(others, groups[members[0]][0])
                if all(groups[m][0][others.index(k)] == v for m in members)
            ]
            colour = "C0" if len(groups) == 1 else SHARED_BASELINE_GREYS[shade % len(SHARED_BASELINE_GREYS)]
            handles += ax.plot(
                xs, ys, linestyle=style, color=colour, label=name + (f" ({', '.join(common)})" if common else "")
            )
        if alone:
            handles.append(Line2D([], [], color="gray", linestyle=style, label=f"{name} (in its line's colour)"))
    return handles


def _victims_and_data(df: pd.DataFrame) -> str:
    """ ": <victims> on <data>" of the runs in ``df`` (from their metrics, or the ``model`` and ``data``
    overrides), each list in order of appearance; empty when neither is known."""
    names = []
    for setting in ("model", "data"):
        column = next((c for c in (f"metrics.{setting}", setting) if c in df), None)
        values = df[column].dropna().astype(str).unique().tolist() if column else []
        names.append(", ".join(values))
    victims, data = names
    if not victims and not data:
        return ""
    return ": " + (f"{victims} on {data}" if victims and data else victims or f"on {data}")


def _axis_label(df: pd.DataFrame, key: str) -> str:
    """``key`` with what it means and its units; ε also with its norm when the runs share one."""
    label = f"{key}: {AXIS_LABELS[key]}" if key in AXIS_LABELS else key
    if key == "attack.eps" and "p" in df and df["p"].nunique() == 1:
        label += f", ℓ{'∞' if str(df['p'].iloc[0]) == 'inf' else df['p'].iloc[0]}"
    return label
