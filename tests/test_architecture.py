"""The import architecture declared in pyproject.toml ([tool.importlinter]): entries on top and
registries passed down from them, attack engines pure torch, no import cycles."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_imports_keep_the_declared_contracts():
    # In its own process: import-linter's command line reconfigures logging (dictConfig disables
    # every existing logger), which would silence the loggers other tests read through caplog.
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint_imports), str(ROOT / "pyproject.toml"), "--no-cache", "--no-logo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    assert "BROKEN" not in report and report.count("KEPT") == 3
