"""Mapping the instance's segments into this process, natively.

Segments are opened with ``os.open`` under /dev/shm and mapped with mmap(2)
through cffi, never through ``multiprocessing.shared_memory``: its
resource_tracker unlinks segments when a process that merely attached exits
(gh-82300), which would destroy the arena.  Both the daemon and the client
use this module; the daemon creates, the client only opens.
"""

from __future__ import annotations

import os
from pathlib import Path

from slitter._native import ffi, lib

PAGE = lib.SLITTER_PAGE_SIZE
RW = lib.PROT_READ | lib.PROT_WRITE


def page_align(n: int) -> int:
    """Round ``n`` up to a whole page."""
    return (n + PAGE - 1) & ~(PAGE - 1)


class Mapping:
    """One mmap(2) of a segment range; unmapped by ``close()`` or when collected.

    With ``guarded=True`` the range sits between two PROT_NONE pages of an
    anonymous reservation, so a stray access just before or after it faults
    instead of landing in whatever the kernel mapped next door.
    """

    def __init__(self, fd: int, length: int, prot: int, offset: int = 0, *, noreserve: bool = False,
                 guarded: bool = False) -> None:
        flags = lib.MAP_SHARED | (lib.MAP_NORESERVE if noreserve else 0)
        self.length = length
        self.reserved = None
        if guarded:
            reserve = length + 2 * PAGE
            base = _check(lib.mmap(ffi.NULL, reserve, lib.PROT_NONE,
                                   lib.MAP_PRIVATE | lib.MAP_ANONYMOUS | lib.MAP_NORESERVE, -1, 0), reserve, 0)
            self.reserved = (base, reserve)
            try:
                ptr = _check(lib.mmap(base + PAGE, length, prot, flags | lib.MAP_FIXED, fd, offset), length, offset)
            except OSError:
                lib.munmap(base, reserve)
                raise
        else:
            ptr = _check(lib.mmap(ffi.NULL, length, prot, flags, fd, offset), length, offset)
        self.ptr = ffi.cast("unsigned char *", ptr)

    def protect(self, offset: int, length: int, prot: int) -> None:
        """mprotect(2) a page-aligned range of this mapping."""
        if lib.mprotect(self.ptr + offset, length, prot) != 0:
            err = ffi.errno
            raise OSError(err, f"mprotect at offset {offset:#x}: {os.strerror(err)}")

    def close(self) -> None:
        """Unmap (with the guard pages); idempotent."""
        if self.ptr is not None:
            if self.reserved is not None:
                lib.munmap(*self.reserved)
            else:
                lib.munmap(self.ptr, self.length)
            self.ptr = None

    def __del__(self) -> None:
        self.close()


def _check(ptr, length: int, offset: int):
    if int(ffi.cast("intptr_t", ptr)) == -1:
        err = ffi.errno
        raise OSError(err, f"mmap of {length} bytes at offset {offset}: {os.strerror(err)}")
    return ffi.cast("unsigned char *", ptr)


def open_segment(path: Path, *, create: bool = False, mode: int = 0o600) -> int:
    """Open (or exclusively create) a segment file; returns the fd."""
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if create else 0)
    return os.open(path, flags, mode)


class GuardApplier:
    """Applies the guard pages of runs carved after this process mapped the arena.

    Every run ends in a guard page, and the first span is a guard span; a
    process must make them PROT_NONE in its own mapping before it can touch
    an object of a new run, so it calls ``apply()`` on every slow path.
    """

    def __init__(self, header, runs, data: Mapping) -> None:
        self.header = header
        self.runs = runs
        self.data = data
        self.applied = 0
        data.protect(0, lib.SLITTER_SPAN_SIZE, lib.PROT_NONE)

    def apply(self) -> None:
        """Protect the guard pages of every run published since the last call."""
        nruns = self.header.nruns
        span = lib.SLITTER_SPAN_SIZE
        while self.applied < nruns:
            run = self.runs[self.applied]
            end = (run.first_span + run.nspans) * span
            self.data.protect(end - PAGE, PAGE, lib.PROT_NONE)
            self.applied += 1
