"""The ``Instance``: everything one slitterd serves, wired together.

It owns the ``Arena`` (segments), the ``Mill`` (runs), one ``Depot`` per
class, the ``Racks`` of attached clients, the ``Shelf``, the ``AuditLog``, and the
per-class totals kept in the segment (counters of clients that left, audit
refusals, refills, flushes).  Handlers call its methods; it never talks to
a socket.  ``recover()`` rebuilds all of it from the segments of a daemon
that died or stopped.
"""

from __future__ import annotations

import logging
import os
import time
from array import array
from collections import Counter, OrderedDict
from dataclasses import dataclass

from slitter import errors
from slitter._native import ffi, lib
from slitter.protocol import ERROR_KINDS, POLICIES

from slitterd.arena import Arena
from slitterd.audit import AuditLog
from slitterd.depot import Depot
from slitterd.mill import ClassGeometry, Mill, Run
from slitterd.rack import ERR_KINDS, MAX_CLASSES, Client, ClassTotals, Racks, owner_name, tag
from slitterd.shelf import Shelf

log = logging.getLogger("slitterd")

POLICY_SHIFT = lib.SLITTER_CLASS_POLICY_SHIFT
TOTAL_LIMIT = (1 << 63) - 1  # what msgpack and the u64 totals can both carry
# Magazines sized by demand: a thread whose prefetches, or whose flush-aheads,
# of one class come this close together gets magazines twice as big, up to the
# layout's SLITTER_MAG_CAP handles and GROWN_MAGAZINE_BYTES of objects.  Each
# message costs the daemon about 50 µs and the sender 25-30 µs, so a stream
# pays less per object; a thread that allocates or releases slowly keeps the
# class's size (ClassGeometry).
GROW_SECONDS = 0.05
GROWN_MAGAZINE_BYTES = 4 << 20
MAG_CAP = lib.SLITTER_MAG_CAP  # read once: a cffi lib attribute costs about 90 ns a read here
#: Attaches abandoned before they arrived, remembered so that they are refused when they do (oldest dropped).
ABANDONED_REMEMBERED = 1024


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
        self.audit = AuditLog()
        #: (pid, nonce) of attaches whose ABANDON came first (handlers.abandon).
        self._abandoned: OrderedDict[tuple[int, int], None] = OrderedDict()
        #: The magazines clients pass to each other, as the daemon sees them.
        self.shelf = Shelf(arena, self.depots)
        #: The policy of classes registered without one (the config's error_policy).
        self.default_policy = "raise"
        # Scratch of the loop's thread for flush(): its magazines (release and
        # outgoing, each at most the layout's cap), and the audit's refusals.
        most = 2 * MAG_CAP
        self._flush_scratch = ffi.new("uint64_t[]", most)
        self._refused_scratch = (ffi.new("uint64_t[]", most), ffi.new("uint8_t[]", most), ffi.new("uint32_t *"))

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
        self._add_class(class_id, spec)
        log.info("registered class '%s' id=%d size=%d stride=%d objects/run=%d magazine=%d zero_init=%s",
                 spec.name, class_id, spec.size, geometry.stride, geometry.objects_per_run,
                 geometry.mag_capacity, spec.zero_init)
        return class_id

    def _add_class(self, class_id: int, spec: ClassSpec) -> None:
        self.specs[spec.name] = (class_id, spec)
        self.depots[class_id] = Depot(self.arena, self.mill, class_id)

    def policy(self, class_id: int) -> str:
        """The class's error policy: its own if one was set, else the instance's default."""
        bits = (self.arena.classes[class_id].flags >> POLICY_SHIFT) & 3
        return POLICIES[bits - 1] if bits else self.default_policy

    def set_policy(self, class_id: int, policy: str) -> str:
        """Give a class its error policy once; '' keeps what it has.  Returns the policy."""
        entry = self.arena.classes[class_id]
        is_set = bool(entry.flags & lib.SLITTER_CLASS_POLICY_MASK)
        current = self.policy(class_id)
        if policy and is_set and policy != current:
            name = self.class_name(class_id)
            raise errors.ClassConflict(f"class '{name}' has error policy '{current}'; cannot set '{policy}'",
                                       class_name=name)
        if policy and not is_set:
            entry.flags = (entry.flags & ~lib.SLITTER_CLASS_POLICY_MASK) | ((POLICIES.index(policy) + 1) << POLICY_SHIFT)
        return self.policy(class_id)

    def set_cap(self, class_id: int, cap: int) -> int:
        """Cap the objects a class may ever carve (0 keeps the current cap); returns the cap.

        A cap below what is already carved stops further carving; it never
        takes objects away.
        """
        if cap:
            self.arena.classes[class_id].cap = cap
        return self.arena.classes[class_id].cap

    def class_name(self, class_id: int) -> str:
        return ffi.string(self.arena.classes[class_id].name).decode()

    def mag_capacity(self, class_id: int) -> int:
        return self.arena.classes[class_id].mag_capacity

    # -- magazines -------------------------------------------------------

    def refill(self, client: Client, thread: int, class_id: int, spare: bool = False) -> int:
        """Fill the thread's empty allocation magazine, and its spare if that is empty.

        With ``spare``, only the spare: the prefetch a client sends without
        waiting when it took its spare.  Returns the handles written.
        """
        tc = self.racks.thread_class(client, thread, class_id)
        cap = self._magazine_size(client, thread, class_id, tc, "prefetch" if spare else None)
        self.arena.totals[class_id].refills += 1
        # Before any handle is written: stats and reclaim read only touched magazines.
        lib.slitter_mark_touched(self.racks.rack(client), thread, class_id)
        written = 0
        if not spare and tc.alloc_count == 0:
            written += self._fill(client, class_id, tc.alloc, cap)
            tc.alloc_count = written
        if tc.spare_count == 0:
            try:
                n = self._fill(client, class_id, tc.spare, cap)
            except errors.OutOfMemory:
                if spare or not written:
                    raise
                n = 0  # the allocation magazine got objects: no prefetch this time
            tc.spare_count = n  # last: publishes the spare to the client
            written += n
        return written

    def _magazine_size(self, client: Client, thread: int, class_id: int, tc, ahead: str | None) -> int:
        """How many handles a magazine of this thread and class holds: its capacity, grown by demand.

        At least the class's capacity (a thread bound before its class's
        first refill), at most the arrays' (a count the client wrote is
        trusted up to them).  With ``ahead``, "prefetch" (a spare refill
        sent without waiting) or "flush" (an outgoing magazine sent without
        waiting), doubled when the thread's last message of that kind came
        within GROW_SECONDS, up to GROWN_MAGAZINE_BYTES: a thread that
        streams either way grows its magazines, one that only releases too.
        The capacity in the rack only grows, never shrinks: the fast path's
        room arithmetic assumes its counts never exceed it; the client reads
        it once per call, so a change between two calls is safe.  Comparisons,
        not min/max: this runs on every refill and flush, and min(max()) cost
        0.4 µs here.
        """
        current, base = tc.capacity, self.mag_capacity(class_id)
        size = current if current > base else base
        if size > MAG_CAP:
            return MAG_CAP
        if ahead is not None:
            now = time.monotonic()
            key = (thread, class_id, ahead)
            last = client.last_ahead.get(key)
            client.last_ahead[key] = now
            if last is not None and now - last < GROW_SECONDS:
                limit = GROWN_MAGAZINE_BYTES // self.arena.classes[class_id].stride
                limit = MAG_CAP if limit > MAG_CAP else (base if limit < base else limit)
                if size < limit:
                    size = size * 2 if size * 2 < limit else limit
        if size > current:
            tc.capacity = size  # before the magazine is published (spare_count is written last)
        return size

    def _fill(self, client: Client, class_id: int, magazine, cap: int) -> int:
        handles = self.depots[class_id].take(cap)
        buf = ffi.from_buffer("uint64_t[]", handles)
        lib.slitter_hand_out(self.arena.view, class_id, buf, len(handles), tag(client))  # before the client can see them
        ffi.memmove(magazine, buf, 8 * len(handles))
        return len(handles)

    def flush(self, client: Client, thread: int, class_id: int,
              outgoing: bool = False) -> tuple[int, list[tuple[int, str]]]:
        """Audit the release magazine, and the outgoing one if published; the good go to the depot.

        With ``outgoing``, only the outgoing magazine: the flush a client
        sends without waiting when its fast path moved a full release
        magazine out of the way.
        """
        tc = self.racks.thread_class(client, thread, class_id)
        self.arena.totals[class_id].flushes += 1
        # Both magazines copied once, into scratch the client cannot write: the
        # audit then reads each handle once, whatever the client does meanwhile.
        # Counts are trusted up to the arrays (MAG_CAP), not to the thread's capacity.
        handles = self._flush_scratch
        n = 0
        if not outgoing:
            n = tc.release_count
            if n > MAG_CAP:
                n = MAG_CAP
            if n:
                ffi.memmove(handles, tc.release, 8 * n)
            tc.release_count = 0
        published = tc.outgoing_count
        if published > MAG_CAP:
            published = MAG_CAP
        if published:
            ffi.memmove(handles + n, tc.outgoing, 8 * published)
        result = self._audit_into_depot(client, class_id, handles, n + published, "flush")
        if outgoing and tc.capacity:  # a bound thread's flush-ahead: its releases set the pace
            self._magazine_size(client, thread, class_id, tc, "flush")
        if published:
            tc.outgoing_count = 0  # last: hands the outgoing magazine back to the client
        return result

    def _audit_into_depot(self, client: Client, class_id: int, handles, n: int,
                          source: str) -> tuple[int, list[tuple[int, str]]]:
        """Audit ``n`` handles (a C array the client cannot write); the accepted go onto the depot's stack.

        The audit writes the accepted handles straight onto the depot's
        stack and the refused ones into reused scratch: no buffer is
        allocated, zeroed or copied again per flush (a 4096-handle flush
        spent about 7 µs on that, next to about 25 µs of audit).
        """
        if n == 0:
            return 0, []
        refused, kinds, nrefused = self._refused_scratch
        view, rack_tag = self.arena.view, tag(client)
        nacc = self.depots[class_id].give_audited(
            lambda top: lib.slitter_audit_flush(view, class_id, rack_tag, handles, n, top, refused, kinds, nrefused), n)
        nbad = nrefused[0]
        if nbad == 0:
            return nacc, []
        bad_kinds = ffi.unpack(kinds, nbad)  # a list: one kind index per refused handle
        totals = self.arena.totals[class_id]
        for kind, count in Counter(bad_kinds).items():
            totals.audit_errors[kind] += count
        bad = list(zip(ffi.unpack(refused, nbad), map(ERROR_KINDS.__getitem__, bad_kinds)))
        self.audit.record_many(client.pid, self.class_name(class_id), bad, source)
        return nacc, bad

    # -- clients ---------------------------------------------------------

    def _caps(self) -> dict[int, int]:
        # A thread's magazines may have grown past the class's capacity (_magazine_size):
        # a rack's counts are trusted up to the size of the arrays.
        return {cid: MAG_CAP for cid in self.depots}

    def reclaim(self, client: Client, why: str) -> int:
        """Take back every cached object of a leaving client; returns how many.

        The live map, not the rack, says what the client cached: every
        object tagged with its rack returns to its depot, whatever state the
        rack was left in; so do the objects of the shelf slots it held
        mid-put or mid-take.  When it is the last client, the whole shelf
        goes back to the depots: nobody is left to take from it.
        """
        settled, totals = self.racks.final_totals(client, self._caps())  # before the tags are reclaimed
        if settled:
            log.info("client %d (pid %d) died in the middle of %d operation(s); counted", client.id, client.pid,
                     settled)
        last = len(self.racks.clients) == 1
        held = self.shelf.hold(client.rack_index, everything=last)
        reclaimed = self._reclaim_tags([tag(client), *Shelf.tags(held)])
        self.shelf.release(held)  # only now: a client claiming one mid-scan would lose what it put
        # Retire the counters, then forget the rack.  A crash between the two
        # counts the client twice; recover() reconciles against the live map.
        self._retire_client(client.pid, client.name, totals)
        self.racks.release_rack(client)
        if all(other.pid != client.pid for other in self.racks.clients.values()):
            self.audit.forget(client.pid)  # its log-line budget: per process
        log.info("client %d (pid %d, %s) %s; %d cached objects reclaimed", client.id, client.pid,
                 client.name or "-", why, reclaimed)
        return reclaimed

    def abandon(self, pid: int, nonce: int) -> bool:
        """A client gave up waiting for the reply to its attach (``pid``, ``nonce``).

        If the attach arrived, the client it made is detached (its rack
        reclaimed): the process never learnt of it, and it would hold a rack
        for as long as the process lives.  If not, the attach is remembered
        and refused when it arrives: the two may come in either order, over
        two connections.  Returns whether a client was detached.
        """
        client = self.racks.by_nonce(pid, nonce)
        if client is not None:
            self.reclaim(client, "abandoned its attach")
            return True
        self._abandoned[(pid, nonce)] = None
        if len(self._abandoned) > ABANDONED_REMEMBERED:
            self._abandoned.popitem(last=False)
        return False

    def abandoned_attach(self, pid: int, nonce: int) -> bool:
        """Whether an ABANDON of this attach came before it (the attach is then refused)."""
        try:
            del self._abandoned[(pid, nonce)]
        except KeyError:
            return False
        return True

    def _retire_client(self, pid: int, name: str, totals: dict[int, ClassTotals]) -> None:
        """Fold a leaving client's counters into the class totals and record it as departed."""
        for class_id, t in totals.items():
            self._retire(class_id, t)
        self._record_departed(pid, name, totals)

    def _reclaim_tags(self, tags: list[int]) -> int:
        """Every object under one of ``tags`` back to its depot, in one pass over the live map."""
        table = ffi.new("uint8_t[256]")
        for t in tags:
            table[t] = 1
        reclaimed = 0
        for index in range(self.arena.header.nruns):
            run = self.arena.runs + index
            if not run.carved:
                continue
            out = array("Q", bytes(8 * run.carved))
            n = lib.slitter_reclaim_run(self.arena.view, run, table, ffi.from_buffer("uint64_t[]", out))
            if n:
                self.depots[run.class_id].give(out[:n])
                reclaimed += n
        return reclaimed

    def _record_departed(self, pid: int, name: str, totals: dict[int, ClassTotals]) -> None:
        """Remember, in the segment, what a leaving client left live (per class)."""
        left = {cid: t.allocations - t.releases for cid, t in totals.items() if t.allocations != t.releases}
        if not left:
            return
        ring = self.arena.departed
        entry = ring.entries[ring.count % lib.SLITTER_DEPARTED_MAX]
        ffi.memmove(ffi.addressof(entry), b"\0" * ffi.sizeof(entry), ffi.sizeof(entry))
        entry.pid = pid
        entry.name = name.encode()[: lib.SLITTER_CLIENT_NAME_MAX - 1]
        for cid, n in left.items():
            entry.live[cid] = max(min(n, TOTAL_LIMIT), -TOTAL_LIMIT)
        ring.count += 1  # last: the entry is complete

    def departed(self) -> list[dict]:
        """The clients that left objects live, oldest first."""
        ring = self.arena.departed
        out = []
        for i in range(max(0, ring.count - lib.SLITTER_DEPARTED_MAX), ring.count):
            entry = ring.entries[i % lib.SLITTER_DEPARTED_MAX]
            live = {self.class_name(cid): entry.live[cid] for cid in self.depots if entry.live[cid]}
            out.append({"pid": entry.pid, "name": ffi.string(entry.name).decode(errors="replace"), "live": live})
        return out

    def _retire(self, class_id: int, t: ClassTotals) -> None:
        kept = self.arena.totals[class_id]
        # Saturating: a hostile rack cannot overflow what the daemon keeps.
        kept.retired_allocations = min(kept.retired_allocations + t.allocations, TOTAL_LIMIT)
        kept.retired_releases = min(kept.retired_releases + t.releases, TOTAL_LIMIT)
        for kind in range(ERR_KINDS):
            kept.retired_errors[kind] = min(kept.retired_errors[kind] + t.errors[kind], TOTAL_LIMIT)

    # -- recovery --------------------------------------------------------

    def recover(self) -> dict[str, int]:
        """Rebuild the daemon's state from the segments of a previous daemon.

        Classes come from the class table, runs and their bump pointers from
        the run table.  Racks whose client still runs are adopted as they
        are (those clients go on with the same id and token); the others are
        retired.  Every carved object that is not live and not cached in an
        adopted rack goes to its depot, so no live object is lost and none
        is handed out twice.
        """
        header = self.arena.header
        for class_id in range(1, header.nclasses + 1):
            entry = self.arena.classes[class_id]
            if entry.id != class_id:
                continue
            spec = ClassSpec(self.class_name(class_id), entry.size, bool(entry.flags & lib.SLITTER_CLASS_ZERO_INIT))
            self._add_class(class_id, spec)
        for index in range(header.nruns):
            run = self.arena.runs + index  # a pointer: the C helpers take one
            depot = self.depots[run.class_id]
            depot.runs += 1
            depot.carved += run.carved
            if run.carved < run.nobjects:
                depot.run = Run(run.first_span * lib.SLITTER_SPAN_SIZE, run.nobjects, run[0], run.carved)
        adopted = retired = 0
        caps = self._caps()
        adopted_tags = ffi.new("uint8_t[256]")
        for index in range(self.arena.geometry.max_racks):
            owner = self.arena.owners[index]
            if owner.client_id == 0:
                continue
            try:
                pidfd = os.pidfd_open(owner.pid)
            except (OSError, OverflowError, ValueError):
                pidfd = None
            if pidfd is None:
                # Its cached objects are tagged with a rack nobody adopts: the
                # scan below returns them to the depots.
                gone = Client(owner.client_id, 0, owner.pid, owner_name(owner), index, None)
                _settled, totals = self.racks.final_totals(gone, caps)  # before the scan below resets bytes
                self._retire_client(gone.pid, gone.name, totals)
                self.arena.wipe_rack(index)
                owner.client_id = 0
                retired += 1
                continue
            self.racks.adopt(index, pidfd)
            adopted_tags[lib.SLITTER_TAG_BASE + index] = 1
            adopted += 1
        shelf_held = self.shelf.hold_for_recovery(adopted_tags, adopted > 0)
        live, free = self._recover_runs(adopted_tags)
        self.shelf.release(shelf_held)  # only now: a client claiming one mid-scan would lose what it put
        if adopted == 0:
            self._reconcile(live)
        # With clients adopted, their fast paths go on while we count: the
        # live map and their counters are never read at one instant, so a
        # "discrepancy" would be an allocation in flight, not an error.
        header.generation += 1
        header.daemon_pid = os.getpid()
        return {"classes": len(self.depots), "runs": header.nruns, "adopted": adopted, "retired": retired,
                "free": free, "live": sum(live.values())}

    def _recover_runs(self, adopted_tags) -> tuple[dict[int, int], int]:
        """The live-map scan of recovery: (live objects by class id, objects returned to the depots)."""
        live = dict.fromkeys(self.depots, 0)
        free = 0
        nfree = ffi.new("uint32_t *")
        for index in range(self.arena.header.nruns):
            run = self.arena.runs + index
            out = array("Q", bytes(8 * run.carved))
            live[run.class_id] += lib.slitter_recover_run(self.arena.view, run, adopted_tags,
                                                          ffi.from_buffer("uint64_t[]", out), nfree)
            self.depots[run.class_id].give(out[:nfree[0]])
            free += nfree[0]
        return live, free

    def _reconcile(self, live: dict[int, int]) -> None:
        """Make the counters agree with the live map, the ground truth after a crash.

        Only sound while no client runs: recover() calls it when it adopted none.
        """
        sums = self._sums()
        for class_id, t in sums.items():
            counted = t.allocations - t.releases
            if counted != live[class_id]:
                log.warning("class '%s': counters said %d live, the live map says %d; reconciled",
                            self.class_name(class_id), counted, live[class_id])
                kept = self.arena.totals[class_id]
                if counted > live[class_id]:
                    kept.retired_releases = min(kept.retired_releases + counted - live[class_id], TOTAL_LIMIT)
                else:
                    kept.retired_allocations = min(kept.retired_allocations + live[class_id] - counted, TOTAL_LIMIT)

    # -- figures ---------------------------------------------------------

    def _sums(self) -> dict[int, ClassTotals]:
        caps = self._caps()
        sums = {cid: ClassTotals() for cid in self.depots}
        for cid, t in sums.items():
            kept = self.arena.totals[cid]
            t.allocations, t.releases = kept.retired_allocations, kept.retired_releases
            t.errors = [kept.retired_errors[k] + kept.audit_errors[k] for k in range(ERR_KINDS)]
        for client in self.racks.clients.values():
            for cid, t in self.racks.totals(client, caps).items():
                sums[cid].add(t)
        return sums

    def class_errors(self) -> dict[str, dict[str, int]]:
        """Per class, the refusals counted anywhere (racks, retired clients, the audit), by kind."""
        return {self.class_name(cid): dict(zip(ERROR_KINDS, t.errors)) for cid, t in self._sums().items()}

    def class_stats(self) -> dict[str, dict]:
        """Per-class figures; carved == live + cached + free when quiet."""
        sums = self._sums()
        shelved = self.shelf.counts()
        out = {}
        for name, (cid, spec) in self.specs.items():
            depot, t, cls, kept = self.depots[cid], sums[cid], self.arena.classes[cid], self.arena.totals[cid]
            out[name] = {
                "id": cid, "size": spec.size, "stride": cls.stride, "zero_init": spec.zero_init,
                "policy": self.policy(cid),
                "carved": depot.carved, "live": t.allocations - t.releases, "cached": t.cached + shelved[cid],
                "shelved": shelved[cid], "free": depot.nfree, "allocations": t.allocations, "releases": t.releases,
                "refills": kept.refills, "flushes": kept.flushes,
                **self.shelf.figures(cid),
                "errors": dict(zip(ERROR_KINDS, t.errors)),
                "runs": depot.runs, "reserved_bytes": depot.runs * cls.spans_per_run * lib.SLITTER_SPAN_SIZE,
                "cap": cls.cap,
            }
        return out

    def client_stats(self) -> list[dict]:
        caps = self._caps()
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
                "departed": self.departed(),
                "spans_used": h.next_span, "spans": h.nspans, "generation": h.generation,
                "committed_bytes": self.arena.committed_bytes(), "clients": len(self.racks.clients)}
