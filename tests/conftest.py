"""Shared fixtures: configs composed with Hydra into a temporary directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

import uap_lightning
from uap_lightning.config import register_configs
from uap_lightning.tasks import task_schemas
from uap_lightning.threads import THREADS_VARIABLE, available_cores

# One thread count for every run of the suite (the cores shared among pytest-xdist's workers), so
# that two runs of one config match bit for bit whatever the load when each starts.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
os.environ.setdefault(THREADS_VARIABLE, str(max(1, available_cores() // _WORKERS)))

CONF_DIR = Path(uap_lightning.__file__).parent / "conf"

# Quiet, small settings every composed test config gets.
QUIET = ("extras.progress_bar=false", "trainer.enable_progress_bar=false")


def compose_config(overrides: Sequence[str], root: Path, config_name: str = "config") -> DictConfig:
    """The run (or ``config_name="bench"``) config for ``overrides``, with every path inside ``root``."""
    register_configs(task_schemas())
    paths = (
        f"paths.root_dir={root}",
        f"paths.data_dir={root / 'data'}",
        f"paths.cache_dir={root / 'cache'}",
        f"paths.output_dir={root / 'run'}",
    )
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=[*paths, *QUIET, *overrides])
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """``make_cfg("attack.eps=64", ...)`` composes a config rooted in this test's tmp_path."""
    return lambda *overrides: compose_config(overrides, tmp_path)
