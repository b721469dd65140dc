"""Every call of the public API against a real daemon."""

from __future__ import annotations

import os
from array import array

import pytest

import slitter
from slitter.protocol import Op


def test_register_allocate_view_release(heap):
    order = heap.register_class("order", size=64, zero_init=True)
    assert (order.name, order.size, order.zero_init) == ("order", 64, True)
    h = order.allocate()
    assert isinstance(h, int) and h != 0
    view = heap.view(h)
    assert len(view) == 64 and not view.readonly
    assert bytes(view) == bytes(64)
    view[:5] = b"hello"
    assert bytes(heap.view(h)[:5]) == b"hello"
    order.release(h)


def test_handles_are_distinct_while_live(heap):
    cls = heap.register_class("c", size=24)
    handles = [cls.allocate() for _ in range(5000)]
    assert len(set(handles)) == 5000
    assert 0 not in handles
    assert all(h % 16 == 0 for h in handles)
    for h in handles:
        cls.release(h)


def test_register_class_is_idempotent_for_the_same_spec(heap):
    a = heap.register_class("same", size=100)
    b = heap.register_class("same", size=100)
    assert a.id == b.id
    h = a.allocate()
    b.release(h)  # the same class, whichever object names it


def test_register_class_with_another_size_raises_class_conflict(heap):
    heap.register_class("conflict", size=100)
    with pytest.raises(slitter.ClassConflict, match="conflict.*100.*200"):
        heap.register_class("conflict", size=200)
    with pytest.raises(slitter.ClassConflict):
        heap.register_class("conflict", size=100, zero_init=True)


def test_register_class_rejects_bad_specs(heap):
    with pytest.raises(slitter.ProtocolError, match="size"):
        heap.register_class("zero", size=0)
    with pytest.raises(slitter.ProtocolError, match="name"):
        heap.register_class("x" * 100, size=8)
    with pytest.raises(TypeError):
        heap.register_class("t", size="8")


def test_view_is_exactly_the_object(heap):
    small = heap.register_class("small", size=10)
    h1, h2 = small.allocate(), small.allocate()
    v1 = heap.view(h1)
    assert len(v1) == 10
    v1[:] = b"\xff" * 10
    with pytest.raises((ValueError, IndexError)):
        v1[10] = 1
    v2 = heap.view(h2)
    assert bytes(v2) != b"\xff" * 10  # neighbours untouched


def test_view_refuses_what_is_not_an_object(heap):
    cls = heap.register_class("v", size=64)
    h = cls.allocate()
    with pytest.raises(slitter.InteriorPointer, match=hex(h + 8)):
        heap.view(h + 8)
    with pytest.raises(slitter.ForeignAddress):
        heap.view(0)
    with pytest.raises(slitter.ForeignAddress):
        heap.view(1 << 60)


def test_view_of_a_handle_that_is_no_plain_int_and_wrong_arguments(heap):
    """``view`` takes an int in [0, 2**48) on its fast path (slitter._entry.View); an int subclass is
    taken as its value, a negative or too big int is a foreign address, anything else and a wrong
    number of arguments is a TypeError; a view shares the arena's memory and is bounded by the object."""
    class Handle(int):
        pass

    cls = heap.register_class("typed-views", size=48)
    h = cls.allocate()
    view = heap.view(Handle(h))
    view[:5] = b"typed"
    assert type(view) is memoryview and len(view) == 48 and view.nbytes == 48 and not view.readonly
    assert view.contiguous and view.format == "B" and view.shape == (48,) and view.strides == (1,)
    assert bytes(heap.arena[h:h + 5]) == b"typed" and bytes(heap.view(h)[:5]) == b"typed"
    assert view.obj is heap.arena.obj  # the arena's exporter: the mapping lives while the view does
    with pytest.raises(IndexError):
        view[48]
    for bad in (True, -1, -h, 1 << 48, (1 << 48) + h, 1 << 64, 1 << 80):
        with pytest.raises(slitter.ForeignAddress):
            heap.view(bad)
    for call in (lambda: heap.view(1.5), lambda: heap.view("x"), lambda: heap.view(None), lambda: heap.view(),
                 lambda: heap.view(h, h), lambda: heap.view(handle=h)):
        with pytest.raises(TypeError):
            call()
    # Class.views' slicer takes checked handles; one past the arena is an error, never a clamped view.
    end = len(heap.arena)
    assert [len(v) for v in heap.view._slices(array("Q", [h, end - 48]), 48)] == [48, 48]
    for past in (end - 47, end, 1 << 63):
        with pytest.raises(IndexError, match="past the arena"):
            heap.view._slices(array("Q", [h, past]), 48)
    cls.release(h)


def test_stats_shape(heap):
    cls = heap.register_class("s", size=64)
    handles = [cls.allocate() for _ in range(10)]
    stats = heap.stats()
    c = stats["classes"]["s"]
    for key in ("size", "carved", "live", "cached", "free", "allocations", "releases", "refills",
                "flushes", "errors"):
        assert key in c
    assert c["size"] == 64 and c["live"] == 10 and c["allocations"] == 10
    assert set(c["errors"]) == {"class_mismatch", "interior_pointer", "foreign_address", "double_free", "corrupt"}
    assert any(client["pid"] == os.getpid() for client in stats["clients"])
    for h in handles:
        cls.release(h)


def test_context_manager_closes_and_detaches(daemon):
    with slitter.connect(daemon.address) as heap:
        cls = heap.register_class("cm", size=64)
        cls.allocate()
        assert len(heap.stats()["clients"]) == 1
    with pytest.raises(slitter.SlitterError, match="closed"):
        heap.register_class("cm", size=64)
    with pytest.raises(slitter.SlitterError, match="closed"):
        cls.allocate()
    with slitter.connect(daemon.address) as other:
        assert other.stats()["clients"][0]["pid"] == os.getpid()
        assert len(other.stats()["clients"]) == 1


def test_close_is_idempotent(daemon):
    heap = slitter.connect(daemon.address)
    heap.close()
    heap.close()


def test_connect_uses_slitter_address(daemon, monkeypatch):
    monkeypatch.setenv("SLITTER_ADDRESS", daemon.address)
    with slitter.connect() as heap:
        assert heap.address == daemon.address


def test_connect_accepts_ipc_endpoint(daemon):
    with slitter.connect("ipc://" + daemon.address) as heap:
        assert heap.register_class("ipc", size=8).allocate()


def test_no_daemon_raises_daemon_unavailable_naming_the_address(tmp_path):
    missing = str(tmp_path / "nobody.sock")
    with pytest.raises(slitter.DaemonUnavailable, match=missing) as info:
        slitter.connect(missing, timeout=0.5)
    assert info.value.address == missing
    assert isinstance(info.value, ConnectionError)


def test_socket_without_daemon_times_out_as_daemon_unavailable(tmp_path):
    stale = tmp_path / "stale.sock"
    stale.touch()
    with pytest.raises(slitter.DaemonUnavailable, match=str(stale)):
        slitter.connect(str(stale), timeout=0.3)


def test_spawn_daemon_yields_an_address_and_cleans_up():
    d = slitter.spawn_daemon(arena_size="256M")
    with d as addr:
        assert os.path.exists(addr)
        with slitter.connect(addr) as heap:
            heap.register_class("x", size=8).allocate()
        paths = slitter.address.segment_paths(d.name)
        assert all(p.exists() for p in paths)
    assert not os.path.exists(addr)
    assert not any(p.exists() for p in paths)


def test_ping_reports_version_and_ops(daemon):
    from slitter._transport import Transport

    t = Transport(daemon.address, 5)
    try:
        reply = t.call(Op.PING)
    finally:
        t.close()
    assert reply["version"] == slitter.protocol.PROTOCOL_VERSION
    assert set(reply["ops"]) == {op.value for op in Op}
    assert reply["pid"] == daemon.pid


def test_views_outlive_close(daemon):
    heap = slitter.connect(daemon.address)
    cls = heap.register_class("late", size=32)
    h = cls.allocate()
    view = heap.view(h)
    view[:4] = b"kept"
    heap.close()
    assert bytes(view[:4]) == b"kept"  # the arena stays mapped while a view exists
    with pytest.raises(slitter.SlitterError, match="closed"):
        heap.view(h)


def test_view_of_an_object_in_a_run_carved_by_another_process(daemon, heap):
    """A view applies the guard pages of runs this process has not seen yet."""
    with slitter.connect(daemon.address) as other:
        big = other.register_class("elsewhere", size=60000)
        handles = [big.allocate() for _ in range(40)]  # several new runs
        seen = heap._guards.applied
        assert heap._view.header.nruns > seen
        assert len(heap.view(handles[-1])) == 60000
        assert heap._guards.applied == heap._view.header.nruns


def test_spawned_daemon_dies_with_its_parent(tmp_path):
    """A program killed without cleaning up takes its private daemon (and segments) with it."""
    import shutil
    import signal
    import subprocess
    import sys
    import time

    code = ("import slitter, sys, time\n"
            "d = slitter.spawn_daemon(arena_size='256M'); d.start()\n"
            "print(d.pid, d.name, d.directory, flush=True)\n"
            "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd="/")
    pid, name, directory = parent.stdout.readline().split()
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
        time.sleep(0.05)
    try:
        assert not os.path.exists(f"/proc/{pid}"), "the private daemon outlived its parent"
        assert not any(p.exists() for p in slitter.address.segment_paths(name))
    finally:
        if os.path.exists(f"/proc/{pid}"):
            os.kill(int(pid), signal.SIGKILL)
        for p in slitter.address.segment_paths(name):
            p.unlink(missing_ok=True)
        shutil.rmtree(directory, ignore_errors=True)  # its log: the killed parent could not remove it
