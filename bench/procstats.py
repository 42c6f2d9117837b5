"""What a process costs, read from /proc: CPU seconds, resident memory now and at its peak (bench and soak)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any


class ProcessGone(RuntimeError):
    """The process has exited (its /proc entry is gone, or a zombie's holds no memory figures)."""


def _status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text()
    except OSError as exc:
        raise ProcessGone(f"pid {pid}: {exc}") from exc


def rss_mib(pid: int) -> float:
    """Resident set size of a process (VmRSS), MiB."""
    for line in _status(pid).splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ProcessGone(f"no VmRSS for pid {pid}")


def peak_rss_mib(pid: int) -> float:
    """Peak resident set size so far (VmHWM), MiB; 0.0 where the kernel does not say."""
    for line in _status(pid).splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _cpu_of_stat(stat: str) -> float:
    # utime + stime: fields 14 and 15, counted after the command name, which may hold spaces.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads, in seconds."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError as exc:
        raise ProcessGone(f"pid {pid}: {exc}") from exc
    return _cpu_of_stat(stat)


def thread_cpu_seconds() -> dict[int, float]:
    """CPU seconds per native thread id of this process."""
    found = {}
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            found[int(task.name)] = _cpu_of_stat((task / "stat").read_text())
    return found


@contextlib.asynccontextmanager
async def watched(pids: Mapping[str, int], rss_pid: int | None) -> AsyncIterator[dict[str, Any]]:
    """CPU seconds per named process over the block, and the peak RSS of ``rss_pid``."""
    found: dict[str, Any] = {}
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    peak = 0.0

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_mib(rss_pid)) if rss_pid is not None else 0.0
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    try:
        yield found
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        found["cpu_s"] = {name: round(cpu_seconds(pid) - before[name], 2) for name, pid in pids.items()}
        if rss_pid is not None:
            found["peak_rss_mib"] = round(max(peak, rss_mib(rss_pid)), 1)
