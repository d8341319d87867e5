"""The default thread count on a shared machine, the passive OpenMP wait, the summary's thread line,
and the progress lines of the steps after an attack."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import pytest
import torch

from test_first_hour import synthetic_metrics
from uap_lightning import progress, threads
from uap_lightning.attacks.threat import ThreatModel
from uap_lightning.baselines import random_baselines
from uap_lightning.errors import ConfigError
from uap_lightning.report import summary
from uap_lightning.report.outputs import write_figures, write_metrics
from uap_lightning.threads import (
    ThreadChoice,
    busy_from_samples,
    choose_threads,
    cpu_quota,
    parse_cpu_max,
    parse_proc_stat,
    passive_openmp_wait,
    set_threads,
)

# --- the rule ---------------------------------------------------------------------------------


def test_a_quiet_machine_gets_a_thread_per_core_of_the_affinity_mask():
    assert choose_threads(2) == ThreadChoice(2, "2 cores free")
    assert choose_threads(1).describe() == "1 thread (1 core free)"
    assert choose_threads(16, busy=0.3).count == 16  # a core counts busy from half its time on


@pytest.mark.parametrize(
    "cores, busy, expected",
    [
        (2, 1.0, 1),
        (2, 0.6, 1),
        (2, 0.4, 2),
        (2, 2.0, 1),
        (2, 7.5, 1),
        (8, 2.6, 5),
        (8, 0.0, 8),
    ],
)
def test_cores_other_processes_keep_busy_are_left_to_them(cores, busy, expected):
    assert choose_threads(cores, busy=busy).count == expected


def test_the_reason_names_the_busy_cores():
    assert choose_threads(2, busy=1.1).describe() == "1 thread (1 of 2 cores busy)"
    assert choose_threads(2, busy=2.0).describe() == "1 thread (2 of 2 cores busy)"
    assert choose_threads(2, busy=0.2).describe() == "2 threads (2 cores free)"


def test_a_cpu_quota_caps_the_threads_at_its_whole_cores():
    assert choose_threads(64, quota=4.0).describe() == "4 threads (a CPU quota of 4 cores)"
    assert choose_threads(64, quota=2.5).count == 2  # a third thread would be throttled
    assert choose_threads(64, quota=0.5).describe() == "1 thread (a CPU quota of 0.5 cores)"
    assert choose_threads(2, quota=8.0) == ThreadChoice(2, "2 cores free")  # a quota above the cores binds nothing
    # both: the fewer of the quota and the cores free of other processes
    assert (
        choose_threads(64, quota=4.0, busy=10).describe() == "4 threads (a CPU quota of 4 cores; 10 of 64 cores busy)"
    )
    assert choose_threads(64, quota=4.0, busy=62).describe() == "2 threads (62 of 64 cores busy)"


def test_parallel_jobs_share_the_usable_cores_whatever_is_busy():
    assert choose_threads(4, parallel_jobs=2).describe() == "2 threads (4 cores shared by 2 parallel jobs)"
    assert choose_threads(4, busy=3, parallel_jobs=2).count == 2  # the busy cores are the sweep's own jobs
    assert choose_threads(2, parallel_jobs=8).count == 1
    assert choose_threads(64, quota=4, parallel_jobs=2).count == 2


def test_set_threads_applies_the_rule_to_what_it_measures(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("UAP_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    monkeypatch.setattr(threads, "cpu_quota", lambda: None)
    try:
        monkeypatch.setattr(threads, "busy_cores", lambda: 1.0)
        assert set_threads(None) == 1 and torch.get_num_threads() == 1
        assert threads.last_choice().describe() == "1 thread (1 of 2 cores busy)"
        monkeypatch.setattr(threads, "busy_cores", lambda: 0.0)
        assert set_threads(None) == 2 and threads.last_choice().describe() == "2 threads (2 cores free)"
        monkeypatch.setattr(threads, "cpu_quota", lambda: 1.0)
        assert set_threads(None) == 1 and threads.last_choice().reason == "a CPU quota of 1 core"

        def unused() -> float:
            raise AssertionError("an explicit count or a parallel sweep measures no load")

        monkeypatch.setattr(threads, "busy_cores", unused)
        assert set_threads(2) == 2 and threads.last_choice().describe() == "2 threads (threads=2)"
        assert set_threads(None, parallel_jobs=2) == 1
    finally:
        torch.set_num_threads(before)


# --- what the rule is given ---------------------------------------------------------------------


def test_uap_threads_is_the_default_and_an_explicit_count_still_wins(monkeypatch):
    """$UAP_THREADS pins the default without measuring the load; a bad value names the variable."""
    before = torch.get_num_threads()

    def unused() -> float:
        raise AssertionError("a count from the environment measures no load")

    monkeypatch.setattr(threads, "busy_cores", unused)
    try:
        monkeypatch.setenv("UAP_THREADS", "1")
        assert set_threads(None) == 1 and threads.last_choice().describe() == "1 thread (UAP_THREADS=1)"
        assert set_threads(2) == 2 and threads.last_choice().reason == "threads=2"
        for bad in ("0", "two", "-1", "1.5"):
            monkeypatch.setenv("UAP_THREADS", bad)
            with pytest.raises(ConfigError, match="UAP_THREADS must be a whole number of threads"):
                set_threads(None)
    finally:
        torch.set_num_threads(before)


def test_cgroup_v2_quota_is_the_smallest_of_the_cgroup_and_its_ancestors(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/jobs/one\n")
    root = tmp_path / "fs"
    (root / "jobs" / "one").mkdir(parents=True)
    (root / "jobs" / "one" / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(root, proc) is None
    (root / "jobs" / "cpu.max").write_text("150000 100000\n")
    assert cpu_quota(root, proc) == 1.5
    (root / "jobs" / "one" / "cpu.max").write_text("300000 100000\n")
    assert cpu_quota(root, proc) == 1.5
    assert parse_cpu_max("max 100000") is None and parse_cpu_max("50000 100000") == 0.5


def test_cgroup_v1_cfs_quota(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n")
    mount = tmp_path / "fs" / "cpu,cpuacct"
    mount.mkdir(parents=True)
    (mount / "cpu.cfs_quota_us").write_text("-1\n")
    (mount / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(tmp_path / "fs", proc) is None
    # inside a container the process's cgroup is mounted as the root
    (mount / "cpu.cfs_quota_us").write_text("200000\n")
    assert cpu_quota(tmp_path / "fs", proc) == 2.0
    assert cpu_quota(tmp_path / "fs", tmp_path / "missing") is None


STAT_BEFORE = """cpu  500 0 100 1000 0 0 0 0 0 0
cpu0 100 0 0 200 0 0 0 0 0 0
cpu1 100 0 0 200 0 0 0 0 0 0
cpu2 300 0 100 600 0 0 0 0 0 0
intr 12345
"""
# 100 ticks per CPU later: cpu0 fully busy, cpu1 a quarter (user 10, system 10, steal 5), cpu2 fully busy
STAT_AFTER = """cpu  0 0 0 0 0 0 0 0 0 0
cpu0 150 50 0 200 0 0 0 0 0 0
cpu1 110 0 10 270 5 0 0 5 0 0
cpu2 400 0 100 600 0 0 0 0 0 0
"""


def test_busy_cores_counts_the_cpus_of_the_mask_less_our_own_time():
    before, after = parse_proc_stat(STAT_BEFORE, [0, 1]), parse_proc_stat(STAT_AFTER, [0, 1])
    assert before == {"busy": 200, "total": 600, "cpus": 2}
    assert busy_from_samples(before, after, own_seconds=0.0, clock_ticks=100) == pytest.approx(1.25)
    # our own 0.25 s of CPU in that second are not another process's
    assert busy_from_samples(before, after, own_seconds=0.25, clock_ticks=100) == pytest.approx(1.0)
    assert busy_from_samples(before, after, own_seconds=5.0, clock_ticks=100) == 0.0
    everything = busy_from_samples(parse_proc_stat(STAT_BEFORE), parse_proc_stat(STAT_AFTER), 0.0, 100)
    assert everything == pytest.approx(2.25)  # cpu2 as well: outside the mask it is not ours to count


# --- the wait policy ------------------------------------------------------------------------------


def test_the_passive_wait_is_a_default_a_users_setting_wins():
    env = {}
    assert passive_openmp_wait(env) == "PASSIVE" and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    mine = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert passive_openmp_wait(mine) == "ACTIVE" and mine == {"OMP_WAIT_POLICY": "ACTIVE"}


HOOK = """
import os, sys
class Seen:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print("at torch's import:", os.environ.get("OMP_WAIT_POLICY"))
            sys.meta_path.remove(self)
        return None
sys.meta_path.insert(0, Seen())
import uap_lightning.run
"""


@pytest.mark.parametrize("users, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_command_line_sets_the_policy_before_torch_loads_openmp(users, expected):
    """OpenMP reads the policy when torch loads it: the CLI module must set it before its first
    torch import (a user's own setting passes through)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if users:
        env["OMP_WAIT_POLICY"] = users
    out = subprocess.run([sys.executable, "-c", HOOK], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[0] == f"at torch's import: {expected}"


# --- the summary and metrics.json -----------------------------------------------------------------


def test_the_summary_says_how_many_threads_ran_and_why(tmp_path):
    lines = summary.attack_summary(synthetic_metrics(threads=1, threads_reason="1 of 2 cores busy"), tmp_path)
    (attack,) = [line for line in lines if line.startswith("attack ")]
    assert "in 400.0 s on 1 thread (1 of 2 cores busy)," in attack
    two = summary.attack_summary(synthetic_metrics(threads=2, threads_reason="2 cores free"), tmp_path)
    assert any("on 2 threads (2 cores free)" in line for line in two)
    assert not any(" thread" in line for line in summary.attack_summary(synthetic_metrics(), tmp_path))


def test_metrics_json_records_why_the_threads(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("UAP_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    monkeypatch.setattr(threads, "cpu_quota", lambda: None)
    monkeypatch.setattr(threads, "busy_cores", lambda: 1.0)
    try:
        set_threads(None)
        metrics = {"threads": torch.get_num_threads()}
        saved = json.loads(write_metrics(tmp_path, metrics).read_text())
        assert saved == {"threads": 1, "threads_reason": "1 of 2 cores busy"} == metrics
        # threads set some other way since: no reason to give
        torch.set_num_threads(2)
        assert "threads_reason" not in json.loads(write_metrics(tmp_path, {"threads": 2}).read_text())
    finally:
        torch.set_num_threads(before)


# --- progress after the attack ---------------------------------------------------------------------


def slow_labels(clean: torch.Tensor, seconds: float):
    def perturbed_labels(noise: torch.Tensor) -> torch.Tensor:
        time.sleep(seconds)
        return clean.roll(1)

    return perturbed_labels


def test_long_random_baselines_say_which_draw_runs(caplog, monkeypatch):
    monkeypatch.setattr(progress, "PHASE_HEARTBEAT_SECONDS", 0.05)
    clean = torch.arange(10) % 3
    threat = ThreatModel.parse(10.0, "inf")
    with caplog.at_level(logging.INFO, logger="uap_lightning"):
        baselines = random_baselines(
            slow_labels(clean, 0.08), clean, (1, 4, 4), threat, torch.full((1, 4, 4), 0.01), seed=0, draws=3
        )
    assert baselines.draws == 3
    lines = [r.getMessage() for r in caplog.records if r.name == "uap_lightning.baselines"]
    assert lines and lines[0].startswith("random baselines (6 draws on 10 eval images): draw ")
    assert any("draw 5 of 6, a random direction of ℓ2 norm" in line for line in lines)
    assert any("random ℓ∞ noise of norm ε=10" in line for line in lines)
    assert lines[-1].startswith("random baselines (6 draws on 10 eval images) done in ")
    # never quieter than the heartbeat (and a margin for a loaded machine) between lines
    stamps = [r.created for r in caplog.records if r.name == "uap_lightning.baselines"]
    assert max(b - a for a, b in zip(stamps, stamps[1:])) < 0.05 + 1.0


def test_quick_random_baselines_log_nothing(caplog):
    clean = torch.arange(10) % 3
    progress.shown()
    with caplog.at_level(logging.INFO, logger="uap_lightning"):
        random_baselines(
            slow_labels(clean, 0.0),
            clean,
            (1, 4, 4),
            ThreatModel.parse(10.0, "inf"),
            torch.full((1, 4, 4), 0.01),
            seed=0,
        )
    assert not [r for r in caplog.records if r.name == "uap_lightning.baselines"]


def test_the_quiet_before_a_phase_counts(caplog):
    """A phase that starts after a long quiet speaks at once (within one tick), not a heartbeat later."""
    log = logging.getLogger("uap_lightning.test")
    with caplog.at_level(logging.INFO, logger="uap_lightning"):
        log.info("a pass line")
        progress._clock().at -= 10  # ten quiet seconds since
        with progress.Phase(log, "scoring", every=5.0) as phase:
            phase.part("part 1")
            time.sleep(1.0)
    said = [r for r in caplog.records if r.getMessage().startswith("scoring")]
    assert said[0].getMessage().startswith("scoring: part 1 (") and said[-1].getMessage().startswith("scoring done in")
    assert said[0].created - caplog.records[0].created < 0.9  # not five seconds into the phase


def test_writing_figures_names_the_figure_while_it_takes_long(caplog, monkeypatch, tmp_path):
    from matplotlib.figure import Figure

    monkeypatch.setattr(progress, "PHASE_HEARTBEAT_SECONDS", 0.05)
    monkeypatch.setattr("uap_lightning.report.outputs.save_figure", lambda fig, path: time.sleep(0.15))
    with caplog.at_level(logging.INFO, logger="uap_lightning"):
        write_figures(tmp_path, {"curve": Figure(), "examples": Figure()})
    lines = [r.getMessage() for r in caplog.records if r.name == "uap_lightning.report.outputs"]
    assert any(line.startswith("writing 2 figures: examples.png and examples.pdf, 2 of 2 (") for line in lines)
    assert lines[-1].startswith("writing 2 figures done in")
