"""What the backing memory costs a copy: tmpfs shared memory against anonymous memory and huge pages.

Issue 6 asks whether copies into tmpfs-backed shared memory (a POSIX
shm segment, as slitter's arena and every SharedMemory peer use) are
slower than into anonymous memory, which can have transparent huge pages,
and whether hugepage-backed classes would beat the ring.  This measures
the copy itself, in one process, with the streaming workload's own
per-record lines: write a record from a template (a memoryview slice
assignment), then take its CRC-32.

Backings, each a fresh mapping per repetition, run back to back:

- anonymous: ``mmap(-1)``, private, ``MADV_NOHUGEPAGE``: 4 KiB pages, the
  baseline of every ratio;
- anonymous + THP: the same with ``MADV_HUGEPAGE`` (used only where
  ``transparent_hugepage/enabled`` allows it: the table says what the
  kernel did, from ``AnonHugePages`` in ``/proc/self/smaps``);
- tmpfs (POSIX shm): ``SharedMemory(create=True)``, ``MAP_SHARED`` on
  ``/dev/shm``, as the arena; its huge pages depend on
  ``transparent_hugepage/shmem_enabled`` (``ShmemPmdMapped``);
- hugetlb: ``memfd_create(MFD_HUGETLB)``, 2 MiB pages, only when the
  kernel has enough free huge pages (``HugePages_Free``); otherwise the
  row says why it did not run.

Two working sets per record size (64 B, 1 KiB, 64 KiB): the streaming
ring's (4 batches of 64 records, cycled) and 64 MiB (slitter's magazines
at 64 KiB cycle through megabytes).  The backings of a repetition run
back to back, each one first in turn.  Reported: records/s over each
repetition's passes after the first (pages already faulted in), the
first pass over the fresh 64 MiB mapping (page faults included) in MiB/s,
medians of the repetitions, and each backing ÷ anonymous per repetition.

    cd bench && ../.venv/bin/python backing.py [--quick] [--json]
"""

from __future__ import annotations

import mmap
import os
import statistics
import sys
import time
import zlib
from multiprocessing import shared_memory
from typing import Any, Callable

from benchlib import cli, machine

SIZES = (64, 1024, 65536)
RING_RECORDS = 4 * 64
BIG = 64 << 20
HUGE_PAGE = 2 << 20
REPEATS, SECONDS = 5, 0.3
QUICK_REPEATS, QUICK_SECONDS = 2, 0.1
BACKINGS = ("anonymous", "anonymous + THP", "tmpfs (POSIX shm)", "hugetlb")


def _sysfs_choice(path: str) -> str:
    """The mode a sysfs switch is set to: the bracketed word of "always [madvise] never"."""
    try:
        with open(path) as f:
            words = f.read().split()
    except OSError:
        return "unknown"
    return next((w.strip("[]") for w in words if w.startswith("[")), " ".join(words))


def _meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _huge_kib(address: int, field: str) -> int:
    """``field`` (AnonHugePages, ShmemPmdMapped, ...) of the mapping at ``address`` in /proc/self/smaps, in KiB."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == field + ":":
                return int(line.split()[1])
    return 0


class Mapping:
    """A fresh mapping of ``size`` bytes of one backing; ``buf`` is its memoryview; ``close()`` frees it."""

    def __init__(self, backing: str, size: int) -> None:
        self.backing, self._shm, self._mm, self._fd, self.buf = backing, None, None, -1, None
        try:
            if backing.startswith("anonymous"):
                self._mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                self._mm.madvise(mmap.MADV_HUGEPAGE if backing.endswith("THP") else mmap.MADV_NOHUGEPAGE)
            elif backing.startswith("tmpfs"):
                self._shm = shared_memory.SharedMemory(create=True, size=size)
            else:
                self._fd = os.memfd_create("slitter-bench-hugetlb",
                                           os.MFD_HUGETLB | os.MFD_HUGE_2MB | os.MFD_CLOEXEC)
                size = -(-size // HUGE_PAGE) * HUGE_PAGE  # whole 2 MiB pages
                os.ftruncate(self._fd, size)
                self._mm = mmap.mmap(self._fd, size)  # MAP_SHARED: reserves the huge pages now, or ENOMEM
            self.buf = memoryview(self._shm.buf if self._shm else self._mm)
            self.address = _address_of(self.buf)
        except BaseException:
            self.close()
            raise

    def huge_kib(self) -> int:
        field = {"anonymous": "AnonHugePages", "anonymous + THP": "AnonHugePages",
                 "tmpfs (POSIX shm)": "ShmemPmdMapped", "hugetlb": "Private_Hugetlb"}[self.backing]
        kib = _huge_kib(self.address, field)
        return kib + (_huge_kib(self.address, "Shared_Hugetlb") if self.backing == "hugetlb" else 0)

    def close(self) -> None:
        if self.buf is not None:
            self.buf.release()
        if self._shm is not None:
            self._shm.close()
            self._shm.unlink()
        if self._mm is not None:
            self._mm.close()
        if self._fd >= 0:
            os.close(self._fd)


def _address_of(buf: memoryview) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def why_not(backing: str) -> str | None:
    """Why ``backing`` cannot run here, or None."""
    if backing == "hugetlb":
        if _meminfo("Hugepagesize") * 1024 != HUGE_PAGE:
            return f"the default huge page is {_meminfo('Hugepagesize')} KiB, not {HUGE_PAGE >> 10}"
        free = _meminfo("HugePages_Free") * HUGE_PAGE
        if free < BIG:
            return (f"HugePages_Free × 2 MiB = {free >> 20} MiB, under the {BIG >> 20} MiB it needs "
                    f"(sysctl vm.nr_hugepages)")
    return None


def passes(buf: memoryview, size: int, records: int, seconds: float) -> tuple[float, float]:
    """(seconds of the first pass, records/s of the passes after it, for ``seconds``): write then CRC-32 each."""
    tmpl, crc32 = bytes(range(256)) * (size // 256) or bytes(range(size)), zlib.crc32
    offsets = range(0, records * size, size)

    def one_pass() -> None:
        for off in offsets:
            buf[off:off + size] = tmpl
            crc32(buf[off:off + size])

    start = time.perf_counter()
    one_pass()
    first = time.perf_counter() - start
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        one_pass()
        done += records
    return first, done / (time.perf_counter() - start)


def run(mode: str, progress: Callable[[str], None]) -> dict[str, Any]:
    reps, seconds = (QUICK_REPEATS, QUICK_SECONDS) if mode == "quick" else (REPEATS, SECONDS)
    skipped = {b: why_not(b) for b in BACKINGS}
    live = [b for b in BACKINGS if skipped[b] is None]
    rows: dict[tuple, list[dict[str, float]]] = {}
    huge: dict[str, int] = {}
    for rep in range(reps):
        for size in SIZES:
            for ws, records in (("ring", RING_RECORDS), ("64 MiB", BIG // size)):
                order = live[rep % len(live):] + live[:rep % len(live)]  # each backing first in turn
                for backing in order:
                    progress(f"repetition {rep + 1}/{reps}: {size} B, {ws}, {backing}")
                    m = Mapping(backing, records * size)
                    try:
                        first, rate = passes(m.buf, size, records, seconds)
                        huge[backing] = max(huge.get(backing, 0), m.huge_kib())
                    finally:
                        m.close()
                    rows.setdefault((size, ws), []).append(
                        {"backing": backing, "rep": rep, "rate": rate,
                         "first_mib_s": records * size / first / 2**20})
    results = []
    for (size, ws), samples in rows.items():
        base = {s["rep"]: s for s in samples if s["backing"] == "anonymous"}
        for backing in live:
            mine = [s for s in samples if s["backing"] == backing]
            results.append({
                "size": size, "working_set": ws, "backing": backing,
                "rate": statistics.median(s["rate"] for s in mine),
                "first_mib_s": statistics.median(s["first_mib_s"] for s in mine),
                "ratio": statistics.median(s["rate"] / base[s["rep"]]["rate"] for s in mine),
                "first_ratio": statistics.median(s["first_mib_s"] / base[s["rep"]]["first_mib_s"] for s in mine),
            })
    return {"machine": machine(), "mode": mode, "repetitions": reps, "seconds": seconds,
            "kernel": {"thp_enabled": _sysfs_choice("/sys/kernel/mm/transparent_hugepage/enabled"),
                       "thp_shmem_enabled": _sysfs_choice("/sys/kernel/mm/transparent_hugepage/shmem_enabled"),
                       "hugepages_total": _meminfo("HugePages_Total")},
            "huge_kib_seen": huge, "skipped": {b: why for b, why in skipped.items() if why},
            "results": results}


def print_tables(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    k = result["kernel"]
    table = Table(title=f"Write + CRC-32 per record, by backing memory: medians of {result['repetitions']} "
                        f"repetitions (THP {k['thp_enabled']}; shmem THP {k['thp_shmem_enabled']}; "
                        f"HugePages_Total {k['hugepages_total']})")
    for col in ("record", "working set", "backing", "records/s", "÷ anonymous", "first pass MiB/s",
                "÷ anonymous"):
        table.add_column(col, justify="left" if col in ("working set", "backing") else "right")
    for r in result["results"]:
        table.add_row(f"{r['size']:,} B", r["working_set"], r["backing"], f"{r['rate'] / 1e3:,.0f} k/s",
                      f"{r['ratio']:.2f}", f"{r['first_mib_s']:,.0f}", f"{r['first_ratio']:.2f}")
    Console(width=max(120, Console().width)).print(table)
    seen = ", ".join(f"{b}: {kib >> 10} MiB" for b, kib in result["huge_kib_seen"].items())
    print(f"huge pages mapped at most (smaps): {seen}")
    for backing, why in result["skipped"].items():
        print(f"{backing}: not run: {why}")
    print("first pass: the fresh 64 MiB mapping's first write + CRC pass, page faults included "
          "(for the ring working set, its first pass)")


def main(argv: list[str] | None = None) -> int:
    return cli(__doc__, run, print_tables, f"{QUICK_REPEATS} repetitions of {QUICK_SECONDS} s", argv)


if __name__ == "__main__":
    sys.exit(main())
