"""Image classifiers from timm (pytorch-image-models) by name, with pretrained weights read from a
local file or from the local Hugging Face cache; nothing is downloaded.

timm is in the ``imagenet`` extra. ``model.arch`` is a timm model name, optionally with a pretrained
tag (``resnet50`` or ``resnet50.a1_in1k``; without a tag, timm's default weights). The model's
pretrained config says where its weights live on the Hugging Face hub (``hf_hub_id``) and how its
inputs were prepared (:class:`~uap_lightning.models.preprocessing.Preprocessing`).
"""

from __future__ import annotations

import difflib
import importlib
import logging
import re
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Tuple, cast

import torch
from torch import nn

from uap_lightning.errors import ConfigError, DamagedFileError

from .checkpoint import CheckpointMismatchError, Shapes, key_report, read_checkpoint
from .efficientnet_lite import EXTRA_HINT, MissingExtraError
from .preprocessing import Preprocessing
from .pretrained import PretrainedWeightsNotFoundError, pretrained_weights_file

# Files a timm repository on the Hugging Face hub holds its weights in, in the order timm reads them.
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Keys under which timm's training script nests the weights (EMA weights first, as timm loads them).
_NESTING_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")


def _timm() -> Any:
    """The timm package, its information lines ("Loading pretrained weights from ...") kept off the
    console: the run says where the weights come from."""
    try:
        timm = importlib.import_module("timm")
    except ImportError:
        raise MissingExtraError(f"model=timm needs the package timm of the `imagenet` extra: {EXTRA_HINT}") from None
    logger = logging.getLogger("timm")
    if logger.level < logging.WARNING:  # NOTSET or INFO: timm's own modules log under "timm."
        logger.setLevel(logging.WARNING)
    return timm


def check_arch(arch: str) -> str:
    """``arch`` when timm knows it (and its pretrained tag, when given); ConfigError with the
    closest names otherwise."""
    timm = _timm()
    name, _, tag = str(arch).partition(".")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown timm model model.arch={arch!r}.{hint} timm.list_models('PATTERN*') lists the names")
    if tag and arch not in timm.list_pretrained(f"{name}.*"):
        tags = timm.list_pretrained(f"{name}.*")
        known = f"its pretrained tags: {', '.join(tags)}" if tags else f"{name} has no pretrained weights in timm"
        raise ConfigError(f"model.arch={arch}: timm has no weights tagged {tag!r} ({known})")
    return str(arch)


def pretrained_config(arch: str) -> Dict[str, Any]:
    """timm's pretrained config of ``arch`` (its default tag when none is given) as a dict;
    ConfigError when timm has no pretrained weights for it."""
    config = _timm().models.get_pretrained_cfg(check_arch(arch))
    if config is None:
        raise ConfigError(
            f"timm has no pretrained weights for model.arch={arch}; train it (model.pretrained=false) "
            "or give your own weights with model.checkpoint=PATH"
        )
    return config.to_dict()


def preprocessing(arch: str) -> Preprocessing:
    """How the pretrained weights of ``arch`` expect their images (timm's ``resolve_data_config``
    of the pretrained config): mean, std, input side, centre-crop share and resize filter."""
    timm = _timm()
    data = timm.data.resolve_data_config(pretrained_cfg=pretrained_config(arch))
    channels, height, width = data["input_size"]
    if height != width:
        raise ConfigError(f"model.arch={arch} takes {height}×{width} inputs; only square images are supported")
    return Preprocessing(
        mean=tuple(float(m) for m in data["mean"]),
        std=tuple(float(s) for s in data["std"]),
        image_size=int(height),
        crop_pct=float(data["crop_pct"]),
        interpolation=str(data["interpolation"]),
    )


def pretrained_classes(arch: str) -> int:
    """Number of classes of the pretrained head of ``arch`` (1000 for ImageNet-1k weights)."""
    return int(pretrained_config(arch)["num_classes"])


def hub_cache() -> str:
    """The Hugging Face hub cache timm reads from: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``
    (default ``~/.cache/huggingface/hub``), as huggingface_hub resolved it when imported."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _hub_repo(arch: str) -> Tuple[str, Optional[str]]:
    """(repository id, revision or None) of the weights of ``arch`` on the Hugging Face hub."""
    hub_id = pretrained_config(arch).get("hf_hub_id")
    if not hub_id:
        raise PretrainedWeightsNotFoundError(
            f"timm keeps no Hugging Face copy of the weights of model.arch={arch}; give a local weights "
            "file with model.weights=PATH"
        )
    repo, _, revision = str(hub_id).partition("@")
    return repo, revision or None


def cached_weights(arch: str) -> Optional[str]:
    """Path of the weights of ``arch`` in the local Hugging Face cache, or None; looks only."""
    from huggingface_hub import try_to_load_from_cache

    repo, revision = _hub_repo(arch)
    for filename in HUB_WEIGHT_FILES:
        found = try_to_load_from_cache(repo, filename, cache_dir=hub_cache(), revision=revision)
        if isinstance(found, str):
            return found
    return None


def read_weights(path: str, *, key: str, trust: bool = False) -> Dict[str, torch.Tensor]:
    """The state dict in the file ``path``: a ``.safetensors`` file, or a PyTorch file read
    tensors-only (``trust`` as in :func:`read_checkpoint`) holding a state dict, possibly nested
    by timm's training script (its EMA weights first). ``key`` names the setting in messages."""
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError) as err:
            raise DamagedFileError(f"cannot read {key}={path}: not a readable safetensors file ({err})") from None
    found = read_checkpoint(path, trust=trust, key=key)
    for nesting in _NESTING_KEYS:
        if isinstance(found, Mapping) and isinstance(found.get(nesting), Mapping):
            found = found[nesting]
            break
    if not isinstance(found, Mapping) or not found:
        raise CheckpointMismatchError(f"{key}={path} holds no state dict (a mapping of parameter names to tensors)")
    return dict(found)


def resolve_weights(arch: str, *, pretrained: bool, weights: Optional[str]) -> Optional[str]:
    """The weight file ``arch`` loads (None when not ``pretrained``), found before any heavy work
    (:func:`~uap_lightning.models.pretrained.pretrained_weights_file`): ``weights`` (model.weights)
    when given, else the file in the local Hugging Face cache; ConfigError for an unknown ``arch``."""
    check_arch(arch)

    def not_cached() -> str:
        repo, _ = _hub_repo(arch)
        return (
            f"model.pretrained=true needs the weights of timm model {arch!r}, Hugging Face repository {repo}: "
            f"none of {', '.join(HUB_WEIGHT_FILES)} is in the local Hugging Face cache {hub_cache()} "
            "(set by HF_HOME=DIR, which reads DIR/hub, or HF_HUB_CACHE / HUGGINGFACE_HUB_CACHE). Nothing is "
            "downloaded: point HF_HOME at a cache that holds it (filled on a machine with internet, e.g. by "
            f"timm.create_model({repo.split('/')[-1]!r}, pretrained=True)), or give the file as "
            "model.weights=PATH (.safetensors, .pth or .bin)"
        )

    return pretrained_weights_file(
        pretrained=pretrained, weights=weights, cached=lambda: cached_weights(arch), not_cached=not_cached
    )


def timm_classifier(
    arch: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    pretrained: bool,
    weights: Optional[str] = None,
    trust: bool = False,
) -> nn.Module:
    """timm classifier ``arch`` for normalised N×C×S×S inputs (S = ``image_size``) → logits.

    ``pretrained``: 3-channel inputs, the pretrained head kept (N×1000 for ImageNet-1k weights),
    the weights read from ``weights`` (model.weights) when given, else from the local Hugging Face
    cache, and loaded through timm's own pretrained-loading path (its per-model key filters).
    Otherwise untrained, N×``num_classes``, ``in_channels`` input channels. Models of a fixed input
    size (ViTs) are built for S (timm resamples their position embeddings)."""
    path = resolve_weights(arch, pretrained=pretrained, weights=weights)
    timm = _timm()
    known = timm.models.get_pretrained_cfg(arch)
    options: Dict[str, Any] = {"img_size": image_size} if known is not None and known.fixed_input_size else {}
    if path is None:
        return _create(timm, arch, num_classes=num_classes, in_chans=in_channels, **options)
    if in_channels != 3:
        raise ConfigError(f"pretrained model=timm takes RGB images; the data has {in_channels} channel(s)")
    key = "model.weights" if weights is not None else f"the cached weights of {arch}"
    state = read_weights(path, key=key, trust=trust)
    try:
        model = _create(timm, arch, pretrained=True, pretrained_cfg_overlay={"state_dict": state}, **options)
    except (RuntimeError, KeyError) as err:
        raise CheckpointMismatchError(f"{key}={path} does not fit timm model {arch}:\n" + _load_error(err)) from None
    pretrained_cfg = cast(Dict[str, Any], model.pretrained_cfg)  # a timm model's settings
    pretrained_cfg.pop("state_dict", None)  # the loaded copy of the weights is not kept twice
    return model


# The parts of load_state_dict's error (torch.nn.Module), which lists every key.
_KEYS = re.compile(r'"([^"]*)"')
_SIZE_MISMATCH = re.compile(
    r"size mismatch for (?P<key>\S+): copying a param with shape torch\.Size\(\[(?P<found>[^\]]*)\]\) from "
    r"checkpoint, the shape in current model is torch\.Size\(\[(?P<expected>[^\]]*)\]\)"
)
_LONGEST = 300  # characters of another error shown


def _load_error(err: BaseException) -> str:
    """The error of loading a state dict into a timm model, as :func:`load_weights` reports a
    mismatch: how many keys are missing, unexpected or of another shape, naming the first few."""
    text = str(err).strip()
    header, _, details = text.partition("\n\t")
    wrong: List[Shapes] = []
    missing: List[str] = []
    unexpected: List[str] = []
    other: List[str] = []
    for part in details.split("\n\t") if details else []:
        size = _SIZE_MISMATCH.match(part)
        if size:
            wrong.append((size["key"], _shape(size["expected"]), _shape(size["found"])))
        elif part.startswith("Missing key(s)"):
            missing += _KEYS.findall(part)
        elif part.startswith("Unexpected key(s)"):
            unexpected += _KEYS.findall(part)
        else:
            other.append(part.strip())
    lines = key_report(wrong, missing, unexpected) + other[:3]
    if not lines:  # not load_state_dict's error: its first line, cut short
        first = text.splitlines()[0] if text else type(err).__name__
        return first if len(first) <= _LONGEST else first[:_LONGEST] + " ..."
    return "\n".join(line if len(line) <= _LONGEST else line[:_LONGEST] + " ..." for line in lines)


def _shape(sizes: str) -> Tuple[int, ...]:
    return tuple(int(size) for size in sizes.split(",") if size.strip())


def _create(timm: Any, arch: str, **options: Any) -> nn.Module:
    try:
        return timm.create_model(arch, **options)
    except TypeError as err:
        if "img_size" not in options:
            raise
        raise ConfigError(
            f"model.arch={arch} cannot be built for {options['img_size']}-pixel images ({err}); set data.image_size "
            f"to its input size"
        ) from None
