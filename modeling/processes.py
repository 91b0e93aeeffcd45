"""Is a process still alive? (Linux `/proc`, with the POSIX signal-0 probe as the fallback.)

A killed process its parent has not reaped yet is a zombie: dead for our purposes. A process id can be
reused by a new process after the old one died, so a caller that recorded the process's start time
(`start_ticks`) is told "dead" when the id now belongs to a process started at another time.
"""

from __future__ import annotations

import os
from pathlib import Path


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state is [0], start time is [19])."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start_ticks(pid: int) -> int | None:
    """When the process started, in clock ticks since boot (None where /proc is not available)."""
    fields = _stat_fields(pid)
    try:
        return int(fields[19]) if fields else None
    except (IndexError, ValueError):
        return None


def process_alive(pid: int, start_ticks: int | None = None) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    fields = _stat_fields(pid)
    if fields is None:
        return True  # no /proc: the signal probe said it exists
    if fields[0] == "Z":
        return False
    return start_ticks is None or process_start_ticks(pid) == start_ticks
