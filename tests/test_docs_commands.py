"""Every run command shown in README.md and docs/*.md composes and passes the settings checks.

Commands are taken from the fenced code blocks: ``python -m uap_lightning.run ...``,
``python -m uap_lightning.bench ...`` and ``make run|demo|imagenet|bench ARGS="..."``. A sweep
(``-m``) is checked at the first value of each comma list. The checks are those that need neither
data nor weights: the schema (unknown keys, a task or engine that differs from its preset) and
the attack's settings.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

from conftest import compose_config
from uap_lightning.validation import attack_settings, check_schema

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
MAKE_PRESETS = {"run": (), "demo": ("experiment=imagenet_demo",), "imagenet": ("experiment=imagenet_lite0",)}
ENVIRONMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")
INLINE = re.compile(r"`([^`]*(?:uap_lightning\.run|make \w+ ARGS=)[^`]*)`")
TEMPLATE = re.compile(r"^[A-Z][A-Z_]+$")  # attack=ENGINE
PLACEHOLDER = re.compile(r"<[^<>]*>")  # <partition>: a value the reader fills in


def code_lines(text: str) -> Iterator[str]:
    """The logical lines (continuations joined) of the shell and unlabelled code blocks of ``text``,
    and the inline code spans of its prose."""
    inside, label, pending = False, "", ""
    for line in text.splitlines():
        fence = FENCE.match(line.strip())
        if fence:
            inside, label = (not inside, fence[1]) if not inside else (False, "")
            continue
        if not inside:
            yield from INLINE.findall(line)
            continue
        if label not in ("bash", "sh", ""):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield pending + line
        pending = ""


def split_top_level(value: str) -> List[str]:
    """``value`` split at the commas outside brackets (a sweep's choices)."""
    parts, depth, current = [], 0, ""
    for char in value:
        if char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current]


def overrides_of(line: str) -> Tuple[str, List[str]] | None:
    """(config name, overrides) of the run command on ``line``; None when it holds none or is a
    template (``attack=ENGINE``, ``ARGS="..."``: its rows are commands of their own)."""
    line = line.split(" #", 1)[0].strip()
    try:
        words = shlex.split(line)
    except ValueError:
        return None
    while words and ENVIRONMENT.match(words[0]):
        words.pop(0)
    command = _command(words)
    if command is None or "..." in line or any(TEMPLATE.match(o.split("=", 1)[1]) for o in command[1]):
        return None
    return command[0], [PLACEHOLDER.sub("placeholder", o) for o in command[1]]


def _command(words: List[str]) -> Tuple[str, List[str]] | None:
    if len(words) > 1 and words[0] == "make" and words[1] in (*MAKE_PRESETS, "bench"):
        arguments = [w[len("ARGS=") :] for w in words[2:] if w.startswith("ARGS=")]
        extra = shlex.split(arguments[0]) if arguments else []
        return ("bench" if words[1] == "bench" else "config"), [*MAKE_PRESETS.get(words[1], ()), *extra]
    for module, config in (("uap_lightning.run", "config"), ("uap_lightning.bench", "bench")):
        if module in words:
            arguments = words[words.index(module) + 1 :]
            overrides = [a for a in arguments if not a.startswith(("-", "[")) and "=" in a]
            if "-m" in arguments or "--multirun" in arguments:
                overrides = [
                    f"{key}={split_top_level(value)[0]}" for key, value in (o.split("=", 1) for o in overrides)
                ]
            engines = [o.split("=", 1)[1].strip("[]") for o in overrides if o.startswith("task.engines=")]
            if "task=compare" in overrides and engines:  # a compare is checked at its first cell's engine
                overrides.append(f"attack={split_top_level(engines[0])[0]}")
            return config, overrides
    return None


def documented_commands() -> List[Tuple[str, str, List[str]]]:
    found = []
    for document in DOCUMENTS:
        for line in code_lines(document.read_text(encoding="utf-8")):
            command = overrides_of(line)
            if command is not None:
                found.append((f"{document.name}: {line.strip()[:90]}", *command))
    return found


COMMANDS = documented_commands()


def test_the_documents_show_run_commands():
    """The extraction finds the documents' commands (a broken one would make the test below empty)."""
    names = {label.split(":")[0] for label, _, _ in COMMANDS}
    assert {"README.md", "running.md", "imagenet.md", "experiments.md"} <= names
    assert len(COMMANDS) > 30


def test_a_sweep_is_checked_at_its_first_values():
    assert overrides_of("python -m uap_lightning.run -m attack.eps=32,64 'task.victims=[a,b]'") == (
        "config",
        ["attack.eps=32", "task.victims=[a,b]"],
    )
    assert overrides_of(
        "python -m uap_lightning.run -m task=compare 'task.engines=[trm_uap,gd_uap]' ++attack.prior=jigsaw"
    ) == (
        "config",
        ["task=compare", "task.engines=[trm_uap,gd_uap]", "++attack.prior=jigsaw", "attack=trm_uap"],
    )
    assert overrides_of('UAP_DATA_DIR=/d make imagenet ARGS="attack.max_passes=3"') == (
        "config",
        ["experiment=imagenet_lite0", "attack.max_passes=3"],
    )


@pytest.mark.parametrize("label,config,overrides", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_documented_command_composes_and_passes_the_settings_checks(label, config, overrides, tmp_path):
    cfg = compose_config(overrides, tmp_path, config_name=config)
    check_schema(cfg)
    attack_settings(cfg)


@pytest.mark.parametrize(
    "group", ["task", "experiment", "attack", "model", "data", "logger", "callbacks", "trainer", "hparams_search"]
)
def test_the_configuration_table_lists_every_option_of_its_group(group):
    """docs/running.md's table of config groups names every yaml of the group in conf/."""
    text = (ROOT / "docs" / "running.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith(f"| `{group}` |"))
    options = sorted(path.stem for path in (ROOT / "src" / "uap_lightning" / "conf" / group).glob("*.yaml"))
    missing = [name for name in options if f"`{name}`" not in row]
    assert not missing, f"docs/running.md's {group} row misses {missing}"
