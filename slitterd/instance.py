"""The ``Instance``: everything one slitterd serves, wired together.

It owns the ``Arena`` (segments), the ``Mill`` (runs), one ``Depot`` per
class, the ``Racks`` of attached clients and the per-class totals retired
from clients that left.  Handlers call its methods; it never talks to a
socket.
"""

from __future__ import annotations

import logging
from array import array
from dataclasses import dataclass

from slitter import errors
from slitter._native import ffi, lib
from slitter.protocol import ERROR_KINDS

from slitterd.arena import Arena
from slitterd.audit import AuditLog
from slitterd.depot import Depot
from slitterd.mill import ClassGeometry, Mill
from slitterd.rack import ERR_KINDS, MAX_CLASSES, Client, ClassTotals, Racks

log = logging.getLogger("slitterd")


@dataclass(frozen=True)
class ClassSpec:
    """What a client asked a class to be; registering it again must match."""

    name: str
    size: int
    zero_init: bool


class Instance:
    """The daemon's state for one instance."""

    def __init__(self, name: str, arena: Arena, max_clients: int) -> None:
        self.name = name
        self.arena = arena
        self.mill = Mill(arena)
        self.racks = Racks(arena, max_clients)
        self.specs: dict[str, tuple[int, ClassSpec]] = {}
        self.depots: dict[int, Depot] = {}
        self.retired: dict[int, ClassTotals] = {}
        self.audit_errors: dict[int, list[int]] = {}
        self.audit = AuditLog()
        self.policies: dict[int, str] = {}

    # -- classes ---------------------------------------------------------

    def register_class(self, spec: ClassSpec) -> int:
        """The id of the class named ``spec.name``, creating it if new.

        Raises:
            ClassConflict: the name exists with another size or zero_init.
            LimitExceeded: every class id is taken.
        """
        known = self.specs.get(spec.name)
        if known is not None:
            class_id, existing = known
            if existing != spec:
                raise errors.ClassConflict(
                    f"class '{spec.name}' exists with size {existing.size}, zero_init={existing.zero_init}; "
                    f"cannot register it with size {spec.size}, zero_init={spec.zero_init}",
                    class_name=spec.name)
            return class_id
        class_id = len(self.specs) + 1
        if class_id >= MAX_CLASSES:
            raise errors.LimitExceeded(f"cannot register class '{spec.name}': all {MAX_CLASSES - 1} class ids are in use",
                                       class_name=spec.name)
        geometry = ClassGeometry.for_size(spec.size)
        entry = self.arena.classes[class_id]
        entry.name = spec.name.encode()
        entry.size, entry.stride = spec.size, geometry.stride
        entry.div_magic = (2**64 - 1) // geometry.stride + 1
        entry.objects_per_run, entry.spans_per_run = geometry.objects_per_run, geometry.spans_per_run
        entry.mag_capacity = geometry.mag_capacity
        entry.flags = lib.SLITTER_CLASS_ZERO_INIT if spec.zero_init else 0
        entry.id = class_id  # last: the fast path trusts an entry once its id is set
        self.arena.header.nclasses = class_id
        self.specs[spec.name] = (class_id, spec)
        self.depots[class_id] = Depot(self.arena, self.mill, class_id)
        self.retired[class_id] = ClassTotals()
        self.audit_errors[class_id] = [0] * ERR_KINDS
        log.info("registered class '%s' id=%d size=%d stride=%d objects/run=%d magazine=%d zero_init=%s",
                 spec.name, class_id, spec.size, geometry.stride, geometry.objects_per_run,
                 geometry.mag_capacity, spec.zero_init)
        return class_id

    def set_policy(self, class_id: int, policy: str) -> str:
        """Give a class its error policy once; '' keeps what it has.  Returns the policy."""
        current = self.policies.get(class_id, "")
        if policy and current and policy != current:
            name = self.class_name(class_id)
            raise errors.ClassConflict(f"class '{name}' has error policy '{current}'; cannot set '{policy}'",
                                       class_name=name)
        if policy:
            self.policies[class_id] = policy
        return self.policies.get(class_id, "raise")

    def class_name(self, class_id: int) -> str:
        return ffi.string(self.arena.classes[class_id].name).decode()

    def mag_capacity(self, class_id: int) -> int:
        return self.arena.classes[class_id].mag_capacity

    # -- magazines -------------------------------------------------------

    def refill(self, client: Client, thread: int, class_id: int) -> int:
        """Fill an empty allocation magazine from the depot; returns its count."""
        tc = self.racks.thread_class(client, thread, class_id)
        cap = self.mag_capacity(class_id)
        if tc.alloc_count:
            return min(tc.alloc_count, cap)
        depot = self.depots[class_id]
        handles = depot.take(cap)
        ffi.memmove(tc.alloc, ffi.from_buffer("uint64_t[]", handles), 8 * len(handles))
        tc.alloc_count = len(handles)
        depot.refills += 1
        return len(handles)

    def flush(self, client: Client, thread: int, class_id: int) -> tuple[int, list[tuple[int, str]]]:
        """Audit the release magazine and return what passes to the depot."""
        tc = self.racks.thread_class(client, thread, class_id)
        count = min(tc.release_count, self.mag_capacity(class_id))
        handles = array("Q", bytes(8 * count))
        ffi.memmove(ffi.from_buffer("uint64_t[]", handles), tc.release, 8 * count)
        tc.release_count = 0
        self.depots[class_id].flushes += 1
        return self._audit_into_depot(client, class_id, handles, "flush")

    def _audit_into_depot(self, client: Client, class_id: int, handles: array,
                          source: str) -> tuple[int, list[tuple[int, str]]]:
        n = len(handles)
        if n == 0:
            return 0, []
        accepted = ffi.new("uint64_t[]", n)
        refused = ffi.new("uint64_t[]", n)
        kinds = ffi.new("uint8_t[]", n)
        nrefused = ffi.new("uint32_t *")
        nacc = lib.slitter_audit_flush(self.arena.view, class_id, ffi.from_buffer("uint64_t[]", handles), n,
                                       accepted, refused, kinds, nrefused)
        good = array("Q", bytes(8 * nacc))
        ffi.memmove(ffi.from_buffer("uint64_t[]", good), accepted, 8 * nacc)
        self.depots[class_id].give(good)
        bad = [(refused[i], ERROR_KINDS[kinds[i]]) for i in range(nrefused[0])]
        for handle, kind in bad:
            self.audit_errors[class_id][ERROR_KINDS.index(kind)] += 1
            self.audit.record(client.pid, self.class_name(class_id), handle, kind, source)
        return nacc, bad

    # -- clients ---------------------------------------------------------

    def reclaim(self, client: Client, why: str) -> int:
        """Take back every cached object of a leaving client; returns how many."""
        caps = {cid: self.mag_capacity(cid) for cid in self.depots}
        totals = self.racks.totals(client, caps)
        reclaimed = 0
        for class_id, tc in list(self.racks.magazines(client)):
            if class_id not in caps:
                continue
            handles = self.racks.drain(client, class_id, tc, caps[class_id])
            reclaimed += self._audit_into_depot(client, class_id, handles, "reclaim")[0]
        for class_id, t in totals.items():
            t.cached = 0
            self.retired[class_id].add(t)
        self.racks.release_rack(client)
        log.info("client %d (pid %d, %s) %s; %d cached objects reclaimed", client.id, client.pid,
                 client.name or "-", why, reclaimed)
        return reclaimed

    # -- figures ---------------------------------------------------------

    def class_stats(self) -> dict[str, dict]:
        """Per-class figures; carved == live + cached + free when quiet."""
        caps = {cid: self.mag_capacity(cid) for cid in self.depots}
        sums = {cid: ClassTotals() for cid in self.depots}
        for cid, t in self.retired.items():
            sums[cid].add(t)
        for client in self.racks.clients.values():
            for cid, t in self.racks.totals(client, caps).items():
                sums[cid].add(t)
        out = {}
        for name, (cid, spec) in self.specs.items():
            depot, t, cls = self.depots[cid], sums[cid], self.arena.classes[cid]
            errs = {kind: t.errors[k] + self.audit_errors[cid][k] for k, kind in enumerate(ERROR_KINDS)}
            out[name] = {
                "id": cid, "size": spec.size, "stride": cls.stride, "zero_init": spec.zero_init,
                "policy": self.policies.get(cid, "raise"),
                "carved": depot.carved, "live": t.allocations - t.releases, "cached": t.cached,
                "free": len(depot.free), "allocations": t.allocations, "releases": t.releases,
                "refills": depot.refills, "flushes": depot.flushes, "errors": errs,
                "runs": depot.runs, "reserved_bytes": depot.runs * cls.spans_per_run * lib.SLITTER_SPAN_SIZE,
            }
        return out

    def client_stats(self) -> list[dict]:
        caps = {cid: self.mag_capacity(cid) for cid in self.depots}
        out = []
        for client in self.racks.clients.values():
            per_class = {self.class_name(cid): {"live": t.allocations - t.releases, "cached": t.cached,
                                                "allocations": t.allocations, "releases": t.releases}
                         for cid, t in self.racks.totals(client, caps).items()}
            out.append({"id": client.id, "pid": client.pid, "name": client.name, "classes": per_class})
        return out

    def instance_stats(self) -> dict:
        h = self.arena.header
        return {"name": self.name, "arena_bytes": h.arena_size, "runs": h.nruns,
                "spans_used": h.next_span, "spans": h.nspans,
                "committed_bytes": self.arena.committed_bytes(), "clients": len(self.racks.clients)}
