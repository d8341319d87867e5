"""What to say when the command line's settings cannot be composed into a config: a did-you-mean
for an unknown key or group option, the units of an ε typed as a fraction. Free of Lightning, so
that a typo is refused before the tasks are imported."""

from __future__ import annotations

import difflib
import re
from typing import Sequence, cast

from hydra.errors import MissingConfigException
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from uap_lightning.attacks import ENGINES
from uap_lightning.units import to_pixel_units


def unknown_key_message(prefix: str, key: str, known: Sequence[str], rest: str = "") -> str:
    """What to say of the unknown ``key`` under ``prefix`` (``"attack."``, or ``""`` at the top): the
    closest of the ``known`` keys as a did-you-mean, keeping ``rest`` (what followed the key in the
    override: ``".eps=10"``, ``"=10"``), and the keys that node takes."""
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {prefix}{close[0]}{rest}?" if close else ""
    return f"unknown setting {prefix}{key}{rest}{hint} ({prefix.rstrip('.') or 'the config'} takes: {', '.join(known)})"


def engines_taking(key: str) -> list[str]:
    """The engines that have an option named ``key``, in registry order."""
    return [name for name, engine in ENGINES.items() if key in engine.option_names()]


def other_engines_option_message(key: str, rest: str, owners: Sequence[str], method: str) -> str:
    """What to say of ``attack.<key><rest>`` typed for ``attack=<method>`` when ``key`` is an option of
    the engines ``owners`` only: choose one of them first, or, where the engine is chosen per job
    (``task=compare``), set the key with ``++``."""
    return (
        f"unknown setting attack.{key}{rest}: {key} is an option of {', '.join(owners)}, not of attack={method}; "
        f"choose the engine first (attack={owners[0]} attack.{key}{rest}), or with task=compare, where each cell "
        f"chooses its engine, write ++attack.{key}{rest}"
    )


_FRACTION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*/\s*(\d+(?:\.\d*)?)\s*$")  # "8/255"


def eps_text_message(key: str, text: str) -> str:
    """What to say of an ε setting ``key`` (0–255 pixel units) given as the text ``text``: for a
    fraction such as 8/255 ([0,1] units), the value in 0–255 units to type instead."""
    fraction = _FRACTION.match(text)
    if fraction and float(fraction[2]) > 0:
        numerator, denominator = float(fraction[1]), float(fraction[2])
        pixels = numerator if denominator == 255 else to_pixel_units(numerator / denominator)
        return f"{key} is in 0–255 pixel units: use {key}={pixels:.4g} (not {text.strip()})"
    return f"{key} must be a number in 0–255 pixel units (e.g. {key}=10); got {text!r}"


def composition_error_message(err: BaseException, overrides: Sequence[str]) -> str:
    """What to tell of ``err``, raised by Hydra composing the config from the command line's
    ``overrides``: a did-you-mean for an unknown key (never Hydra's advice to add it with ``+``),
    the units for an ε given as text such as 8/255; else Hydra's message and its cause's."""
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and "/" in err.missing_cfg_file:
        group, _, option = err.missing_cfg_file.rpartition("/")
        options = [str(o) for o in err.options or []]
        close = difflib.get_close_matches(option, options, n=1, cutoff=0.6)
        hint = f"; did you mean {group}={close[0]}?" if close else ""
        return f"{group}={option} is not an option of {group}{hint} ({group}: {', '.join(options)})"
    cause = err.__cause__
    full_key = str(getattr(cause, "full_key", "") or "")
    if (
        isinstance(cause, (ConfigKeyError, ConfigAttributeError))
        and isinstance(cause.parent_node, DictConfig)
        and full_key
    ):
        key = str(cause.key)
        prefix = full_key[: -len(key)] if full_key.endswith(key) else ""
        typed = [o for o in overrides if re.match(rf"{re.escape(full_key)}(?=[.=])", o)]
        rest = typed[0][len(full_key) :] if typed else ""
        root = cast(DictConfig, cause.parent_node._get_root())  # a run's config: a mapping at its root
        top = [str(k) for k in root.keys()]
        if prefix and key in top:  # a section put under another one: model.trainer.max_epochs
            return f"unknown setting {full_key}{rest}; {key} is a section of its own: {key}{rest}"
        owners = engines_taking(key)
        if prefix == "attack." and owners:
            return other_engines_option_message(key, rest, owners, str(root.get("attack", {}).get("method")))
        return unknown_key_message(prefix, key, [str(k) for k in cause.parent_node.keys()], rest)
    if isinstance(cause, ValidationError) and isinstance(cause.value, str) and full_key.endswith("eps"):
        return eps_text_message(full_key, cause.value)
    if isinstance(cause, OmegaConfBaseException) and full_key:
        reason = str(cause).splitlines()[0].strip()
        return f"{full_key}: {reason}"
    return f"{err}\n{cause}" if isinstance(cause, OmegaConfBaseException) else str(err)
