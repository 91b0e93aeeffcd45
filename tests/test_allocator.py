"""modeling.allocator: glibc keeps tensor-sized blocks on its heap after `tune_malloc`."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from modeling import allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A fresh interpreter mallocs one 16 MiB block and reports how many bytes glibc mapped for it with
# mmap (mallinfo2's hblkhd): all of it under the defaults (threshold 128 KiB), none when tuned.
PROBE = """
import ctypes, sys
from modeling.allocator import tune_malloc
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
tuned = tune_malloc() if sys.argv[1] == "tune" else None
before = libc.mallinfo2().hblkhd
block = libc.malloc(16 << 20)
print(tuned, libc.mallinfo2().hblkhd - before)
"""


def probe(mode: str, env: dict[str, str] | None = None) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_a_tuned_process_serves_a_16_mib_block_from_the_heap_not_mmap():
    untouched, mapped = probe("default")
    assert untouched == "None" and mapped >= 16 << 20  # the block and its header, page-rounded
    assert probe("tune") == ("True", 0)


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_malloc_tunables_set_by_the_user_are_left_alone(monkeypatch):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    tuned, mapped = probe("tune", env)
    assert tuned == "False"
    assert mapped >= 16 << 20  # the user's 128 KiB threshold still maps the block
    monkeypatch.setenv("GLIBC_TUNABLES", "")
    assert allocator.tune_malloc() is False


def test_other_c_libraries_are_a_no_op(monkeypatch):
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert allocator.tune_malloc() is False
    monkeypatch.setattr(allocator.platform, "system", lambda: "Darwin")
    assert allocator.tune_malloc() is False
