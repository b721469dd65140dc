"""Blast radius: stray writes off a class's memory or into the tables fault in the writer alone."""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal

import pytest

import slitter
from slitter._native import ffi, lib

PATTERN = b"\xc3" * 64


def run_in_child(fn) -> int:
    """Run ``fn`` in a forked child; return the signal that killed it (0 if it exited)."""
    pid = os.fork()
    if pid == 0:
        try:
            faulthandler.disable()  # the crash is the expected outcome; no dump
            fn()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0


def address_of(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


@pytest.fixture
def bystanders(heap):
    """Objects of another class filled with a pattern, checked after each crash."""
    other = heap.register_class("bystander", size=64)
    handles = [other.allocate() for _ in range(2000)]
    for h in handles:
        heap.view(h)[:] = PATTERN
    yield handles
    assert all(bytes(heap.view(h)) == PATTERN for h in handles), "another class's objects were touched"
    assert heap.stats()["classes"]["bystander"]["live"] == 2000  # the daemon still serves


def test_overflow_forward_dies_of_sigsegv(heap, bystanders):
    victim = heap.register_class("victim", size=4096)
    h = victim.allocate()
    start = address_of(heap.view(h))

    def scribble_forward():
        for offset in range(0, 1 << 30, 4096):  # through the run, into its guard page
            ctypes.memset(start + offset, 0x41, 4096)

    assert run_in_child(scribble_forward) == signal.SIGSEGV


def test_underflow_backward_dies_of_sigsegv(heap, bystanders):
    victim = heap.register_class("victim_back", size=4096)
    h = victim.allocate()
    start = address_of(heap.view(h))

    def scribble_backward():
        for offset in range(4096, 1 << 30, 4096):  # into the previous run's guard page
            ctypes.memset(start - offset, 0x42, 4096)

    assert run_in_child(scribble_backward) == signal.SIGSEGV


def test_each_run_ends_in_a_guard_page_in_every_process(heap):
    """Runs carved after this client attached are guarded in its own mapping too."""
    cls = heap.register_class("many_runs", size=64 << 10)
    handles = [cls.allocate() for _ in range(100)]  # several runs of 16 objects
    header = heap._view.header
    runs = [heap._guards.runs[i] for i in range(header.nruns) if heap._guards.runs[i].class_id == cls.id]
    assert len(runs) >= 2
    base = address_of(heap.view(handles[0])) - handles[0]
    for run in runs:
        guard = base + (run.first_span + run.nspans) * lib.SLITTER_SPAN_SIZE - lib.SLITTER_PAGE_SIZE
        assert run_in_child(lambda g=guard: ctypes.memset(g, 0, 1)) == signal.SIGSEGV
        assert run_in_child(lambda g=guard - 1: ctypes.memset(g, 0, 1)) == 0  # the byte before is usable slack


def test_tables_are_read_only_in_clients(heap, bystanders):
    header = int(ffi.cast("uintptr_t", heap._tables.ptr))
    spans = header + heap._view.header.span_table_off
    for target in (header, spans + 16, header + heap._view.header.class_table_off):
        assert run_in_child(lambda t=target: ctypes.memset(t, 0xFF, 8)) == signal.SIGSEGV
    assert heap._view.header.magic == lib.SLITTER_LAYOUT_MAGIC


def test_metadata_mappings_have_guard_pages_around_them(heap):
    for mapping in (heap._tables, heap._live_map, heap._rack):
        start = int(ffi.cast("uintptr_t", mapping.ptr))
        assert run_in_child(lambda a=start - 1: ctypes.memset(a, 0, 1)) == signal.SIGSEGV
        assert run_in_child(lambda a=start + mapping.length: ctypes.memset(a, 0, 1)) == signal.SIGSEGV


def test_another_clients_rack_is_not_mapped(daemon, heap):
    with slitter.connect(daemon.address) as other:
        assert other._rack.ptr != heap._rack.ptr
        distance = int(ffi.cast("uintptr_t", other._rack.ptr)) - int(ffi.cast("uintptr_t", heap._rack.ptr))
        assert abs(distance) >= other._rack.length  # separate mappings, not one shared window
