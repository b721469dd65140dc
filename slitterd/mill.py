"""The ``Mill`` carves runs of spans out of the ``Arena`` for one class at a time.

A run belongs to its class forever (type stability).  Before the mill
publishes a run it commits the run's object bytes with fallocate(2), so a
full /dev/shm is an ``OutOfMemory`` here, never a SIGBUS in a client, and it
makes the guard page after the run PROT_NONE in the daemon's mapping
(clients do the same for their own mapping when they see the run).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from slitter import errors
from slitter._native import ffi, lib
from slitter.shm import PAGE

from slitterd.arena import Arena

SPAN = lib.SLITTER_SPAN_SIZE
MIN_RUN_BYTES = 1 << 20
MIN_RUN_OBJECTS = 16  # a run is committed whole: keep runs of large objects modest
#: A class's magazines start at most this big; a streaming thread's grow to SLITTER_MAG_CAP.
START_MAG_CAP = 4096


@dataclass(frozen=True)
class ClassGeometry:
    """How a class's objects sit in its runs, and how many a magazine holds."""

    size: int
    stride: int
    objects_per_run: int
    spans_per_run: int
    mag_capacity: int

    @classmethod
    def for_size(cls, size: int) -> ClassGeometry:
        stride = -(-size // lib.SLITTER_MIN_STRIDE) * lib.SLITTER_MIN_STRIDE
        target = min(max(MIN_RUN_BYTES, MIN_RUN_OBJECTS * stride) + PAGE, lib.SLITTER_MAX_RUN)
        spans = -(-target // SPAN)
        objects = (spans * SPAN - PAGE) // stride
        # Magazines start at up to 1 MiB of objects (and at most 4096
        # handles) and at least 64 large ones, so a batch of 64 takes one
        # round trip whatever the size (64 KiB objects: 4 MiB per magazine).
        # A message costs the daemon about 75 µs of CPU and the sending
        # thread 25-30 µs even unanswered, so small objects get big
        # magazines, and a thread that streams grows its own up to the
        # layout's SLITTER_MAG_CAP (Instance._magazine_size).
        capacity = max(64, min(START_MAG_CAP, (1 << 20) // stride))
        return cls(size, stride, objects, spans, capacity)


@dataclass
class Run:
    """A run being carved: handles ``base + i * stride`` for ``next_index <= i < nobjects``.

    ``entry`` is the run's table entry; its ``carved`` field is the bump
    pointer kept in the segment, so a restarted daemon knows which objects
    were ever handed out.
    """

    base: int
    nobjects: int
    entry: object
    next_index: int = 0


class Mill:
    """Carves runs from the arena's unused spans."""

    def __init__(self, arena: Arena) -> None:
        self.arena = arena

    def carve_run(self, class_id: int) -> Run:
        """Create, commit and publish a new run of ``class_id``.

        Raises:
            OutOfMemory: the arena has no spans left, or /dev/shm cannot back the run.
        """
        header = self.arena.header
        cls = self.arena.classes[class_id]
        first, nspans = header.next_span, cls.spans_per_run
        name = class_name(cls)
        if first + nspans > header.nspans:
            raise errors.OutOfMemory(
                f"class '{name}': the arena of {header.arena_size} bytes has no room for another "
                f"run of {nspans * SPAN} bytes", class_name=name)
        base = first * SPAN
        object_bytes = -(-cls.objects_per_run * cls.stride // PAGE) * PAGE
        try:
            os.posix_fallocate(self.arena.data_fd, base, object_bytes)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                raise errors.OutOfMemory(
                    f"class '{name}': shared memory cannot back a run of {object_bytes} bytes "
                    f"({os.strerror(exc.errno)})", class_name=name) from None
            raise
        obj_base = header.objects_mapped
        for span in range(first, first + nspans):
            entry = self.arena.spans[span]
            entry.run_first_span = first
            entry.obj_base = obj_base
            entry.class_id = class_id
        run = self.arena.runs[header.nruns]
        run.first_span, run.nspans, run.class_id = first, nspans, class_id
        run.nobjects, run.obj_base, run.carved = cls.objects_per_run, obj_base, 0
        header.objects_mapped = obj_base + -(-cls.objects_per_run // 64) * 64
        self.arena.data.protect(base + nspans * SPAN - PAGE, PAGE, lib.PROT_NONE)
        # Publish: readers check next_span before they read a span entry.
        header.nruns += 1
        header.next_span = first + nspans
        return Run(base, cls.objects_per_run, run)


def class_name(cls) -> str:
    return ffi.string(cls.name).decode()
