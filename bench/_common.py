"""Shared bench helpers: machine facts, peak RSS, and writing a section of BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
sys.path.insert(0, str(ROOT))  # bench scripts import the project and tests.pandas_reference


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def machine() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "unknown"
    try:
        kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f"{kib / 1024**2:.0f} GiB"
    except (OSError, AttributeError):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "memory": mem, "python": platform.python_version()}


@contextmanager
def timed(results: dict, name: str):
    start = time.perf_counter()
    yield
    results[name] = time.perf_counter() - start


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"


def read_section(name: str) -> str | None:
    """The block between `<!-- bench:name -->` markers in BENCHMARKS.md (None if absent)."""
    begin, end = _markers(name)
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else ""
    if begin not in text or end not in text:
        return None
    return text[text.index(begin) + len(begin) : text.index(end)]


def write_section(name: str, markdown: str) -> None:
    """Replace the block between `<!-- bench:name -->` markers in BENCHMARKS.md (append if absent)."""
    begin, end = _markers(name)
    block = f"{begin}\n{markdown.rstrip()}\n{end}"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS_MD.write_text(text)


def save_json(name: str, payload: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


def daily_series(data: dict):
    """A daily series stored as JSON ({"YYYY-MM-DD": value}) back as a float Series on a date index."""
    import pandas as pd

    return pd.Series(list(data.values()), index=pd.to_datetime(list(data.keys())), dtype=float)
