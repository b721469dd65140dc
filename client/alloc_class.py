"""``Class``: one allocation class as a client sees it; ``allocate`` and ``release``.

Both are one native call on the fast path; everything else (binding the
thread, refills, flushes, turning refusals into exceptions) is the heap's
slow path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slitter import _fastpath

if TYPE_CHECKING:
    from slitter.heap import Heap

_allocate = _fastpath.allocate
_release = _fastpath.release


class Class:
    """A registered allocation class.  Get one from ``Heap.register_class``."""

    __slots__ = ("_client", "_heap", "id", "name", "size", "stride", "zero_init")

    def __init__(self, heap: Heap, class_id: int, name: str, size: int, stride: int, zero_init: bool) -> None:
        self._heap = heap
        self._client = heap._client
        self.id = class_id
        self.name = name
        self.size = size
        self.stride = stride
        self.zero_init = zero_init

    def allocate(self) -> int:
        """A handle to a fresh object of this class (zeroed if ``zero_init``).

        Raises:
            OutOfMemory: the arena cannot hold another run of this class.
            DaemonUnavailable: a refill was needed and the daemon did not answer.
        """
        handle = _allocate(self._client, self.id)
        if handle:
            return handle
        return self._heap._allocate_slow(self)

    def release(self, handle: int) -> None:
        """Give an object back.  Checked in O(1); on error nothing changes.

        Raises:
            ClassMismatch, InteriorPointer, ForeignAddress, DoubleFree.
        """
        try:
            result = _release(self._client, self.id, handle)
        except OverflowError:
            result = _fastpath.lib.SLITTER_E_FOREIGN_ADDRESS
        if result:
            self._heap._release_slow(self, handle, result)

    def __repr__(self) -> str:
        return f"<slitter.Class '{self.name}' id={self.id} size={self.size}>"
