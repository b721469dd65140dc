"""``Racks``: the clients of an instance and their racks in the meta segment.

A rack holds a client's per-thread magazines and fast-path counters.  The
daemon hands a zeroed rack to each attaching client, sums the racks for
stats, and when a client leaves (detach, or death seen through its pidfd)
takes back every cached object, audited, into the depots and keeps the
client's counters as retired totals so figures stay exact.

Rack contents are written by an untrusted process: every count read from a
rack is clamped before it indexes anything.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass, field
from typing import Any

from slitter._native import ffi, lib

from slitterd.arena import Arena

log = logging.getLogger("slitterd")

MAX_THREADS = lib.SLITTER_MAX_THREADS
MAX_CLASSES = lib.SLITTER_MAX_CLASSES
ERR_KINDS = lib.SLITTER_ERR_KINDS
COUNTER_LIMIT = 1 << 48
COUNTING = lib.SLITTER_COUNTING
SETTLE_FAILED = 0xFFFFFFFF  # slitter_settle_counting: no memory for its scratch


@dataclass
class ClassTotals:
    """Counters of one class summed over racks (or retired from gone clients)."""

    allocations: int = 0
    releases: int = 0
    cached: int = 0
    errors: list[int] = field(default_factory=lambda: [0] * ERR_KINDS)

    def add(self, other: ClassTotals) -> None:
        self.allocations += other.allocations
        self.releases += other.releases
        self.cached += other.cached
        for kind in range(ERR_KINDS):
            self.errors[kind] += other.errors[kind]


@dataclass
class Client:
    """An attached client: who it is and where its rack is."""

    id: int
    token: int
    pid: int
    name: str
    rack_index: int
    pidfd: int | None
    #: (request id, audit seq) of the last REPORT recorded: a resent one is recorded once.
    last_report: tuple[int, int] = (0, 0)
    #: time.monotonic() of the last prefetch and flush-ahead per (thread, class id, "prefetch" or "flush"):
    #: magazines grow by demand (Instance._magazine_size).
    last_ahead: dict[tuple[int, int, str], float] = field(default_factory=dict)
    #: The rack as a cffi pointer, and its thread-class entries by thread * MAX_CLASSES + class id:
    #: ``Racks.thread_class`` casts and indexes once, not on every refill and flush (0.6 µs).
    rack: Any = None
    thread_classes: dict[int, Any] = field(default_factory=dict)
    #: The attach's nonce (0: none), kept in the owner table too: an ABANDON naming it detaches the client.
    nonce: int = 0


def owner_name(owner) -> str:
    """The client name kept in an owner-table entry."""
    return ffi.string(owner.name).decode(errors="replace")


def tag(client: Client) -> int:
    """The live-map tag of the objects cached in a client's rack."""
    return lib.SLITTER_TAG_BASE + client.rack_index


def touched(mask: int, limit: int):
    """Indexes of the set bits of ``mask`` below ``limit``."""
    while mask:
        low = mask & -mask
        index = low.bit_length() - 1
        if index >= limit:
            return
        yield index
        mask ^= low


class Racks:
    """Rack slots and the clients that hold them."""

    def __init__(self, arena: Arena, max_clients: int) -> None:
        self.arena = arena
        self.max_clients = min(max_clients, arena.geometry.max_racks)
        self.clients: dict[int, Client] = {}
        self.free_racks = list(range(arena.geometry.max_racks - 1, -1, -1))
        self.next_id = 1
        #: Moves whenever a client comes or goes, so the server rebuilds its poll set only then.
        self.generation = 0

    def attach(self, pid: int, name: str, pidfd: int | None, nonce: int = 0) -> Client | None:
        """Give a new client a wiped rack; None when every rack is taken."""
        if len(self.clients) >= self.max_clients or not self.free_racks:
            return None
        index = self.free_racks.pop()
        self.arena.wipe_rack(index)
        rack = self.arena.rack(index)
        client = Client(self.next_id, secrets.randbits(64), pid, name, index, pidfd, nonce=nonce)
        self.next_id += 1
        rack.pid, rack.client_id = pid, client.id
        owner = self.arena.owners[index]
        owner.name = name.encode()[: lib.SLITTER_CLIENT_NAME_MAX - 1]
        owner.pid, owner.token, owner.nonce, owner.client_id = pid, client.token, nonce, client.id
        self.clients[client.id] = client
        self.generation += 1
        return client

    def by_nonce(self, pid: int, nonce: int) -> Client | None:
        """The client an attach with this pid and nonce made, if any."""
        return next((c for c in self.clients.values() if c.nonce == nonce and c.pid == pid), None)

    def adopt(self, index: int, pidfd: int) -> Client:
        """Take over a rack a previous daemon handed out to a client that still runs.

        Identity comes from the owner table, which only daemons write.
        """
        owner = self.arena.owners[index]
        client = Client(owner.client_id, owner.token, owner.pid, owner_name(owner), index, pidfd,
                        nonce=owner.nonce)
        self.clients[client.id] = client
        self.free_racks.remove(index)
        self.next_id = max(self.next_id, client.id + 1)
        self.generation += 1
        return client

    def get(self, client_id: int, token: int) -> Client | None:
        """The client with this id and token, or None: ids alone prove nothing."""
        client = self.clients.get(client_id)
        if client is None or not secrets.compare_digest(client.token.to_bytes(8, "little"),
                                                        token.to_bytes(8, "little")):
            return None
        return client

    def rack(self, client: Client):
        """The client's rack as a cffi pointer (cast once per client)."""
        if client.rack is None:
            client.rack = self.arena.rack(client.rack_index)
        return client.rack

    def thread_class(self, client: Client, thread: int, class_id: int):
        """The rack entry of one thread slot and class (both checked by the caller)."""
        key = thread * MAX_CLASSES + class_id
        tc = client.thread_classes.get(key)
        if tc is None:
            tc = client.thread_classes[key] = self.rack(client).threads[thread].classes[class_id]
        return tc

    def magazines(self, client: Client):
        """(class_id, thread_class) for every magazine pair the client touched."""
        rack = self.rack(client)
        for thread in touched(rack.threads_touched, MAX_THREADS):
            slot = rack.threads[thread]
            for class_id in touched(slot.classes_touched, MAX_CLASSES):
                yield class_id, slot.classes[class_id]

    def totals(self, client: Client, mag_caps: dict[int, int]) -> dict[int, ClassTotals]:
        """Per-class counters and cached objects of one client's rack."""
        out: dict[int, ClassTotals] = {}
        for class_id, tc in self.magazines(client):
            if class_id not in mag_caps:
                continue
            cap = mag_caps[class_id]
            t = out.setdefault(class_id, ClassTotals())
            c = tc.counters
            # A rack is written by its client: no count in it is trusted past 2**48.  The
            # counting bit is an operation under way (final_totals() counts a dead client's).
            t.allocations += min(c.allocations & ~COUNTING, COUNTER_LIMIT)
            t.releases += min(c.releases & ~COUNTING, COUNTER_LIMIT)
            t.cached += (min(tc.alloc_count, cap) + min(tc.release_count, cap) + min(tc.spare_count, cap)
                         + min(tc.outgoing_count, cap))
            for kind in range(ERR_KINDS):
                t.errors[kind] += min(c.errors[kind], COUNTER_LIMIT)
        return out

    def final_totals(self, client: Client, mag_caps: dict[int, int]) -> tuple[int, dict[int, ClassTotals]]:
        """A leaving client's last figures: (operations it died in the middle of, now counted; its totals).

        Before the reclaim: the settle reads the live bytes that the reclaim resets.
        """
        return self._settle(client), self.totals(client, mag_caps)

    def _settle(self, client: Client) -> int:
        """Count the operations a dead client was killed in the middle of (SLITTER_COUNTING); how many."""
        view, rack = self.arena.view, self.rack(client)
        settled = 0
        under_way = {class_id for class_id, tc in self.magazines(client)
                     if (tc.counters.allocations | tc.counters.releases) & COUNTING}
        for class_id in under_way:
            n = lib.slitter_settle_counting(view, rack, class_id, tag(client))
            if n == SETTLE_FAILED:
                log.warning("client %d (pid %d): no memory to settle class %d's operations under way; "
                            "its counters may be off by those", client.id, client.pid, class_id)
            else:
                settled += n
        return settled

    def release_rack(self, client: Client) -> None:
        """Forget the client; its rack is wiped when next handed out."""
        self.clients.pop(client.id, None)
        self.generation += 1
        self.arena.wipe_rack(client.rack_index)
        self.arena.owners[client.rack_index].client_id = 0
        self.free_racks.append(client.rack_index)
        if client.pidfd is not None:
            os.close(client.pidfd)
            client.pidfd = None
