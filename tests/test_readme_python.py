"""The README's Python example runs as written, on a CPU, and shows the phenomenon."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_python_example_runs_as_written(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(block for block in blocks if "compute_uap" in block)
    exec(compile(example, str(README), "exec"), {})
    held_out, random_rate, beats = capsys.readouterr().out.split()[:3]
    assert float(held_out) > float(random_rate) + 0.1 and beats == "True"
