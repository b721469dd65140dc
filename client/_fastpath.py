"""The only module that touches ``slitter._native``'s fast path.

It binds ``slitter._entry`` (a class's ``allocate`` and ``release``, a heap's ``view``, as C
callables, native/entry_ext.c) to the fast path's keyed entry points and
``slitter._batch`` (the batch calls' argument adapter, native/batch_ext.c)
to its batch entry points, and turns the native result codes into the named
exceptions, with messages that say which handle and class.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable

from slitter import _batch, _entry, errors
from slitter._native import ffi, lib

allocate = lib.slitter_allocate
release = lib.slitter_release

OK = lib.SLITTER_OK
NEED_FLUSH = lib.SLITTER_NEED_FLUSH
NEED_SLOW = lib.SLITTER_NEED_SLOW


def _address(name: str) -> int:
    return int(ffi.cast("uintptr_t", ffi.addressof(lib, name)))


# Class.allocate, Class.release and Heap.view are slitter._entry objects (native/entry_ext.c):
# Allocate(key, cls)(), Release(key, cls)(handle) and View(key, heap)(handle) call these with no
# Python frame.
_entry.bind(_address("slitter_allocate_key"), _address("slitter_release_as"), _address("slitter_object_size_key"))
Allocate: Callable[[int, object], Callable[[], int]] = _entry.Allocate
Release: Callable[[int, object], Callable[[int], None]] = _entry.Release
View = _entry.View


# The batch calls take an array('Q') through slitter._batch (native/batch_ext.c),
# which packs it and calls these entry points; None when it did not call them.
_batch.bind(array, _address("slitter_allocate_batch"), _address("slitter_check_batch"),
            _address("slitter_release_batch"))
allocate_into: Callable[[int, array], int | None] = _batch.allocate
check_array: Callable[[int, array], int | None] = _batch.check
release_array: Callable[[int, array], int | None] = _batch.release

#: Batches the batch entry points take: fewer handles than this (see slitter_fast.h).
BATCH_LIMIT = 1 << lib.SLITTER_BATCH_COUNT_BITS
_KIND_BITS = lib.SLITTER_BATCH_KIND_BITS


def batch_refusal(result: int) -> tuple[int, int]:
    """(index of the refused handle, SLITTER_ERR_* kind) of a batch call's result below -1."""
    code = -1 - result
    return code >> _KIND_BITS, code & ((1 << _KIND_BITS) - 1)


def locate(view, handle: int) -> tuple[object, int, int]:
    """(pointer or NULL, owning class id or 0, SLITTER_ERR_* kind or 0) of a handle."""
    class_out = ffi.new("uint32_t *")
    kind_out = ffi.new("int *")
    if not 0 <= handle < 1 << 64:
        return ffi.NULL, 0, lib.SLITTER_ERR_FOREIGN_ADDRESS
    ptr = lib.slitter_object(view, handle, class_out, kind_out)
    return ptr, class_out[0], kind_out[0]


RELEASED = "released as"


def release_error(kind: int, handle: int, class_name: str | None, owner_name: str | None,
                  verb: str = RELEASED) -> errors.ReleaseError:
    """The exception for ``handle`` refused as ``class_name``.

    ``verb`` says what was done with it: "released as" (the default), or
    "checked as" / "viewed in" for the calls that only look, for which a
    dead object is not a double free.  ``class_name`` None: no class at all.
    """
    h = f"{handle:#x}" if isinstance(handle, int) and handle >= 0 else repr(handle)
    as_class = f" {verb} class '{class_name}'" if class_name is not None else ""
    if kind == lib.SLITTER_ERR_CLASS_MISMATCH:
        return errors.ClassMismatch(
            f"handle {h}{as_class} belongs to class '{owner_name}'",
            handle=handle, class_name=class_name, expected_class=owner_name)
    if kind == lib.SLITTER_ERR_INTERIOR_POINTER:
        return errors.InteriorPointer(
            f"handle {h}{as_class} points inside an object, not at its start",
            handle=handle, class_name=class_name)
    if kind == lib.SLITTER_ERR_FOREIGN_ADDRESS:
        return errors.ForeignAddress(
            f"handle {h}{as_class} is not an object of this arena "
            "(outside it, in a span no class owns, or in a guard page)",
            handle=handle, class_name=class_name)
    if kind == lib.SLITTER_ERR_DOUBLE_FREE:
        return errors.DoubleFree(
            f"handle {h} of class '{class_name}' is not live: it was released already"
            + (" (double free)" if verb == RELEASED else ""),
            handle=handle, class_name=class_name)
    return errors.ReleaseError(f"handle {h} of class '{class_name}': refused (error kind {kind})",
                               handle=handle, class_name=class_name)
