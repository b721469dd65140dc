"""The ``Shelf``: the daemon's side of the magazines clients pass to each other.

Clients put full magazines on the shelf and take them off in their fast
path (native/fast.c, layout in native/layout.h); the daemon is not on that
path.  It counts what is on the shelf, holds slots while it scans the live
map for their tags (reclaim, recovery) so that no client claims one
mid-scan, and sweeps back the magazines of classes nobody takes from.
doc/design.md, departure (d), says why and what keeps it safe.
"""

from __future__ import annotations

import logging
from array import array

from slitter._native import ffi, lib

from slitterd.arena import Arena
from slitterd.config import SHELF_IDLE_SECONDS
from slitterd.depot import Depot
from slitterd.rack import COUNTER_LIMIT, MAX_CLASSES

log = logging.getLogger("slitterd")

# How long a class's full slots may wait, unclaimed, while the shelf is
# nearly full (fewer than a quarter of its slots empty).  Longer than two
# ticks of an idle daemon (200 ms each), so that a class taken from every
# tick or two is not mistaken for an idle one.
PRESSED_SECONDS = 0.5


def shelf_state(kind: int, who: int) -> int:
    """A slot's state word: EMPTY, FULL with a class id, or BUSY with a rack index (native/layout.h)."""
    return kind | who << lib.SLITTER_SHELF_WHO_SHIFT


def kind_of(state: int) -> int:
    """EMPTY, FULL or BUSY (or garbage) of a state word."""
    return state & lib.SLITTER_SHELF_KIND_MASK


def who_of(state: int) -> int:
    """The class id of a FULL state, the rack index (or SLITTER_SHELF_DAEMON) of a BUSY one."""
    return state >> lib.SLITTER_SHELF_WHO_SHIFT


def slot_states(shared) -> list[int]:
    """Every slot's state word, read in one C call (``shared``: the struct slitter_shelf)."""
    out = array("I", [0]) * lib.SLITTER_SHELF_SLOTS
    lib.slitter_shelf_states(shared, ffi.from_buffer("uint32_t[]", out))
    return out.tolist()


class Shelf:
    """The shelf's slots as the daemon reads and holds them."""

    def __init__(self, arena: Arena, depots: dict[int, Depot]) -> None:
        self.arena = arena
        self.shared = arena.shelf  # struct slitter_shelf in the meta segment
        self.depots = depots  # the instance's, by class id: the sweep gives back to them
        #: The full slots of a class nobody has taken a magazine of for this long
        #: go back to its depot (``sweep``), so that they neither fill the shelf
        #: for other classes nor hide free objects from refills (option shelf_idle).
        self.idle_seconds = SHELF_IDLE_SECONDS
        #: Per class with full slots: its takes counter, and when it last moved.
        self._takes: dict[int, tuple[int, float]] = {}

    @staticmethod
    def tags(indexes: list[int]) -> list[int]:
        """The live-map tags of these slots."""
        return [lib.SLITTER_SHELF_TAG_BASE + index for index in indexes]

    def figures(self, class_id: int) -> dict[str, int]:
        """The magazines clients put and took, counted by them in shared memory: trusted up to 2**48."""
        return {"shelf_puts": min(self.shared.puts[class_id], COUNTER_LIMIT),
                "shelf_takes": min(self.shared.takes[class_id], COUNTER_LIMIT)}

    def hold(self, rack_index: int, everything: bool = False) -> list[int]:
        """The shelf slots whose tag the daemon may scan for now: returns their indexes.

        Those a leaving client held mid-put or mid-take (state BUSY with its
        rack): nobody else claims a BUSY slot, so they stay put.  With
        ``everything`` (no other client is attached), every other slot too,
        taken with a compare-and-swap.  The holder alone moves objects in or
        out of a slot's tag, so until ``release`` the tag says exactly which
        objects the slot has.
        """
        busy = shelf_state(lib.SLITTER_SHELF_BUSY, rack_index)
        held = []
        for index, state in enumerate(slot_states(self.shared)):
            if state == busy or (everything and lib.slitter_shelf_seize(self.shared, index, state)):
                held.append(index)
        return held

    def release(self, held: list[int]) -> None:
        """Empty the slots the daemon held for a scan; clients may claim them again."""
        for index in held:
            lib.slitter_shelf_release(self.shared, index)

    def sweep(self, now: float) -> int:
        """Tick hook: the full slots of classes nobody takes from go back to the depots.

        A class is idle once its ``takes`` counter has not moved for
        ``idle_seconds`` (its clock starts when the sweep first sees it
        on the shelf).  While fewer than a quarter of the slots are empty,
        classes idle for PRESSED_SECONDS go back too, the longest idle
        first, until a quarter is empty again: many classes each leaving a
        few magazines would otherwise keep the shelf full for the rest.
        Each slot is seized by compare-and-swap from FULL (a client that
        claims it first keeps it), drained handle by handle under the slot's
        tag, and freed.  Returns the objects taken back.
        """
        shelf = self.shared
        states = slot_states(shelf)
        slots_of: dict[int, int] = {}  # full slots, by class
        for state in states:
            if kind_of(state) == lib.SLITTER_SHELF_FULL and who_of(state) in self.depots:
                slots_of[who_of(state)] = slots_of.get(who_of(state), 0) + 1
        # A class that leaves the shelf and shows up again starts a new clock.
        self._takes = {cid: seen for cid, seen in self._takes.items() if cid in slots_of}
        idle_since = []
        for class_id in slots_of:
            takes = shelf.takes[class_id]
            seen, since = self._takes.get(class_id, (None, now))
            if takes != seen:
                self._takes[class_id] = (takes, now)
            else:
                idle_since.append((since, class_id))
        # The longest idle first: those idle for idle_seconds all go, and
        # after them, while the shelf is pressed, those idle for PRESSED_SECONDS.
        idle_since.sort()
        empty, wanted = states.count(lib.SLITTER_SHELF_EMPTY), lib.SLITTER_SHELF_SLOTS // 4
        drain = set()
        for since, class_id in idle_since:
            idle = now - since
            if idle >= self.idle_seconds or (idle >= PRESSED_SECONDS and empty < wanted):
                drain.add(class_id)
                empty += slots_of[class_id]
        if not drain:
            return 0
        moved = 0
        out = array("Q", bytes(8 * lib.SLITTER_MAG_CAP))
        buf = ffi.from_buffer("uint64_t[]", out)
        for index, state in enumerate(states):
            class_id = who_of(state)
            if kind_of(state) != lib.SLITTER_SHELF_FULL or class_id not in drain:
                continue
            if not lib.slitter_shelf_seize(shelf, index, state):
                continue  # a client took it first
            n = lib.slitter_shelf_drain(self.arena.view, shelf, index, class_id, buf)
            self.depots[class_id].give(out[:n])
            lib.slitter_shelf_release(shelf, index)
            moved += n
        if moved:
            log.debug("shelf: %d objects nobody took went back to the depots", moved)
        return moved

    def counts(self) -> dict[int, int]:
        """Objects on the shelf (in full slots), by class id."""
        out = ffi.new("uint64_t[]", MAX_CLASSES)
        lib.slitter_shelf_counts(self.shared, out)
        return {cid: out[cid] for cid in self.depots}

    def hold_for_recovery(self, adopted_tags, any_adopted: bool) -> list[int]:
        """Decide the shelf's slots before the live-map scan; returns the slots the daemon holds for it.

        With a client adopted, full slots of known classes, slots held by an
        adopted client and empty slots keep their tags (an adopted client may
        put into an empty slot during the scan).  The daemon holds the
        others for the scan: slots of a dead holder as they are, the rest by
        compare-and-swap.  With no client adopted it holds every slot.  A
        held slot's tag is not adopted, so the scan returns its objects to
        the depots; ``release`` empties it afterwards.
        """
        held = []
        for index, state in enumerate(slot_states(self.shared)):
            kind, who = kind_of(state), who_of(state)
            held_by_rack = kind == lib.SLITTER_SHELF_BUSY and who < self.arena.geometry.max_racks
            live_holder = held_by_rack and adopted_tags[lib.SLITTER_TAG_BASE + who]
            keep = any_adopted and (state == lib.SLITTER_SHELF_EMPTY or live_holder
                                    or (kind == lib.SLITTER_SHELF_FULL and who in self.depots))
            if not keep and ((held_by_rack and not live_holder) or lib.slitter_shelf_seize(self.shared, index, state)):
                held.append(index)
            else:
                adopted_tags[lib.SLITTER_SHELF_TAG_BASE + index] = 1  # kept, or a client claimed it first
        return held
