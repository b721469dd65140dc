"""An address given to a class stays that class's, and zero_init holds on every use."""

from __future__ import annotations

import pytest

import slitter


def test_addresses_never_change_class(heap):
    a = heap.register_class("a", size=64)
    b = heap.register_class("b", size=64)
    first_a = [a.allocate() for _ in range(20000)]
    for h in first_a:
        a.release(h)
    got_b = {b.allocate() for _ in range(20000)}
    assert not got_b & set(first_a)
    again_a = {a.allocate() for _ in range(20000)}
    assert not again_a & got_b
    assert again_a & set(first_a)  # a's own objects are reused by a
    for h in got_b:
        with pytest.raises(slitter.ClassMismatch):
            a.release(h)
        b.release(h)


def test_zero_init_on_first_use_and_on_reuse(heap):
    z = heap.register_class("z", size=200, zero_init=True)
    handles = [z.allocate() for _ in range(3000)]
    for h in handles:
        v = heap.view(h)
        assert bytes(v) == bytes(200)
        v[:] = b"\xab" * 200
    for h in handles:
        z.release(h)
    reused = [z.allocate() for _ in range(3000)]
    assert set(reused) & set(handles)  # the same objects came back...
    for h in reused:
        assert bytes(heap.view(h)) == bytes(200)  # ...zeroed


def test_without_zero_init_contents_survive_release(heap):
    """Type stability: no allocator metadata is written into a released object."""
    k = heap.register_class("keep", size=64)
    h = k.allocate()
    heap.view(h)[:] = b"\x5a" * 64
    k.release(h)
    assert bytes(heap.view(h)) == b"\x5a" * 64
