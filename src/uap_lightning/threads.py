"""torch's intra-op thread count, a setting (``threads``): the result of an attack and its speed
depend on it (float reductions split differently across threads), so a run sets it at start and
records it, with the reason for the count (:class:`ThreadChoice`).

The default (``threads=null``) is ``$UAP_THREADS`` where that is set (one count for every run of a
machine or a CI job, so that reruns match bit for bit), else :func:`choose_threads` of what this
process may use now: the cores of its affinity mask, any cgroup CPU quota, and the cores other
processes keep busy. More threads than free cores is the costly mistake: the threads of a parallel
region wait for the one that shares its core with another job, and an OpenMP thread that waits
actively spins on a core the others need (the digits attack ran over ten times slower). Hence
:func:`passive_openmp_wait`.

This module imports no torch at import time: ``uap_lightning/__init__`` calls
:func:`passive_openmp_wait` before torch loads its OpenMP runtime, which reads the setting once.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, MutableMapping, Optional, Sequence

from uap_lightning.errors import ConfigError

WAIT_POLICY = "OMP_WAIT_POLICY"
THREADS_VARIABLE = "UAP_THREADS"  # the default thread count, where set
SAMPLE_SECONDS = 0.3  # how long :func:`busy_cores` watches the CPUs
CGROUP_ROOT = Path("/sys/fs/cgroup")


def passive_openmp_wait(environ: Optional[MutableMapping[str, str]] = None) -> str:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` in ``environ`` (default ``os.environ``) unless it is set
    already (a user's own setting wins); return the policy now in effect. Waiting OpenMP threads
    then sleep instead of spinning on cores that another job (or their own sibling thread) needs.
    It takes effect only before torch is first imported (its OpenMP runtime reads it then) and in
    processes started afterwards."""
    env = os.environ if environ is None else environ
    return env.setdefault(WAIT_POLICY, "PASSIVE")


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count a run uses and why, in words (``2 cores free``, ``1 of 2 cores busy``)."""

    count: int
    reason: str

    def describe(self) -> str:
        """``2 threads (2 cores free)``, ``1 thread (1 of 2 cores busy)``."""
        return f"{self.count} thread{'s' if self.count != 1 else ''} ({self.reason})"


def _cores(n: float) -> str:
    return f"{round(n, 2):g} core{'s' if n != 1 else ''}"


def choose_threads(
    cores: int, quota: Optional[float] = None, busy: float = 0.0, parallel_jobs: int = 1
) -> ThreadChoice:
    """The default thread count for a process that may run on ``cores`` cores (its affinity mask),
    under a cgroup CPU ``quota`` (in cores; None for none), while other processes keep ``busy``
    cores busy (a float: summed use over those cores), with ``parallel_jobs`` jobs of one sweep
    running at once. The rule:

    - the cores usable are ``cores``, or ``floor(quota)`` when that is fewer (a thread beyond the
      quota is throttled);
    - one job: the usable cores less the busy ones, ``busy`` rounded to whole cores (a core counts
      when others keep it at least half busy); a quota caps the cores free of other processes;
    - several parallel jobs: the usable cores divided among them (the busy cores are then mostly
      the sweep's own jobs, so they are not subtracted);
    - always at least 1.
    """
    cores = max(1, int(cores))
    usable = cores
    limit = ""
    if quota is not None and quota > 0 and math.floor(quota) < cores:
        usable = max(1, math.floor(quota))
        limit = f"a CPU quota of {_cores(quota)}"
    if parallel_jobs > 1:
        count = max(1, usable // parallel_jobs)
        return ThreadChoice(
            count, f"{_cores(usable)} shared by {parallel_jobs} parallel jobs" + (f"; {limit}" if limit else "")
        )
    taken = min(cores, max(0, int(math.floor(busy + 0.5))))
    free = cores - taken
    count = max(1, min(usable, free))
    busy_text = f"{taken} of {_cores(cores)} busy" if taken else ""
    if limit and usable <= free:  # the quota binds
        return ThreadChoice(count, limit + (f"; {busy_text}" if busy_text else ""))
    return ThreadChoice(count, busy_text or f"{_cores(free)} free")


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask; os.cpu_count where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _affinity() -> Optional[List[int]]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:
        return None


def parse_cpu_max(text: str) -> Optional[float]:
    """Cores allowed by a cgroup v2 ``cpu.max`` (``"150000 100000"`` -> 1.5; ``"max ..."`` -> None)."""
    fields = text.split()
    if not fields or fields[0] == "max":
        return None
    period = float(fields[1]) if len(fields) > 1 else 100000.0
    quota = float(fields[0])
    return quota / period if quota > 0 and period > 0 else None


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text()
    except (OSError, ValueError):
        return None


def _ancestors(mount: Path, cgroup_path: str) -> List[Path]:
    """The folders of ``cgroup_path`` under ``mount`` and of its ancestors (the mount itself last);
    inside a container the process's cgroup is often the mount itself."""
    parts = [p for p in cgroup_path.strip().split("/") if p]
    return [mount.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> Optional[float]:
    """The CPU quota (in cores) of this process's cgroup and its ancestors, the smallest, from
    cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``; None without one."""
    lines = (_read(proc_cgroup) or "").splitlines()
    quotas: List[float] = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if controllers == "":  # cgroup v2
            for folder in _ancestors(root, path):
                text = _read(folder / "cpu.max")
                found = parse_cpu_max(text) if text else None
                if found is not None:
                    quotas.append(found)
        elif "cpu" in controllers.split(","):  # cgroup v1
            for mount in (root / controllers, root / "cpu", root / "cpu,cpuacct", root / "cpuacct,cpu"):
                for folder in _ancestors(mount, path):
                    quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
                    try:
                        q, p = float(quota or -1), float(period or 0)
                    except ValueError:
                        continue
                    if q > 0 and p > 0:
                        quotas.append(q / p)
    return min(quotas) if quotas else None


def parse_proc_stat(text: str, cpus: Optional[Sequence[int]] = None) -> Dict[str, int]:
    """Busy and total ticks summed over the ``cpus`` lines (``cpuN``) of ``/proc/stat`` (all of
    them for None): busy is user+nice+system+irq+softirq+steal, total adds idle and iowait."""
    wanted = None if cpus is None else {f"cpu{i}" for i in cpus}
    busy = total = count = 0
    for line in text.splitlines():
        name, *values = line.split() or [""]
        if not (name.startswith("cpu") and name[3:].isdigit()) or (wanted is not None and name not in wanted):
            continue
        ticks = [int(v) for v in values[:8]] + [0] * max(0, 8 - len(values))
        user, nice, system, idle, iowait, irq, softirq, steal = ticks[:8]
        busy += user + nice + system + irq + softirq + steal
        total += user + nice + system + idle + iowait + irq + softirq + steal
        count += 1
    return {"busy": busy, "total": total, "cpus": count}


def busy_from_samples(before: Dict[str, int], after: Dict[str, int], own_seconds: float, clock_ticks: float) -> float:
    """The cores other processes kept busy between two :func:`parse_proc_stat` samples, during
    which this process used ``own_seconds`` of CPU: busy ticks less our own, over the ticks one
    CPU counted in that time."""
    cpus = max(1, after["cpus"])
    per_cpu = (after["total"] - before["total"]) / cpus
    if per_cpu <= 0:
        return 0.0
    others = (after["busy"] - before["busy"]) - own_seconds * clock_ticks
    return max(0.0, others / per_cpu)


def busy_cores(seconds: float = SAMPLE_SECONDS) -> float:
    """The cores of this process's affinity mask that other processes keep busy, watched for
    ``seconds`` (``/proc/stat``, less this process's own CPU time); where there is no
    ``/proc/stat``, the one-minute load average (which this process, seconds old, adds little to);
    0 where neither is known."""
    stat = Path("/proc/stat")
    cpus = _affinity()
    first = _read(stat)
    if first is None:
        try:
            return max(0.0, os.getloadavg()[0])
        except (AttributeError, OSError):
            return 0.0
    own = os.times()
    time.sleep(seconds)
    second = _read(stat) or first
    own_after = os.times()
    own_seconds = (own_after.user - own.user) + (own_after.system - own.system)
    return busy_from_samples(
        parse_proc_stat(first, cpus), parse_proc_stat(second, cpus), own_seconds, float(os.sysconf("SC_CLK_TCK"))
    )


_chosen: Optional[ThreadChoice] = None


def last_choice() -> Optional[ThreadChoice]:
    """What :func:`set_threads` last set, with its reason (None before it ran)."""
    return _chosen


def thread_reason(count: int) -> Optional[str]:
    """Why this run uses ``count`` threads (the reason :func:`set_threads` gave), or None when
    they were set some other way."""
    choice = last_choice()
    return choice.reason if choice is not None and choice.count == count else None


def threads_from_environment(environ: Optional[Mapping[str, str]] = None) -> Optional[int]:
    """The count ``$UAP_THREADS`` sets (None where it is unset or empty); ConfigError, naming the
    variable, for anything but a whole number of at least 1."""
    text = (os.environ if environ is None else environ).get(THREADS_VARIABLE, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(
            f"{THREADS_VARIABLE} must be a whole number of threads, at least 1; got {text!r} "
            f"(unset it to let each run choose from the cores free)"
        )
    return int(text)


def set_threads(threads: Optional[int], parallel_jobs: int = 1) -> int:
    """Set torch's intra-op threads to ``threads``, or (None) to ``$UAP_THREADS`` where set, else
    to :func:`choose_threads` of this process's cores, CPU quota and the cores others keep busy,
    with ``parallel_jobs`` jobs running at once; return the count set (:func:`last_choice` holds
    it with its reason). ConfigError for a count below 1."""
    global _chosen
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be at least 1 (or null: the cores this process may use); got {threads}")
    from_environment = threads_from_environment() if threads is None else None
    if threads is not None:
        choice = ThreadChoice(int(threads), f"threads={threads}")
    elif from_environment is not None:
        choice = ThreadChoice(from_environment, f"{THREADS_VARIABLE}={from_environment}")
    else:
        busy = busy_cores() if parallel_jobs <= 1 else 0.0
        choice = choose_threads(available_cores(), cpu_quota(), busy, parallel_jobs)
    import torch

    torch.set_num_threads(choice.count)
    _chosen = choice
    return choice.count
