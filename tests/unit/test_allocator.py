"""components.allocator: freed memory kept in the process, and glibc's defaults restored."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

PROBE = """
import json, resource
from lcron_dist.components.allocator import freed_memory_kept

BLOCK = 64 << 20

def faults_of_a_reallocated_block():
    bytearray(b"\\x01") * BLOCK  # made and freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = bytearray(b"\\x01") * BLOCK  # written through: every page touched
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults_of_a_reallocated_block()
with freed_memory_kept():
    kept = faults_of_a_reallocated_block()
after = faults_of_a_reallocated_block()
print(json.dumps({"pages": BLOCK // resource.getpagesize(), "default": default, "kept": kept, "after": after}))
"""
"""Run in a fresh interpreter: a Trainer built earlier in the test process keeps freed memory for good."""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the allocator settings are glibc's")
def test_freed_memory_kept_reuses_freed_blocks_and_restores_the_defaults() -> None:
    got = json.loads(subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout)
    pages = got["pages"]
    if got["default"] < pages // 2:
        pytest.skip("this system backs big blocks with huge pages: no faults to save")
    assert got["kept"] < pages // 20, f"a block freed inside freed_memory_kept came back with page faults: {got}"
    assert got["after"] >= pages // 2, f"glibc's defaults are back after freed_memory_kept: {got}"
