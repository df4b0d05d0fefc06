"""What /proc says about a process: its children, CPU time, resident memory; and the machine's."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")
_INHERITED = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")


def inherited_env() -> dict[str, str]:
    """What a server under test takes from this environment: no settings of the caller's."""
    return {key: os.environ[key] for key in _INHERITED if key in os.environ}


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (which may hold spaces): state is [0]."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def children(pid: int) -> list[int]:
    """Live child processes of ``pid``."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(_stat_fields(int(entry.name))[1]) == pid:
                    found.append(int(entry.name))
    return sorted(found)


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return ""


def cpu_seconds(pid: int) -> float:
    """User + system CPU of the process, all its threads: the per-thread scheduler clocks (ns) where
    the kernel has them, else utime + stime from /proc/<pid>/stat (1/CLK_TCK resolution). 0 when
    the process is gone."""
    try:
        total = 0
        for task in os.scandir(f"/proc/{pid}/task"):
            total += int(Path(task.path, "schedstat").read_text().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        fields = _stat_fields(pid)
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """Resident memory now, or another /proc/<pid>/status size (``VmHWM``: its peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def machine_cpu_seconds() -> dict[str, float]:
    """CPU seconds of all cores since boot, from /proc/stat: ``tasks`` (user, nice, system: what
    processes ran), ``irq`` (hard and soft interrupts, where loopback traffic is partly handled),
    ``steal`` (taken by the hypervisor for other machines)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(value) for value in fields[:8])
    return {"tasks": (user + nice + system) / _TICK, "irq": (irq + softirq) / _TICK, "steal": steal / _TICK}


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
