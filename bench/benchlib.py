"""What the benchmarks in bench/ share: the machine they ran on and the timing loops.

Each benchmark is run from this directory (`cd bench && ../.venv/bin/python X.py`),
so `import benchlib` finds this file.
"""

from __future__ import annotations

import os
import platform
from time import perf_counter_ns as perf_ns
from typing import Any

import slitter
from slitter._native import lib


def machine() -> dict[str, Any]:
    """Cores, CPU model, Python and platform, for the record next to every figure."""
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "implementation": platform.python_implementation(), "platform": platform.platform()}


def loop_two_noops(n: int) -> float:
    """ns per iteration of two empty cffi calls: the floor of a Python pair."""
    noop = lib.slitter_noop
    t0 = perf_ns()
    for _ in range(n):
        noop()
        noop()
    return (perf_ns() - t0) / n


def loop_py_pairs(cls: slitter.Class, n: int) -> float:
    """ns per ``release(allocate())`` from Python."""
    allocate, release = cls.allocate, cls.release
    t0 = perf_ns()
    for _ in range(n):
        release(allocate())
    return (perf_ns() - t0) / n
