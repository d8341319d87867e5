"""The import architecture declared in pyproject.toml ([tool.importlinter]): entries on top and
registries passed down from them, attack engines pure torch, no import cycles."""

from pathlib import Path

from importlinter.cli import lint_imports

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_imports_keep_the_declared_contracts(capsys):
    status = lint_imports(config_filename=str(PYPROJECT), no_cache=True, no_logo=True)
    report = capsys.readouterr().out
    assert status == 0, report
    assert "BROKEN" not in report and report.count("KEPT") == 3
