"""Reliability: non-finite numbers, interrupted training, cache identity, configs from outside the
tree, bad values and files that end in one message, and checkpoints Lightning writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

from attack_helpers import random_conv_net
from uap_lightning import compute_uap
from uap_lightning.config import DataConfig, ModelConfig
from uap_lightning.data import build_datamodule
from uap_lightning.errors import ConfigError, DamagedFileError, NonFiniteError
from uap_lightning.locking import _held_elsewhere
from uap_lightning.models import build_backbone
from uap_lightning.models.checkpoint import read_checkpoint
from uap_lightning.models.victim import VictimClassifier
from uap_lightning.tasks import run_task

SMALL = ("trainer.max_epochs=2", "data.attack_images=60", "attack.max_passes=1", "attack.eps=64", "logger=none")


def cnn_weights(path: Path, poison: float = float("nan")) -> Path:
    """A state dict of the default cnn on digits, one weight set to ``poison``."""
    net = build_backbone(ModelConfig(name="cnn"), num_classes=10, in_channels=1, image_size=8)
    state = net.state_dict()
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first].view(-1)[0] = poison
    torch.save(state, path)
    return path


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_checkpoint_weights_are_named_before_the_attack(make_cfg, tmp_path, poison):
    """model.checkpoint with a NaN or infinite weight ends in NonFiniteError naming the file."""
    path = cnn_weights(tmp_path / "weights.pt", poison)
    with pytest.raises(NonFiniteError, match=r"model.checkpoint=.*weights.pt hold NaN or infinite"):
        run_task(make_cfg(*SMALL, f"model.checkpoint={path}"))


def test_a_cache_entry_with_non_finite_weights_is_moved_aside_and_retrained(make_cfg):
    """A cached victim whose weights were replaced by NaN (with a matching checksum) is damaged: trained again."""
    cfg = make_cfg(*SMALL)
    run_task(cfg)
    entry = next((Path(cfg.paths.cache_dir) / "victims").glob("cnn-*[0-9a-f]"))
    weights = torch.load(entry / "weights.pt", weights_only=True)
    next(v for v in weights.values() if v.is_floating_point()).view(-1)[0] = float("nan")
    torch.save(weights, entry / "weights.pt")
    from uap_lightning.models.cache import file_sha256

    info = json.loads((entry / "victim.json").read_text())
    info["weights_sha256"] = file_sha256(entry / "weights.pt")
    (entry / "victim.json").write_text(json.dumps(info))
    again = run_task(make_cfg(*SMALL))
    assert again["victim_source"] == "trained"
    assert list(entry.parent.glob(f"{entry.name}.damaged-*"))


def test_a_model_with_non_finite_logits_is_refused_by_the_api():
    """compute_uap on a model whose weights hold NaN raises NonFiniteError (a ValueError) before any pass."""
    model = random_conv_net(seed=1).float()
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite logits"):
        compute_uap(model, torch.rand(4, 3, 8, 8), eps=10, max_passes=1)


def test_interrupted_training_caches_nothing_and_says_so(make_cfg, monkeypatch):
    """A Ctrl-C during victim training (Lightning ends the fit with SystemExit) becomes one
    KeyboardInterrupt with a message; no cache entry, no metrics.json, the lock released."""
    calls = {"n": 0}
    step = VictimClassifier.training_step

    def interrupted_step(self, batch, batch_idx):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return step(self, batch, batch_idx)

    monkeypatch.setattr(VictimClassifier, "training_step", interrupted_step)
    cfg = make_cfg(*SMALL)
    with pytest.raises(KeyboardInterrupt, match="interrupted while training the victim; nothing was cached"):
        run_task(cfg)
    victims = Path(cfg.paths.cache_dir) / "victims"
    assert not [p for p in victims.iterdir() if p.is_dir()]
    assert not (Path(cfg.paths.output_dir) / "metrics.json").exists()
    monkeypatch.setattr(VictimClassifier, "training_step", step)
    assert run_task(make_cfg(*SMALL))["victim_source"] == "trained"  # the lock was released


def test_zero_training_epochs_are_refused(make_cfg):
    """trainer.max_epochs=0 would cache an untrained victim: refused, naming the key."""
    with pytest.raises(ConfigError, match="trainer.max_epochs=0"):
        run_task(make_cfg(*SMALL, "trainer.max_epochs=0"))


def test_swapped_cache_entries_are_caught_by_their_recorded_settings(make_cfg):
    """Two entries of the same architecture swapped between folders: each is damaged, not used."""
    first, second = make_cfg(*SMALL), make_cfg(*SMALL, "model.width=16")
    run_task(first)
    run_task(second)
    victims = Path(first.paths.cache_dir) / "victims"
    a, b = sorted(p for p in victims.iterdir() if p.is_dir())
    shutil.move(a, victims / "swap")
    shutil.move(b, a)
    shutil.move(victims / "swap", b)
    assert run_task(make_cfg(*SMALL))["victim_source"] == "trained"
    assert list(victims.glob("*.damaged-*"))


def tiny_tree(root: Path, colour=(10, 20, 30)) -> Path:
    for split in ("train", "test"):
        for label in range(2):
            folder = root / split / f"c{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(3):
                Image.new("RGB", (8, 8), (colour[0] + 50 * label, colour[1] + index, colour[2])).save(
                    folder / f"{index}.png"
                )
    return root


def folder_cfg(root: Path, **changes) -> DataConfig:
    return DataConfig(
        **{
            "name": "imagefolder",
            "root": str(root),
            "in_channels": 3,
            "image_size": 8,
            "attack_images": 2,
            "val_fraction": 0.0,
            **changes,
        }
    )


def test_changed_pixels_with_the_same_size_and_time_are_a_new_dataset(tmp_path):
    """The decoded-data key hashes the files' bytes: new pixels, same size and mtime, are decoded again."""
    root = tiny_tree(tmp_path / "data")
    first = build_datamodule(folder_cfg(root), cache_dir=str(tmp_path / "cache")).splits.train_images.clone()
    image = root / "train" / "c0" / "0.png"
    stat = image.stat()
    Image.new("RGB", (8, 8), (200, 200, 200)).save(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = build_datamodule(folder_cfg(root), cache_dir=str(tmp_path / "cache")).splits.train_images
    assert not torch.equal(first, second)


def test_a_decoded_cache_file_copied_over_another_is_not_used(tmp_path, caplog):
    """A cache file holding another folder's images is noticed and the images decoded again."""
    cache = tmp_path / "cache"
    one = build_datamodule(folder_cfg(tiny_tree(tmp_path / "one")), cache_dir=str(cache))
    one.setup()
    files = list((cache / "datasets").glob("*.pt"))
    two_root = tiny_tree(tmp_path / "two", colour=(90, 90, 90))
    two = build_datamodule(folder_cfg(two_root), cache_dir=str(cache))
    two.setup()
    two_file = [f for f in (cache / "datasets").glob("*.pt") if f not in files][0]
    shutil.copy(files[0], two_file)
    again = build_datamodule(folder_cfg(two_root), cache_dir=str(cache)).splits.train_images
    assert torch.equal(again, two.splits.train_images)
    assert "holds other images" in caplog.text


def test_a_lock_whose_file_was_deleted_still_counts_while_its_holder_runs():
    """An owner record naming another live process on this host means the lock is held elsewhere."""
    import socket

    assert _held_elsewhere({"pid": os.getppid(), "host": socket.gethostname(), "since": 0})
    assert not _held_elsewhere({"pid": os.getpid(), "host": socket.gethostname(), "since": 0})
    assert not _held_elsewhere(None)


def cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "UAP_CACHE_DIR": str(tmp_path / "cache")}
    return subprocess.run(
        [sys.executable, "-m", "uap_lightning.run", *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_group_options_from_outside_the_config_tree_are_refused(tmp_path, monkeypatch, capfd):
    """experiment=../../x is refused with one message before any YAML is read; nothing it names runs."""
    evil = tmp_path / "x"
    evil.mkdir()
    marker = tmp_path / "ran"
    (evil / "evil.yaml").write_text(
        "# @package _global_\nhydra:\n  callbacks:\n    touch:\n      _target_: pathlib.Path.touch\n"
        f"      self: {marker}\n"
    )
    from cli_runner import run_in_process

    env = {"UAP_CACHE_DIR": str(tmp_path / "cache")}
    done = run_in_process(monkeypatch, capfd, tmp_path, f"experiment=../../../../..{evil / 'evil'}", env=env)
    assert done.returncode == 2 and "is a name in the config tree" in done.stdout + done.stderr
    assert not marker.exists()


def test_victims_and_sweep_folders_stay_inside_their_trees(make_cfg):
    """task.victims entries are preset names, not paths; a job folder name cannot climb out of the sweep."""
    from uap_lightning.config import safe_folder_name

    with pytest.raises(ConfigError, match="unknown model preset '../../x/evil_model'"):
        run_task(make_cfg("task=transfer", "task.victims=[../../x/evil_model]"))
    assert "/" not in safe_folder_name("data.root=/../../../tmp/x") and ".." not in safe_folder_name("a=../b")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("attack.eval_batch_size=0",), "attack.eval_batch_size"),
        (("attack.eps=1e9",), "attack.eps=1e\\+09 exceeds the ℓ∞ norm"),
        (("attack.p=2", "attack.eps=1e9"), "ℓ2 norm of an all-ones"),
    ],
)
def test_values_that_cannot_work_end_in_one_message(make_cfg, overrides, message):
    """Each bad value ends in ConfigError naming its key."""
    with pytest.raises(ConfigError, match=message):
        run_task(make_cfg(*SMALL, *overrides))


def test_bad_images_and_one_class_folders_end_in_one_message(tmp_path):
    """A one-class folder and an image over data.max_image_pixels end in ConfigError saying what to change."""
    root = tiny_tree(tmp_path / "data")
    shutil.rmtree(root / "train" / "c1")
    shutil.rmtree(root / "test" / "c1")
    with pytest.raises(ConfigError, match="at least 2"):
        build_datamodule(folder_cfg(root, attack_images=1)).setup()
    big = tiny_tree(tmp_path / "big")
    Image.new("RGB", (64, 64)).save(big / "train" / "c0" / "9.png")
    with pytest.raises(ConfigError, match="data.max_image_pixels=1000"):
        build_datamodule(folder_cfg(big, max_image_pixels=1000)).setup()


def test_api_checks_the_type_and_size_of_eps():
    """eps as text or beyond the all-ones image is refused."""
    model, images = random_conv_net(seed=1).float(), torch.rand(4, 3, 8, 8)
    with pytest.raises(TypeError, match="eps must be a number"):
        compute_uap(model, images, eps="10")
    with pytest.raises(ValueError, match="exceeds the ℓ∞ norm"):
        compute_uap(model, images, eps=1e12)


def test_a_full_disk_ends_in_one_message(tmp_path):
    """A write that fails for want of space ends the run with one message and exit status 2."""
    script = (
        "import errno, sys\n"
        "import uap_lightning.report.outputs as outputs\n"
        "def full(*a, **k):\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device', 'metrics.json')\n"
        "outputs.write_metrics = full\n"
        "import uap_lightning.tasks.setup as setup; setup.write_metrics = full\n"
        "import uap_lightning.tasks.attack as attack; attack.write_run_outputs = full\n"
        "from uap_lightning.run import main\n"
        "sys.argv = ['run', *sys.argv[1:]]\n"
        "main()\n"
    )
    env = {**os.environ, "UAP_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-c", script, *SMALL, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "the disk is full" in done.stdout + done.stderr and "Traceback" not in done.stderr


def _limited_file_size(limit: int):
    """For ``preexec_fn``: files of the child may grow to ``limit`` bytes (``ulimit -f``); past it
    a write fails with EFBIG rather than killing the child with SIGXFSZ."""

    def limit_size() -> None:
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_size


def error_lines(output: str) -> list:
    return [line for line in output.splitlines() if line.startswith("ERROR")]


# Hydra's record written up to ``.hydra/hydra.yaml``, which is cut off by a full disk.
HYDRA_RECORD_ON_A_FULL_DISK = (
    "import errno, sys\n"
    "import hydra.core.utils as utils\n"
    "save = utils._save_config\n"
    "def cut(cfg, filename, output_dir):\n"
    "    if filename != 'hydra.yaml':\n"
    "        return save(cfg, filename, output_dir)\n"
    "    with open(output_dir / filename, 'w', encoding='utf-8') as file:\n"
    "        file.write('hydra:\\n  run:\\n')\n"
    "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
    "utils._save_config = cut\n"
    "from uap_lightning.run import main\n"
    "sys.argv = ['run', *sys.argv[1:]]\n"
    "main()\n"
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="resource limits of a child need POSIX")
@pytest.mark.parametrize("cause", ["file size limit", "full disk"])
def test_a_full_disk_before_the_run_ends_in_one_message_naming_the_file(tmp_path, cause):
    """Hydra's own record (``.hydra/hydra.yaml``) failing under ``ulimit -f`` or on a full disk: one
    ERROR line naming the file and what to do, exit status 2, no traceback, and no run folder with a
    cut-off record."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "UAP_CACHE_DIR": str(tmp_path / "cache"), "PYTHONDONTWRITEBYTECODE": "1"}
    limited = cause == "file size limit"
    done = subprocess.run(
        [sys.executable, *(["-m", "uap_lightning.run"] if limited else ["-c", HYDRA_RECORD_ON_A_FULL_DISK])]
        + [*SMALL, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=_limited_file_size(4096) if limited else None,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = error_lines(output)
    assert len(errors) == 1, output[-3000:]
    assert f"writing {run_dir / '.hydra' / 'hydra.yaml'} " in errors[0], errors[0]
    if limited:
        assert "file size limit" in errors[0] and "ulimit -f" in errors[0], errors[0]
    else:
        assert "the disk is full" in errors[0] and "free some space or set hydra.run.dir" in errors[0], errors[0]
    assert not (run_dir / ".hydra" / "hydra.yaml").exists()  # no cut-off record that looks complete
    assert not run_dir.exists()  # the folder held nothing else: removed


def test_a_run_log_on_a_full_disk_is_reported_once_and_the_run_ends_naming_the_file(tmp_path):
    """The run log failing for want of space: no "--- Logging error ---" tracebacks, one warning naming
    the log, and a later write that fails ends the run with one ERROR line naming its file."""
    script = (
        "import errno, logging, sys\n"
        "class Full:\n"
        "    def write(self, text):\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "    def flush(self):\n"
        "        pass\n"
        "    def close(self):\n"
        "        pass\n"
        "logging.FileHandler._open = lambda self: Full()\n"
        "def full(*a, **k):\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "import uap_lightning.atomic as atomic\n"
        "write = atomic.atomic_write\n"
        "def failing(path, fill):\n"
        "    return write(path, full if str(path).endswith('metrics.json') else fill)\n"
        "atomic.atomic_write = failing\n"
        "import uap_lightning.report.outputs as outputs; outputs.atomic_write = failing\n"
        "from uap_lightning.run import main\n"
        "sys.argv = ['run', *sys.argv[1:]]\n"
        "main()\n"
    )
    run_dir = tmp_path / "run"
    env = {**os.environ, "UAP_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-c", script, *SMALL, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert "Logging error" not in output and "Traceback" not in output, output[-3000:]
    warnings = [line for line in output.splitlines() if line.startswith("WARNING") and "run.log" in line]
    assert len(warnings) == 1, output[-3000:]
    errors = error_lines(output)
    assert len(errors) == 1 and str(run_dir / "metrics.json") in errors[0], output[-3000:]
    assert "the disk is full" in errors[0]


def test_a_full_disk_names_the_file_being_written_not_the_source_of_a_copy():
    """An OSError of a copy onto a full disk names the source and the destination: the message names
    the destination (under its final name when it is a temporary file beside it); a write with no file
    name names the file that was open for writing."""
    import errno

    from uap_lightning.run import disk_full_message

    copy = OSError(errno.ENOSPC, "No space left on device", "/tmp/tmpab12", None, "/runs/a/.attack_state.ckpt.1.tmp")
    message = disk_full_message(copy)
    assert "/runs/a/attack_state.ckpt" in message and "/tmp/tmpab12" not in message, message

    def write_into(handle):
        raise OSError(errno.EFBIG, "File too large")

    try:
        with open(os.devnull, "w") as handle:
            write_into(handle)
    except OSError as err:
        message = disk_full_message(err)
    assert os.devnull in message and "file size limit" in message, message


def test_a_lightning_checkpoint_with_attribute_dict_hyperparameters_loads_tensors_only(tmp_path):
    """A checkpoint Lightning writes with save_hyperparameters of an AttributeDict loads without unpickling code."""
    from lightning.fabric.utilities.data import AttributeDict

    class Module(L.LightningModule):
        def __init__(self, settings):
            super().__init__()
            self.save_hyperparameters()
            self.layer = torch.nn.Linear(2, 2)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Module(AttributeDict(a=1, nested=AttributeDict(b=2)))
    trainer = L.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.rand(4, 2)), batch_size=2))
    trainer.save_checkpoint(tmp_path / "module.ckpt")
    loaded = read_checkpoint(str(tmp_path / "module.ckpt"))
    assert loaded["hyper_parameters"]["settings"]["nested"]["b"] == 2
    assert torch.equal(loaded["state_dict"]["layer.weight"], module.layer.weight.detach())


def test_no_message_advises_loading_with_weights_only_false(tmp_path):
    """Unreadable and untrusted files are refused without torch's advice to load them fully; a raw pickle
    names the global it wanted."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Payload()))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    for name, error, wanted in (("evil.pkl", "holds Python objects", "system"), ("junk.pt", "truncated", "")):
        with pytest.raises((DamagedFileError, ValueError)) as info:
            read_checkpoint(str(tmp_path / name))
        assert error in str(info.value) and wanted in str(info.value)
        assert "weights_only=False" not in str(info.value) and "weights_only" not in str(info.value)


@pytest.mark.slow
def test_a_full_disk_under_tensorboard_ends_in_one_message_and_leaves_no_outputs(tmp_path):
    """TensorBoard's writer thread meeting a full disk during the attack: one message, exit status 2,
    no thread traceback; the run's incomplete outputs are removed, the attack state after pass 1 (and
    the settings record beside it) is kept so that the same command continues."""
    script = (
        "import errno, sys\n"
        "from tensorboard.summary.writer import record_writer\n"
        "write = record_writer.RecordWriter.write\n"
        "def full(self, data):\n"
        "    if b'/attack/' in self._writer.filename:\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "    return write(self, data)\n"
        "record_writer.RecordWriter.write = full\n"
        "from uap_lightning.run import main\n"
        "sys.argv = ['run', *sys.argv[1:]]\n"
        "main()\n"
    )
    run_dir = tmp_path / "run"
    env = {**os.environ, "UAP_CACHE_DIR": str(tmp_path / "cache")}
    overrides = [o for o in SMALL if not o.startswith("logger=")] + ["attack.max_passes=2", "attack.delta=0.01"]
    done = subprocess.run(
        [sys.executable, "-c", script, *overrides, "logger=tensorboard", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "the disk is full" in done.stdout
    assert "Traceback" not in done.stderr and "Exception in thread" not in done.stderr, done.stderr[-2000:]
    left = {p.name for p in run_dir.iterdir()}
    assert left <= {".hydra", "run.log", "attack_state.ckpt", "attack_settings.json"}, left
    assert "attack_state.ckpt" in left


@pytest.mark.parametrize("where", [pytest.param("file", marks=pytest.mark.slow), "proc"])
def test_a_run_dir_that_cannot_be_made_ends_in_one_message(tmp_path, where):
    """hydra.run.dir under a regular file, or under /proc, is refused before any work with one message
    naming hydra.run.dir; no traceback."""
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    run_dir = tmp_path / "notes.txt" / "run" if where == "file" else Path("/proc") / f"uap-{os.getpid()}" / "run"
    done = cli(tmp_path, f"hydra.run.dir={run_dir}", *SMALL)
    assert done.returncode == 2, done.stderr[-2000:]
    output = done.stdout + done.stderr
    assert f"hydra.run.dir={run_dir}" in output and "Traceback" not in output, output[-2000:]
    assert not (tmp_path / "cache" / "victims").exists()  # refused before the victim was trained


@pytest.mark.slow
def test_a_sweep_dir_that_cannot_be_made_ends_in_one_message(tmp_path):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    done = cli(tmp_path, "-m", f"hydra.sweep.dir={tmp_path / 'notes.txt' / 'sweep'}", "attack.eps=32,64", *SMALL)
    assert done.returncode == 2, done.stderr[-2000:]
    output = done.stdout + done.stderr
    assert "hydra.sweep.dir=" in output and "Traceback" not in output, output[-2000:]
