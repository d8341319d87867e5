"""``python -m uap_lightning.report DIR [DIR ...]``: write the sweep summary of each folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from uap_lightning.report.sweep import collect_runs, write_summary


def main(argv: Optional[List[str]] = None) -> int:
    """Summarize each folder given; 2 when one is missing or holds no runs."""
    parser = argparse.ArgumentParser(
        prog="python -m uap_lightning.report",
        description="Write summary.csv, summary.md and fooling-rate plots (fooling_vs_<key>.png) "
        "into each folder, from the run folders under it: a Hydra sweep folder or any folder "
        "of runs, finished or partial; for the cells of a task=compare also compare.csv, "
        "compare.md, compare.png and tensorboard/compare.",
    )
    parser.add_argument(
        "dirs", nargs="+", type=Path, metavar="DIR", help="folder to summarize (searched recursively for runs)"
    )
    args = parser.parse_args(argv)
    for folder in args.dirs:
        if not folder.is_dir():
            return _fail(f"{folder}: not a folder")
        runs = collect_runs(folder)
        if runs.empty:
            return _fail(f"{folder}: no runs found (no metrics.json or .hydra/overrides.yaml)")
        for path in write_summary(folder, runs).values():
            print(path)
    return 0


def _fail(message: str) -> int:
    """Print ``message`` as one line on stderr; return the usage-error status."""
    print(f"python -m uap_lightning.report: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
