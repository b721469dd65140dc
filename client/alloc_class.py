"""``Class``: one allocation class as a client sees it; ``allocate`` and ``release``.

Both are C callables (``slitter._entry``, native/entry_ext.c) that call the
fast path with no Python frame; what it does not finish (binding the
thread, refills, flushes, turning refusals into exceptions) comes back to
this class's ``_allocate_slow``, ``_release_slow`` and ``_release_other``,
and from them to the heap's slow path.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from slitter import _fastpath

if TYPE_CHECKING:
    from slitter.heap import Heap

_FOREIGN_KIND = _fastpath.lib.SLITTER_ERR_FOREIGN_ADDRESS
_release_as = _fastpath.lib.slitter_release_as
_ZEROS = array("Q", [0])
_OK = _fastpath.OK
_NEED_SLOW = _fastpath.NEED_SLOW
# The batch calls: an array('Q') straight to the fast path (native/batch_ext.c);
# None when they did not take it (not an array('Q'), empty, too long).
_allocate_into = _fastpath.allocate_into
_check_array = _fastpath.check_array
_release_array = _fastpath.release_array


class Class:
    """A registered allocation class.  Get one from ``Heap.register_class``.

    ``allocate() -> int``: a handle to a fresh object of this class (zeroed
    if ``zero_init``).  Raises OutOfMemory when the arena cannot hold
    another run of the class, DaemonUnavailable when a refill was needed
    and the daemon did not answer.

    ``release(handle)``: give an object back.  Checked in O(1); on error
    nothing changes.  Raises ClassMismatch, InteriorPointer, ForeignAddress
    or DoubleFree under the "raise" policy (the default); "log" logs and
    returns, "abort" aborts.  Every refusal is reported to the daemon's
    audit log first.

    Both are attributes that hold C callables, not methods: the fast path
    is one native call with no Python frame (doc/fast_path.md).
    """

    __slots__ = ("_heap", "_key", "allocate", "id", "name", "policy", "release", "size", "stride", "zero_init")

    allocate: Callable[[], int]
    release: Callable[[int], None]

    def __init__(self, heap: Heap, class_id: int, name: str, size: int, stride: int, zero_init: bool,
                 policy: str) -> None:
        self._heap = heap
        # One small int stands for (this heap, this class) in the native calls.
        self._key = heap._class_key(class_id, name)
        self.allocate = _fastpath.Allocate(self._key, self)
        self.release = _fastpath.Release(self._key, self)
        self.id = class_id
        self.name = name
        self.size = size
        self.stride = stride
        self.zero_init = zero_init
        #: What a refused release does here, unless the heap was given a policy.
        self.policy = policy

    def _allocate_slow(self) -> int:
        """``allocate()`` when the fast path gave nothing: bind, refill, or the named error."""
        return self._heap._allocate_slow(self)

    def _release_slow(self, handle: int, result: int) -> None:
        """``release(handle)`` when the fast path returned ``result`` (not OK): flush, or the named error."""
        self._heap._release_slow(self, handle, result)

    def _release_other(self, handle: object) -> None:
        """``release(handle)`` of anything but an int in [0, 2**64): cffi's rules for a uint64_t.

        A negative or too big int is a ForeignAddress, a bool or another
        int subclass is taken as its int value (also in the report to the
        audit log, which takes only an int); anything else is cffi's
        TypeError.
        """
        if isinstance(handle, int):
            handle = int(handle)
        try:
            result = _release_as(self._key, handle)
        except OverflowError:  # negative, or beyond a uint64
            self._heap._refused(self, handle, _FOREIGN_KIND, counted=False)
            return
        if result:
            self._heap._release_slow(self, handle, result)

    def allocate_many(self, n: int) -> array:
        """``n`` fresh objects as an ``array('Q')`` of handles: one native call per magazine.

        Raises:
            OutOfMemory: as ``allocate``; the objects allocated before it stay live
            and are in the exception's ``handles`` attribute.
            SlitterError: the heap was closed, by another thread meanwhile too;
            the objects allocated before it are in ``handles`` as well (live, and
            releasable through another heap: a handle is valid in every process).
        """
        out = _ZEROS * n
        if n <= 0:
            if n < 0 or type(n) is not int:
                raise ValueError(f"class '{self.name}': allocate_many(n) needs an int n >= 0, not {n!r}")
            return out
        got = _allocate_into(self._key, out)
        if got == n:
            return out
        self._heap._allocate_many_slow(self, out, got or 0)
        return out

    def release_many(self, handles: Iterable[int]) -> None:
        """Release every handle, with every check of ``release``.

        The whole batch is checked first: if any handle fails (foreign, wrong
        class, interior, not live) its error is raised for that handle and
        none of the batch is released.  A duplicate inside the batch, or
        another thread releasing one of the objects at the same moment, is
        found while releasing; then the handles before the magazine-sized
        chunk in which it was found are released (the error's ``released``
        says how many) and the rest are not.  An ``array('Q')`` of handles,
        as ``allocate_many`` returns, is released without a copy.
        """
        # All or none, if the batch fits the thread's magazines.
        result = _release_array(self._key, handles)
        if result == _OK:
            return
        if result is None:  # not an array('Q'), or empty, or too long: the general path
            self._heap._release_many(self, handles)
        elif result != _NEED_SLOW:
            self._heap._batch_released(self, handles, result)
        else:  # unbound, or more than the magazines' room: the chunked path, without trying again
            self._heap._release_many(self, handles, whole_tried=True)

    def check(self, handles: Iterable[int]) -> array:
        """Check that every handle is a live object of this class, in one native call.

        Returns the handles as ``array('Q')`` (the very array, if given one).
        Nothing changes and nothing is reported: this is the check ``release``
        makes, for handles received from elsewhere, before touching them
        through ``Heap.arena``.

        Raises:
            ClassMismatch, InteriorPointer, ForeignAddress: for the first
            handle that is not an object start of this class.
            DoubleFree: for the first object that is not live (released already).
        """
        return self._checked(handles, "checked as")

    def views(self, handles: Iterable[int]) -> list[memoryview]:
        """Writable views of many live objects of this class: ``check``, then one slice each.

        About half the cost of ``Heap.view`` per object.  Raises as ``check``.
        """
        views = self._heap.view._slices(self._checked(handles, "viewed as"), self.size)
        if views is None:  # closed by another thread since the check
            raise self._heap._closed_error()
        return views

    def _checked(self, handles: Iterable[int], verb: str) -> array:
        if _check_array(self._key, handles) == _OK:
            return handles
        # Unbound, guard pages to protect, a refusal to raise, or not an array('Q').
        return self._heap._check_live(self, handles, verb)

    def __repr__(self) -> str:
        return f"<slitter.Class '{self.name}' id={self.id} size={self.size}>"
