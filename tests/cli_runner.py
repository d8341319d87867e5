"""The command line run in this process, for tests where a new process is not the point: the
same entry (``uap_lightning.run.main``), arguments, environment and working folder as a
subprocess would get, its exit code and console output; the logging, thread and Hydra state it
changes are put back afterwards."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch
from hydra.core.global_hydra import GlobalHydra


@dataclass
class Done:
    """What a subprocess.run would report: the exit code and the console's two streams."""

    returncode: int
    stdout: str
    stderr: str


def run_in_process(
    monkeypatch, capfd, cwd: Path, *arguments: str, env: Optional[Dict[str, str]] = None, entry: str = "main"
) -> Done:
    """``uap-lightning ARGUMENTS`` (``entry``: "main" or "bench_main") in ``cwd`` with ``env`` set."""
    from uap_lightning import run

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["uap-lightning", *arguments])
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    root = logging.getLogger()
    handlers, level, threads = root.handlers[:], root.level, torch.get_num_threads()
    capfd.readouterr()  # what the test printed before is not the command's
    try:
        getattr(run, entry)()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
        torch.set_num_threads(threads)
        GlobalHydra.instance().clear()
    captured = capfd.readouterr()
    return Done(code, captured.out, captured.err)
