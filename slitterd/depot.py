"""A ``Depot`` holds the free objects of one class.

Clients' refills drain it and their flushes (after the audit) fill it; when
it runs dry it carves fresh objects from the class's current run, and asks
the ``Mill`` for a new run when that one is used up.  The audit refuses a
handle that is already here by its live byte (``SLITTER_FREE``).  The
depot itself lives in the daemon's memory only: after a restart, recovery
rebuilds it from the live map (``slitter_recover_run``).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from typing import Any

from slitter import errors
from slitter._native import ffi, lib

from slitterd.arena import Arena
from slitterd.mill import Mill, Run, class_name


class Depot:
    """Free objects and bump carving for one class."""

    def __init__(self, arena: Arena, mill: Mill, class_id: int) -> None:
        self.arena = arena
        self.mill = mill
        self.class_id = class_id
        self.entry = arena.classes[class_id]  # its class-table entry (the cap may change)
        self.stride = self.entry.stride
        # A stack of free handles: the first `nfree` of `_stack`.  It never
        # shrinks: an array deleted from by more than 16 items reallocates,
        # and regrowing it on the next flush copied the whole stack, about
        # 9 % of a busy daemon's time.
        self._stack = array("Q")
        self.nfree = 0
        self.run: Run | None = None
        self.carved = 0
        self.runs = 0

    def take(self, n: int) -> array:
        """Up to ``n`` objects: free ones first, then freshly carved.

        The caller hands them out (``slitter_hand_out``), which tags them
        with the receiving rack.

        Returns fewer than ``n`` only when the arena is exhausted after at
        least one object was found.

        Raises:
            OutOfMemory: not a single object could be found or carved.
        """
        k = min(n, self.nfree)
        taken = self._stack[self.nfree - k:self.nfree]  # the most recently freed: warmest in the caches
        self.nfree -= k
        while len(taken) < n:
            try:
                taken.extend(self._carve(n - len(taken)))
            except MemoryError:
                if taken:
                    break
                raise
        return taken

    def _carve(self, n: int) -> array:
        cap = self.entry.cap
        if cap:
            n = min(n, cap - self.carved)
            if n <= 0:
                name = class_name(self.entry)
                raise errors.OutOfMemory(f"class '{name}' reached its cap of {cap} objects", class_name=name)
        if self.run is None or self.run.next_index == self.run.nobjects:
            self.run = self.mill.carve_run(self.class_id)
            self.runs += 1
        run = self.run
        count = min(n, run.nobjects - run.next_index)
        out = array("Q", bytes(8 * count))
        lib.slitter_carve(ffi.from_buffer("uint64_t[]", out), run.base + run.next_index * self.stride,
                          self.stride, count)
        run.next_index += count
        run.entry.carved = run.next_index  # before anyone can see the objects
        self.carved += count
        return out

    def give_audited(self, audit: Callable[[Any], int], n: int) -> int:
        """Let ``audit(top)`` write up to ``n`` accepted handles straight onto the stack; keep those.

        ``top`` points just past the free handles, with room for ``n``;
        ``audit`` returns how many it wrote there (already FREE), and so
        does this.
        """
        self._room(n)
        with ffi.from_buffer("uint64_t[]", self._stack, require_writable=True) as stack:  # released on exit
            kept = audit(stack + self.nfree)
        if not 0 <= kept <= n:
            raise AssertionError(f"audit kept {kept} of {n} handles")
        self.nfree += kept
        return kept

    def give(self, handles: array) -> None:
        """Take back audited or reclaimed objects (already FREE)."""
        end = self.nfree + len(handles)
        self._room(len(handles))
        self._stack[self.nfree:end] = handles
        self.nfree = end

    def _room(self, n: int) -> None:
        """Grow the stack (never shrunk) so that ``n`` more handles fit on top of the free ones."""
        end = self.nfree + n
        if end > len(self._stack):
            self._stack.frombytes(bytes(8 * (end - len(self._stack))))
