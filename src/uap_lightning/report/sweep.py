"""The report of a sweep: one table of all runs under a folder, and fooling-rate plots.

A run folder is a directory holding ``.hydra/overrides.yaml`` (a Hydra job) or
``metrics.json`` (a finished run). Its status comes from the files it left:

- ``metrics.json`` with ``"interrupted": true``: ``interrupted``;
- ``metrics.json``: ``ok``;
- ``failure.json`` (``{"status": "failed", "error": "<ExceptionType>: <message>",
  "traceback": "..."}``, written by a failing job): ``failed``, with the error's first line;
- neither: ``incomplete`` (still running, or killed).

``summarize(folder)`` writes ``summary.csv``, ``summary.md`` and one
``fooling_vs_<key>.png`` per swept numeric override into the folder;
``SweepSummaryCallback`` does so at the end of a Hydra multirun.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from hydra.experimental.callback import Callback  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

from uap_lightning.atomic import atomic_write, atomic_write_text  # noqa: E402
from uap_lightning.rundir import FAILURE_FILE, METRICS_FILE, STALE_DIR  # noqa: E402

log = logging.getLogger(__name__)

OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"

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
    ("random_fooling_rate", "random noise, norm ξ", "--"),
    ("random_same_l2_fooling_rate", "random noise, ℓ2 of v", "-."),
)
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
    """Write ``summary.csv``, ``summary.md`` and the ``fooling_vs_<key>.png`` plots into ``root``.

    ``df`` defaults to ``collect_runs(root)``. Returns the written paths by file name.
    """
    root = Path(root)
    if df is None:
        df = collect_runs(root)
    swept = swept_keys(df)
    paths = {SUMMARY_CSV: root / SUMMARY_CSV, SUMMARY_MD: root / SUMMARY_MD}
    atomic_write_text(paths[SUMMARY_CSV], df.to_csv(index=False))
    atomic_write_text(paths[SUMMARY_MD], _markdown(df, swept))
    plotted = df[df["status"].isin(PLOTTED_STATUSES)]
    if "fooling_rate" not in plotted or plotted["fooling_rate"].isna().all():
        return paths
    for key in swept:
        if _is_number_column(df[key]):
            png = root / f"fooling_vs_{key.replace('.', '_')}.png"
            data = _fooling_plot(plotted, key, [k for k in swept if k != key])
            atomic_write(png, lambda f, data=data: f.write(data))
            paths[png.name] = png
    return paths


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
    """Hydra callback: summarize the sweep folder when a multirun ends.

    On by default as ``hydra.callbacks.sweep_summary`` (conf/hydra/default.yaml).
    A failing report is logged, never raised, so it cannot hide the sweep's results.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Write the summary into ``hydra.sweep.dir``."""
        try:
            summarize(config.hydra.sweep.dir)
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
        except ValueError as error:
            return {**record, "status": "failed", "error": f"unreadable {METRICS_FILE}: {error}"}
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
    """``key=value`` overrides as key → parsed value; ``+``/``++`` dropped, ``hydra.*`` and deletions skipped."""
    parsed: Dict[str, Any] = {}
    for text in texts:
        key, sep, value = text.partition("=")
        key = key.lstrip("+")
        if sep and not key.startswith(("~", "hydra.")):
            parsed[key] = _parse_value(value)
    return parsed


def _parse_value(text: str) -> Any:
    """A scalar override value read as OmegaConf reads YAML (``32`` → 32, ``1e-3`` → 0.001, ``inf`` stays text).

    Lists, mappings and text that is not valid YAML stay the original text.
    """
    try:
        value = OmegaConf.to_container(OmegaConf.create(f"value: {text}"))["value"]
    except (yaml.YAMLError, OmegaConfBaseException):
        return text
    return value if value is None or isinstance(value, (int, float, bool, str)) else text


def _number_or_text(value: Any) -> Any:
    """``"inf"``, ``"-inf"`` and ``"nan"`` (as metrics.json stores them) as floats; other values unchanged."""
    return _NON_FINITE.get(value, value) if isinstance(value, str) else value


def _is_number_column(column: pd.Series) -> bool:
    """Whether ``column`` holds numbers (not booleans) that a plot can use as x."""
    return pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)


def _markdown(df: pd.DataFrame, swept: List[str]) -> str:
    """A count of runs by status, then a readable table of the runs."""
    counts = df["status"].value_counts()
    by_status = ", ".join(f"{counts[s]} {s}" for s in STATUSES if s in counts)
    columns = ["job", *swept, "status", "error", *(m for m in MARKDOWN_METRICS if m in df)]
    table = df[columns]
    text_columns = [i for i, c in enumerate(columns) if not _is_number_column(table[c])]
    cells = table.astype(object).where(table.notna(), None)
    for i in text_columns:
        cells[columns[i]] = cells[columns[i]].map(lambda v: v.replace("|", r"\|") if isinstance(v, str) else v)
    body = cells.to_markdown(index=False, floatfmt=".4g", missingval="", disable_numparse=text_columns)
    return f"# Sweep summary\n\n{len(df)} runs: {by_status}.\n\n{body}\n"


def _fooling_plot(df: pd.DataFrame, key: str, others: List[str]) -> bytes:
    """PNG bytes: fooling rate against ``key``, one solid line per combination of ``others``.

    Each line's random baselines are drawn dashed in its colour; repeated x values are averaged.
    """
    baselines = [b for b in BASELINES if b[0] in df]
    values = ["fooling_rate", *(column for column, _, _ in baselines)]
    groups = list(df.groupby(others, sort=False, dropna=False)) if others else [((), df)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    handles = []
    for i, (group_values, group) in enumerate(groups):
        color = f"C{i % 10}"
        label = ", ".join(f"{k}={v}" for k, v in zip(others, group_values)) or "UAP"
        points = group.groupby(key)[values].mean()
        (line,) = ax.plot(points.index, points["fooling_rate"], "-o", color=color, label=label)
        handles.append(line)
        for column, name, style in baselines:
            ax.plot(points.index, points[column], linestyle=style, color=color, label=name)
            if not others:
                handles.append(ax.lines[-1])
    if others:
        handles += [Line2D([], [], color="gray", linestyle=style, label=name) for _, name, style in baselines]
    ax.legend(handles=handles, fontsize=8)
    ax.set_xlabel(key)
    ax.set_ylabel("fooling rate")
    ax.set_title(f"Fooling rate against {key}")
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
