"""The ``Arena``: an instance's two shared-memory segments, laid out and mapped.

The data segment is reserved at a fixed sparse size (MAP_NORESERVE) and never
moves; the ``Mill`` carves it into runs.  The meta segment holds the layout
of native/layout.h, which this module computes once at creation and reads
back (validating magic and version) when an instance is reopened.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from slitter import address
from slitter._native import ffi, lib
from slitter.shm import PAGE, RW, GuardApplier, Mapping, open_segment, page_align

MIN_ARENA = 16 << 20


class LayoutError(RuntimeError):
    """An existing segment is not a slitter instance of this layout version."""


@dataclass(frozen=True)
class Geometry:
    """Offsets and sizes of the meta segment for one arena size."""

    arena_size: int
    nspans: int
    span_table_off: int
    run_table_off: int
    class_table_off: int
    totals_off: int
    tables_end: int
    live_map_off: int
    live_map_bytes: int
    owners_off: int
    departed_off: int
    rack_area_off: int
    rack_size: int
    max_racks: int
    shelf_off: int
    shelf_bytes: int
    meta_size: int

    @classmethod
    def for_arena(cls, arena_size: int, max_racks: int) -> Geometry:
        span = lib.SLITTER_SPAN_SIZE
        if arena_size < MIN_ARENA or arena_size % span:
            raise ValueError(f"arena size must be a multiple of {span} and at least {MIN_ARENA}")
        if arena_size >= 1 << 48:
            raise ValueError("arena size must be below 2**48 (handles keep 48 offset bits)")
        if not 1 <= max_racks <= 64:
            raise ValueError("max clients must be 1..64 (one rack each)")
        nspans = arena_size // span
        off = page_align(ffi.sizeof("struct slitter_header"))
        span_table_off, off = off, page_align(off + nspans * ffi.sizeof("struct slitter_span"))
        run_table_off, off = off, page_align(off + nspans * ffi.sizeof("struct slitter_run"))
        class_table_off = off
        totals_off = off + lib.SLITTER_MAX_CLASSES * ffi.sizeof("struct slitter_class")
        tables_end = page_align(totals_off + lib.SLITTER_MAX_CLASSES * ffi.sizeof("struct slitter_class_totals"))
        # A run rounds its first object up to a multiple of 64 entries.
        objects = arena_size // lib.SLITTER_MIN_STRIDE + 64 * nspans
        live_map_off, live_map_bytes = tables_end, page_align(objects)
        owners_off = live_map_off + live_map_bytes  # daemon-only
        departed_off = owners_off + page_align(max_racks * ffi.sizeof("struct slitter_rack_owner"))
        rack_area_off = departed_off + page_align(ffi.sizeof("struct slitter_departed_log"))
        rack_size = page_align(ffi.sizeof("struct slitter_rack"))
        shelf_off = rack_area_off + rack_size * max_racks
        shelf_bytes = page_align(ffi.sizeof("struct slitter_shelf"))
        return cls(arena_size, nspans, span_table_off, run_table_off, class_table_off, totals_off, tables_end,
                   live_map_off, live_map_bytes, owners_off, departed_off,
                   rack_area_off, rack_size, max_racks, shelf_off, shelf_bytes, shelf_off + shelf_bytes)


class Arena:
    """The mapped segments of one instance, as the daemon sees them (all read-write)."""

    def __init__(self, instance: str, meta_fd: int, data_fd: int, geometry: Geometry) -> None:
        self.instance = instance
        self.meta_fd = meta_fd
        self.data_fd = data_fd
        self.geometry = geometry
        self.meta = Mapping(meta_fd, geometry.meta_size, RW, noreserve=True, guarded=True)
        self.data = Mapping(data_fd, geometry.arena_size, RW, noreserve=True)
        base = self.meta.ptr
        self.header = ffi.cast("struct slitter_header *", base)
        self.spans = ffi.cast("struct slitter_span *", base + geometry.span_table_off)
        self.runs = ffi.cast("struct slitter_run *", base + geometry.run_table_off)
        self.classes = ffi.cast("struct slitter_class *", base + geometry.class_table_off)
        self.totals = ffi.cast("struct slitter_class_totals *", base + geometry.totals_off)
        self.owners = ffi.cast("struct slitter_rack_owner *", base + geometry.owners_off)
        self.departed = ffi.cast("struct slitter_departed_log *", base + geometry.departed_off)
        self.shelf = ffi.cast("struct slitter_shelf *", base + geometry.shelf_off)
        self.view = ffi.new("struct slitter_view *")
        self.guards = None
        self._init_view()

    def _init_view(self) -> None:
        """Point the native view at the tables (again, once a new header is written)."""
        base, g = self.meta.ptr, self.geometry
        lib.slitter_view_init(self.view, base, base + g.live_map_off, self.data.ptr)

    @classmethod
    def create(cls, instance: str, arena_size: int, max_racks: int, mode: int = 0o600) -> Arena:
        """Create the segments of a new instance; fails if they exist."""
        geometry = Geometry.for_arena(arena_size, max_racks)
        meta_path, data_path = address.segment_paths(instance)
        meta_fd = open_segment(meta_path, create=True, mode=mode)
        try:
            data_fd = open_segment(data_path, create=True, mode=mode)
        except BaseException:
            os.close(meta_fd)
            meta_path.unlink(missing_ok=True)
            raise
        try:
            os.fchmod(meta_fd, mode)
            os.fchmod(data_fd, mode)
            os.ftruncate(meta_fd, geometry.meta_size)
            os.ftruncate(data_fd, arena_size)
            arena = cls(instance, meta_fd, data_fd, geometry)
            arena._write_header()
            arena._init_view()
            arena.guards = GuardApplier(arena.header, arena.runs, arena.data)
        except BaseException:
            os.close(meta_fd)
            os.close(data_fd)
            remove_segments(instance)
            raise
        return arena

    @classmethod
    def open(cls, instance: str) -> Arena:
        """Reopen an existing instance, validating its header; raises LayoutError."""
        meta_path, data_path = address.segment_paths(instance)
        meta_fd = open_segment(meta_path)
        data_fd = open_segment(data_path)
        header_map = Mapping(meta_fd, PAGE, lib.PROT_READ)
        header = ffi.cast("struct slitter_header *", header_map.ptr)
        try:
            if os.fstat(meta_fd).st_size < PAGE or header.magic != lib.SLITTER_LAYOUT_MAGIC:
                raise LayoutError(f"{meta_path} is not a slitter meta segment (bad magic)")
            if header.version != lib.SLITTER_LAYOUT_VERSION:
                raise LayoutError(f"{meta_path} has layout version {header.version}; "
                                  f"this slitterd reads version {lib.SLITTER_LAYOUT_VERSION}")
            geometry = Geometry.for_arena(header.arena_size, header.max_racks)
            if (header.header_size != ffi.sizeof("struct slitter_header")
                    or header.meta_size != geometry.meta_size
                    or header.totals_off != geometry.totals_off
                    or os.fstat(meta_fd).st_size != geometry.meta_size
                    or os.fstat(data_fd).st_size != geometry.arena_size):
                raise LayoutError(f"{meta_path}: header sizes do not match the segments (damaged header)")
        except (LayoutError, ValueError) as exc:
            os.close(meta_fd)
            os.close(data_fd)
            raise LayoutError(str(exc)) from None
        finally:
            header_map.close()
        arena = cls(instance, meta_fd, data_fd, geometry)
        arena.guards = GuardApplier(arena.header, arena.runs, arena.data)
        arena.guards.apply()
        return arena

    def _write_header(self) -> None:
        g, h = self.geometry, self.header
        h.arena_size, h.nspans, h.meta_size = g.arena_size, g.nspans, g.meta_size
        h.span_table_off, h.run_table_off, h.class_table_off = g.span_table_off, g.run_table_off, g.class_table_off
        h.totals_off = g.totals_off
        h.tables_end, h.live_map_off, h.live_map_bytes = g.tables_end, g.live_map_off, g.live_map_bytes
        h.owners_off, h.departed_off = g.owners_off, g.departed_off
        h.rack_area_off, h.rack_size = g.rack_area_off, g.rack_size
        h.shelf_off, h.shelf_bytes = g.shelf_off, g.shelf_bytes
        h.max_racks, h.max_classes = g.max_racks, lib.SLITTER_MAX_CLASSES
        h.max_threads, h.mag_cap = lib.SLITTER_MAX_THREADS, lib.SLITTER_MAG_CAP
        h.header_size = ffi.sizeof("struct slitter_header")
        h.next_span = 1  # span 0 is the guard span before the first run
        h.daemon_pid = os.getpid()
        h.generation = 1
        h.version = lib.SLITTER_LAYOUT_VERSION
        h.magic = lib.SLITTER_LAYOUT_MAGIC  # last: a half-written header is never valid

    def rack(self, index: int):
        """The rack at ``index`` as a cffi struct pointer."""
        offset = self.geometry.rack_area_off + index * self.geometry.rack_size
        return ffi.cast("struct slitter_rack *", self.meta.ptr + offset)

    def rack_offset(self, index: int) -> int:
        return self.geometry.rack_area_off + index * self.geometry.rack_size

    def wipe_rack(self, index: int) -> None:
        """Return a rack's pages to the system; it reads as zeros afterwards."""
        if lib.fallocate(self.meta_fd, lib.FALLOC_FL_PUNCH_HOLE | lib.FALLOC_FL_KEEP_SIZE,
                         self.rack_offset(index), self.geometry.rack_size) != 0:
            ffi.memmove(self.rack(index), b"\0" * self.geometry.rack_size, self.geometry.rack_size)

    def committed_bytes(self) -> int:
        """Bytes of shared memory actually allocated to the two segments."""
        return sum(os.fstat(fd).st_blocks * 512 for fd in (self.meta_fd, self.data_fd))

    def close(self) -> None:
        self.meta.close()
        self.data.close()
        for fd in (self.meta_fd, self.data_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def remove_segments(instance: str) -> None:
    """Unlink an instance's segments (ephemeral instances, tests)."""
    for path in address.segment_paths(instance):
        path.unlink(missing_ok=True)
