"""CPU thread policy: never oversubscribe cores that other processes are using.

PyTorch starts one intra-op thread per core. On a shared machine that oversubscribes: OpenMP
threads spin at barriers waiting for a thread the scheduler gave to another process, and a batch
``generate`` on 2 cores with one other busy process ran 17-20x slower with 2 threads than with 1
(see ``bench/threads.py`` and docs/performance.md). The default here is

    threads = cores this process may use - runnable tasks of other processes, at least 1

where "cores this process may use" is the CPU affinity mask (``taskset``), capped by a cgroup CPU
quota (containers), and "runnable tasks" is ``procs_running`` in ``/proc/stat`` (sampled a few
times, minus this process). It is decided once, when a command starts.

Precedence: an explicit ``--threads N`` / :func:`set_threads(N) <set_threads>` >
``$PARAENCODER_THREADS`` > ``$OMP_NUM_THREADS`` (when you set it) > the policy above.
``--threads auto`` (or ``PARAENCODER_THREADS=auto``) forces the policy.

Python API::

    import paraencoder
    paraencoder.set_threads()      # the policy (what every `paraencoder` command does first)
    paraencoder.set_threads(1)     # or an explicit count (same as torch.set_num_threads(1))

This module does not import torch: when torch is not imported yet it sets ``OMP_NUM_THREADS``
(read when torch loads, and inherited by worker processes); otherwise it calls
``torch.set_num_threads``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

__all__ = ["applied_threads", "usable_cores", "other_runnable", "default_threads", "resolve_threads", "set_threads", "add_threads_argument", "THREADS_ENV"]

THREADS_ENV = "PARAENCODER_THREADS"
_applied: int | None = None  # what set_threads last applied in this process


def usable_cores() -> int:
    """CPUs this process may run on: the affinity mask, capped by a cgroup (v2 or v1) CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, int(quota + 0.5)))
    return max(1, cores)


def _cgroup_quota() -> float | None:
    try:
        text = open("/sys/fs/cgroup/cpu.max").read().split()  # v2: "max 100000" or "200000 100000"
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read())
        period = int(open("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read())
        if quota > 0 and period > 0:
            return quota / period
    except (OSError, ValueError):
        pass
    return None


def _procs_running() -> int | None:
    try:
        with open("/proc/stat") as handle:
            for line in handle:
                if line.startswith("procs_running"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def other_runnable(samples: int = 5, interval_s: float = 0.02) -> float:
    """Runnable tasks (threads) of other processes, scaled to this process's share of the machine.

    The median of ``samples`` reads of ``procs_running`` minus one (this process, which is running
    while it reads). When this process may use only part of the machine's CPUs, the count is scaled
    by that share. 0 where ``/proc/stat`` does not exist (macOS, Windows).
    """
    counts = []
    for i in range(samples):
        value = _procs_running()
        if value is None:
            return 0.0
        counts.append(value)
        if i + 1 < samples:
            time.sleep(interval_s)
    others = max(0.0, statistics.median(counts) - 1)
    total = os.cpu_count() or 1
    return others * min(1.0, usable_cores() / total)


def default_threads() -> int:
    """The policy: usable cores minus the other runnable tasks, at least 1."""
    return max(1, usable_cores() - int(round(other_runnable())))


def _parse(value: str | int | None, source: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, int):
        n = value
    else:
        text = str(value).strip().lower()
        if text in ("", "auto", "0"):
            return None
        try:
            n = int(text)
        except ValueError:
            from paraencoder.errors import ConfigError

            raise ConfigError(f"{source}={value!r}: give a number of threads (e.g. 1) or 'auto'") from None
    if n < 0:
        from paraencoder.errors import ConfigError

        raise ConfigError(f"{source}={value!r}: give a positive number of threads or 'auto'")
    return n or None


def resolve_threads(threads: int | str | None = None) -> tuple[int, str]:
    """(threads, where that number came from) under the precedence in the module docstring."""
    explicit = _parse(threads, "--threads")
    if explicit:
        return explicit, "--threads"
    if threads is not None:  # "auto" or 0
        return default_threads(), "policy"
    env = os.environ.get(THREADS_ENV)
    if env is not None:
        n = _parse(env, THREADS_ENV)
        return (n, THREADS_ENV) if n else (default_threads(), "policy")
    omp = os.environ.get("OMP_NUM_THREADS")
    if omp and os.environ.get("_PARAENCODER_OMP_SET") != omp:  # set by the user, not by us
        try:
            if int(omp) > 0:
                return int(omp), "OMP_NUM_THREADS"
        except ValueError:
            pass
    return default_threads(), "policy"


def set_threads(threads: int | str | None = None, *, verbose: bool = False) -> int:
    """Apply the thread policy (or an explicit count) to torch in this process; returns the count.

    ``threads``: a number, ``None`` (``$PARAENCODER_THREADS``, ``$OMP_NUM_THREADS``, else the
    policy) or ``"auto"`` (the policy). Safe to call before or after ``import torch``.
    """
    global _applied
    n, source = resolve_threads(threads)
    if "torch" in sys.modules:
        import torch

        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    else:
        # torch reads it at import; child processes (DataLoader workers, DDP ranks) inherit it.
        os.environ["OMP_NUM_THREADS"] = str(n)
        os.environ["_PARAENCODER_OMP_SET"] = str(n)
    _applied = n
    if verbose:
        print(f"[paraencoder] {n} CPU thread{'s' if n != 1 else ''} ({source}; {usable_cores()} usable cores)", file=sys.stderr)
    return n


def applied_threads() -> int | None:
    """What :func:`set_threads` last applied in this process (``None``: never called)."""
    return _applied


class _ThreadsAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        set_threads(values if values is not None else None)


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads N|auto`` on an argparse parser; parsing it applies it at once (see :func:`set_threads`)."""
    parser.add_argument(
        "--threads",
        default=None,
        action=_ThreadsAction,
        metavar="N|auto",
        help=f"CPU threads for torch (default: ${THREADS_ENV}, else usable cores minus other busy processes, at least 1)",
    )
