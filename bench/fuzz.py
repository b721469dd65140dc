"""Hostile-input fuzzer for slitterd (a soak run, not a benchmark of speed).

It spawns a private daemon (``slitter.spawn_daemon()``), attaches a victim
client (classes registered, live objects of known content, objects cached in
both magazines of its rack), attaches an attacker with a raw ``attach``
message, and sends ``--cases`` hostile frames over a raw DEALER socket, made
with the ``random`` module alone:

* ``bytes``      random bytes, sometimes behind a msgpack header
* ``mutated``    a valid request's bytes, cut, flipped, spliced or extended
* ``msgpack``    random msgpack values (nested lists and maps, ext types)
* ``near_valid`` a real op with valid fields, then 0-3 mutations: wrong type,
                 out of range, wrong length, missing, extra, bad v/op/id,
                 bytes keys; the victim's id with wrong tokens, or unknown ids
* ``attacker``   the attacker's own valid client id and token: thread slots and
                 class ids out of range, unbound, or of classes it never used
* ``multipart``  several frames in one message; ``oversized`` over MAXMSGSIZE
* ``rack``       a second attacker (a real ``slitter.connect``) writes garbage
                 into its own rack (counts over capacity, garbage handles and
                 masks), then asks for refill and flush of any slot

Every frame must get an error reply (``ok`` False, an ErrorCode other than
INTERNAL, a message without "Traceback"; a schema refusal with the very code
``protocol.parse_request`` gives here), or be dropped when it is over
MAXMSGSIZE.  A valid REFILL or FLUSH with ``reply: false`` that succeeds
gets no reply (a PING sent right after it tells, without a timeout), and
must get none.  Valid requests that slip through may succeed.  Every
``--check-every`` cases: the daemon is alive and answers a ping, the victim's
stats entry, rack and objects are unchanged, and it can allocate and release.

Rack garbage includes the fast-path counters and handles cached in the
victim's rack: the daemon clamps untrusted counters, and the audit takes back
only objects tagged with the flushing rack (tests/test_hostile_messages.py
pins both).

Run it:

    cd bench && ../.venv/bin/python fuzz.py                  # 100k cases
    cd bench && ../.venv/bin/python fuzz.py --cases 1000000 --seed 7

Exit status 0 when no case failed.  A reply that breaks the promise (say an
INTERNAL error) is counted and shown with its first case, and the run goes
on; a dead or hung daemon, or a changed victim, stops the run: it prints the
last case and writes the last frames sent to a file (``--save``).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import random
import sys
import tempfile
import time

import msgpack
import zmq

import slitter
from slitter import protocol
from slitter._native import ffi, lib
from slitter.protocol import MAX_MESSAGE_BYTES, POLICIES, REQUEST_FIELDS, U32, U64, ErrorCode, Op

I64_MIN = -(1 << 63)
OPS = tuple(Op)
CRED_OPS = tuple(op for op in OPS if any(f.name == "client" for f in REQUEST_FIELDS[op]))
FIELD_NAMES = sorted({f.name for fields in REQUEST_FIELDS.values() for f in fields})
WORDS = ("v", "id", "op", *FIELD_NAMES, *(op.value for op in OPS))
MAG_CAP = lib.SLITTER_MAG_CAP
QUIET_PING_ID = 0x51554945  # the PING that follows a request with reply=False
MAX_THREADS = lib.SLITTER_MAX_THREADS
SPAN = lib.SLITTER_SPAN_SIZE
VICTIM_CLASSES = (("victim.small", 48, False, "raise"), ("victim.zeroed", 200, True, "log"),
                  ("victim.page", 4096, False, "raise"))

#: Relative weight of each kind of case.
KINDS = {"bytes": 14, "mutated": 14, "msgpack": 14, "near_valid": 30, "attacker": 16, "multipart": 2,
         "oversized": 0.05, "rack": 10}


class Failure(Exception):
    """A broken promise that ends the run: the daemon died or hangs, or the victim changed."""


class Problem(Exception):
    """A broken promise about one reply (wrong code, INTERNAL...): counted, and the run goes on."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"{key}: {detail}")
        self.key = key


# -- generators ---------------------------------------------------------------


class Gen:
    """Hostile values from one seeded ``random.Random``."""

    def __init__(self, rng: random.Random) -> None:
        self.r = rng

    def int_any(self) -> int:
        r = self.r
        return r.choice((0, 1, -1, U32, U32 + 1, U64, I64_MIN, 1 << 31, 1 << 63, r.randrange(-1000, 1000),
                         r.randrange(I64_MIN, U64 + 1), r.randrange(0, 1 << r.randrange(1, 65))))

    def text(self, n: int | None = None) -> str:
        r = self.r
        n = r.randrange(0, 30) if n is None else n
        pools = ("abcxyz", "\x00\x01\u00e9\u4e2d\U0001f600", "".join(map(chr, range(32, 127))))
        pool = r.choice(pools)
        return "".join(r.choice(pool) for _ in range(n))

    def scalar(self):
        r = self.r
        k = r.randrange(9)
        if k == 0:
            return None
        if k == 1:
            return r.random() < 0.5
        if k == 2:
            return self.int_any()
        if k == 3:
            return r.choice((0.0, -0.0, 1.5, float("inf"), float("nan"), r.uniform(-1e300, 1e300)))
        if k == 4:
            return self.text()
        if k == 5:
            return r.randbytes(r.randrange(0, 30))
        if k == 6:
            return r.choice(WORDS)
        if k == 7:
            return msgpack.ExtType(r.randrange(128), r.randbytes(r.randrange(0, 20)))
        return msgpack.Timestamp(r.randrange(0, 1 << 34), r.randrange(0, 10**9))

    def key(self):
        r = self.r
        return r.choice((r.choice(WORDS), self.text(r.randrange(0, 8)), r.randbytes(r.randrange(0, 4)),
                         r.randrange(-3, 4)))

    def value(self, depth: int = 0):
        r = self.r
        k = r.random()
        if depth >= 4 or k < 0.6:
            return self.scalar()
        if k < 0.8:
            return [self.value(depth + 1) for _ in range(r.randrange(0, 7))]
        return {self.key(): self.value(depth + 1) for _ in range(r.randrange(0, 7))}

    def valid(self, op: Op, field: protocol.Field, small: bool):
        """A value the schema accepts for ``field``."""
        r = self.r
        if field.kind is bool:
            return r.random() < 0.5
        if field.kind is str:
            if field.name == "policy":
                return r.choice(("", *POLICIES))
            if op is Op.REGISTER_CLASS and field.name == "name" and r.random() < 0.3:
                return r.choice(VICTIM_CLASSES)[0]
            while True:
                s = self.text(r.randrange(field.low, field.high + 1))
                if field.low <= len(s.encode()) <= field.high:
                    return s
        if field.name == "pid":
            return r.choice((1, os.getpid(), 2**22, 2**31 - 1, 2**31, U32, r.randrange(1, U32 + 1)))
        if field.name == "size" and small:
            return r.choice((1, 48, 200, 4096, r.randrange(1, 1 << 16)))
        if field.name == "thread":
            return r.choice((r.randrange(0, MAX_THREADS), r.randrange(field.low, field.high + 1)))
        edges = [v for v in (field.low, field.low + 1, field.high - 1, field.high) if field.low <= v <= field.high]
        return r.choice((r.choice(edges), r.randrange(field.low, min(field.high, field.low + 100) + 1),
                         r.randrange(field.low, field.high + 1)))

    def mutate(self, msg: dict, op: Op) -> None:
        r = self.r
        fields = REQUEST_FIELDS[op]
        for _ in range(r.choice((0, 0, 1, 1, 2, 3))):
            how = r.choice(("type", "range", "length", "missing", "extra", "version", "op", "id", "bytes_key"))
            f = r.choice(fields) if fields else None
            if how == "type" and f:
                msg[f.name] = r.choice([v for v in (None, 1.5, "1", b"1", [], {}, [1], True, False, 0, 7, "")
                                        if type(v) is not f.kind])
            elif how == "range" and f and f.kind is int:
                outside = [v for v in (f.low - 1, f.high + 1, -1, I64_MIN, U32 + 1, U64, 1 << 63)
                           if not f.low <= v <= f.high and I64_MIN <= v <= U64]
                msg[f.name] = r.choice(outside)
            elif how == "length" and f and f.kind is str:
                msg[f.name] = r.choice(["x" * (f.high + 1), "\u00e9" * (f.high // 2 + 1),
                                        "\U0001f600" * (f.high // 4 + 1)] + ([""] if f.low else []))
            elif how == "missing" and msg:
                msg.pop(r.choice(list(msg)))
            elif how == "extra":
                msg[r.choice((r.choice(FIELD_NAMES), self.text(r.randrange(0, 6))))] = self.scalar()
            elif how == "version":
                msg["v"] = r.choice((0, 2, -1, "1", None, 1.5, [1], U64, b"\x01"))
            elif how == "op":
                msg["op"] = r.choice(("", "PING", "ping ", "attach\x00", 1, None, ["ping"], "x" * 300,
                                      op.value.upper(), b"ping"))
            elif how == "id":
                msg["id"] = r.choice((-1, "1", 1.5, None, True, [1], I64_MIN))
            elif how == "bytes_key":
                keys = [k for k in msg if isinstance(k, str)]
                if keys:
                    k = r.choice(keys)
                    msg[k.encode()] = msg.pop(k)

    def request(self, ops, creds, small: bool) -> dict:
        op = self.r.choice(ops)
        msg = {"v": 1, "id": self.r.randrange(0, U64 + 1), "op": op.value}
        for f in REQUEST_FIELDS[op]:
            msg[f.name] = self.valid(op, f, small)
        if "client" in msg:
            msg["client"], msg["token"] = creds()
        self.mutate(msg, op)
        return msg

    def minimal(self, op: Op) -> dict:
        return protocol.request(op, self.r.randrange(0, U64 + 1),
                                **{f.name: f.low if f.kind is int else (False if f.kind is bool else "x" * f.low)
                                   for f in REQUEST_FIELDS[op]})

    def mutated_bytes(self) -> bytes:
        r = self.r
        frame = bytearray(pack(self.minimal(r.choice(OPS))))
        for _ in range(r.randrange(1, 5)):
            how = r.randrange(5)
            at = r.randrange(0, len(frame) + 1)
            if how == 0:
                del frame[at:]
            elif how == 1 and at < len(frame):
                frame[at] = r.randrange(256)
            elif how == 2:
                frame[at:at] = r.randbytes(r.randrange(1, 9))
            elif how == 3:
                frame += r.randbytes(r.randrange(1, 9))
            else:
                other = pack(self.minimal(r.choice(OPS)))
                frame[at:] = other[r.randrange(0, len(other)):]
        return bytes(frame)

    def random_bytes(self) -> bytes:
        r = self.r
        header = r.choice((b"", b"", b"\x81", b"\x83", b"\x8f", b"\xde\xff\xff", b"\xdf\xff\xff\xff\xff",
                           b"\x91" * r.randrange(1, 400), b"\xdd\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff",
                           b"\xc7\xff\x01", b"\xc1"))
        n = r.choice((r.randrange(0, 64), r.randrange(0, 1024), r.randrange(0, MAX_MESSAGE_BYTES - 512)))
        return header + r.randbytes(n)


def pack(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


# -- the socket and the oracle -------------------------------------------------


class Raw:
    def __init__(self, address: str) -> None:
        self.endpoint = "ipc://" + address
        self.context = zmq.Context()
        self.socket = None
        self.reopen()

    def reopen(self) -> None:
        if self.socket is not None:
            self.socket.close(0)
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(self.endpoint)

    def exchange(self, frames: list[bytes], timeout_ms: int):
        self.socket.send_multipart(frames)
        if not self.socket.poll(timeout_ms):
            return None
        return msgpack.unpackb(self.socket.recv(), raw=False, strict_map_key=False)

    def exchange_quiet(self, frames: list[bytes], timeout_ms: int):
        """Send a request whose success is not answered (``reply: false``), then a PING.

        The daemon answers in order, so the request's reply, if it has one (an
        error), arrives before the PING's: no timeout decides that a success
        was quiet.  Returns that reply, or None.
        """
        self.socket.send_multipart(frames)
        self.socket.send(pack(protocol.request(Op.PING, QUIET_PING_ID)))
        reply = None
        while True:
            if not self.socket.poll(timeout_ms):
                raise Failure("no reply to the PING sent after a request with reply=False: the daemon hangs")
            got = msgpack.unpackb(self.socket.recv(), raw=False, strict_map_key=False)
            if isinstance(got, dict) and got.get("id") == QUIET_PING_ID and got.get("ok") is True \
                    and "version" in got:
                return reply
            reply = got

    def ask(self, message: dict) -> dict:
        reply = self.exchange([pack(message)], 5000)
        if reply is None:
            raise Failure(f"no reply to {message}")
        return reply

    def close(self) -> None:
        self.socket.close(0)
        self.context.term()


def _quiet(frames: list[bytes]) -> bool:
    """A valid REFILL or FLUSH with ``reply: false``: its success gets no reply, its errors do."""
    if len(frames) != 1:
        return False
    try:
        return protocol.parse_request(frames[0]).args.get("reply") is False
    except protocol.Refusal:
        return False


def judge(frames: list[bytes], reply) -> tuple[str, object]:
    """('drop' | 'ok' | 'code N', parsed request or None).

    Raises Failure when nothing came back for a frame that must be answered,
    Problem when a reply breaks the protocol's promise.
    """
    if any(len(f) > MAX_MESSAGE_BYTES for f in frames):
        if reply is not None:
            raise Problem("oversized frame answered", f"{reply!r:.300}")
        return "drop", None
    if reply is None:
        raise Failure("no reply within the timeout: the daemon hangs")
    if not (isinstance(reply, dict) and reply.get("v") == 1 and type(reply.get("id")) is int
            and type(reply.get("ok")) is bool):
        raise Problem("not a reply", f"{reply!r:.300}")
    try:
        req = protocol.parse_request(frames[0]) if len(frames) == 1 else None
        refusal = None
    except protocol.Refusal as exc:
        req, refusal = None, exc
    op = req.op.value if req is not None else "-"
    if not reply["ok"]:
        code, error = reply.get("code"), reply.get("error")
        if type(code) is not int or code not in ErrorCode._value2member_map_:
            raise Problem("error reply without a known code", f"{reply!r:.300}")
        if type(error) is not str or "Traceback" in error:
            raise Problem("error reply with a bad message", f"{reply!r:.300}")
        if code == ErrorCode.INTERNAL:
            raise Problem(f"INTERNAL (an unhandled exception in the daemon) on op '{op}'", f"{reply!r:.300}")
    if len(frames) != 1:
        if reply["ok"] or reply["code"] != ErrorCode.MALFORMED:
            raise Problem("multi-frame message not refused as MALFORMED", f"{reply!r:.300}")
        return f"code {reply['code']}", None
    if refusal is not None:
        if reply["ok"] or (reply["code"], reply["id"]) != (refusal.code, refusal.request_id):
            raise Problem(f"daemon disagrees with the schema ({refusal.code.name})",
                          f"{refusal.message}; daemon replied {reply!r:.300}")
        return f"code {reply['code']}", None
    if reply["id"] != req.id:
        raise Problem("reply id is not the request id", f"{reply['id']} for {req.id}")
    return ("ok" if reply["ok"] else f"code {reply['code']}"), req


# -- victim and attackers ------------------------------------------------------


def content(handle: int, size: int) -> bytes:
    seed = hashlib.blake2b(handle.to_bytes(8, "little"), digest_size=32).digest()
    return (seed * (size // 32 + 1))[:size]


def tc_state(tc) -> tuple:
    n, m = min(tc.alloc_count, MAG_CAP), min(tc.release_count, MAG_CAP)
    c = tc.counters
    return (tc.alloc_count, tc.release_count, tc.capacity, c.allocations, c.releases, tuple(c.errors),
            tuple(ffi.unpack(tc.alloc, n)), tuple(ffi.unpack(tc.release, m)))


class Victim:
    def __init__(self, heap: slitter.Heap) -> None:
        self.heap = heap
        self.classes = [heap.register_class(n, s, zero_init=z, policy=p) for n, s, z, p in VICTIM_CLASSES]
        self.rack = ffi.cast("struct slitter_rack *", heap._rack.ptr)
        self.slot = {c.id: lib.slitter_bind(heap._client, c.id) for c in self.classes}
        self.live: dict[int, tuple[slitter.Class, bytes]] = {}
        for cls in self.classes:
            cap = self.tc(cls).capacity
            handles = [cls.allocate() for _ in range(cap + 40)]
            for h in handles[:24]:
                self.live[h] = (cls, content(h, cls.size))
                heap.view(h)[:] = self.live[h][1]
            for h in handles[24:]:
                cls.release(h)  # fills the allocation magazine, then the release one

    def tc(self, cls):
        return self.rack.threads[self.slot[cls.id]].classes[cls.id]

    def state(self) -> dict:
        """The victim's own: its stats entry and its rack (class figures are everyone's)."""
        clients = self.heap.stats()["clients"]
        r = self.rack
        return {"client": [c for c in clients if c["id"] == self.heap._client_id],
                "rack": (r.threads_claimed, r.threads_touched, r.pid, r.client_id,
                         [tc_state(self.tc(c)) for c in self.classes],
                         [r.threads[s].classes_touched for s in sorted(set(self.slot.values()))])}

    def check(self, before: dict) -> dict:
        after = self.state()
        if after != before:
            raise Failure("the victim's stats entry or rack changed:\n"
                          f"  before {json.dumps(before, default=str)[:2000]}\n"
                          f"  after  {json.dumps(after, default=str)[:2000]}")
        for h, (cls, data) in self.live.items():
            if bytes(self.heap.view(h)) != data:
                raise Failure(f"victim object {h:#x} of '{cls.name}' changed")
        for cls in self.classes:
            h = cls.allocate()
            view = self.heap.view(h)
            if cls.zero_init and any(view):
                raise Failure(f"zero_init object {h:#x} handed out dirty")
            view[:] = content(h ^ 1, cls.size)
            cls.release(h)
        return self.state()


class RackAttacker:
    """A real client that writes garbage into its own rack, then asks for refills and flushes."""

    def __init__(self, address: str, victim: Victim) -> None:
        heap = self.heap = slitter.connect(address, name="rack-attacker", timeout=5)
        classes = [heap.register_class("attacker.a", 64), heap.register_class("attacker.b", 1024, zero_init=True)]
        classes += [heap.register_class(n, s, zero_init=z) for n, s, z, _ in VICTIM_CLASSES]
        pool = []
        for cls in classes:
            hs = [cls.allocate() for _ in range(20)]
            for h in hs[10:]:
                cls.release(h)
            pool += hs
        self.slot = lib.slitter_bind(heap._client, classes[0].id)
        self.rack = ffi.cast("struct slitter_rack *", heap._rack.ptr)
        for cls in classes:
            lib.slitter_bind(heap._client, cls.id)
            tc = self.rack.threads[self.slot].classes[cls.id]
            pool += ffi.unpack(tc.alloc, min(tc.alloc_count, 64))
        header = ffi.cast("struct slitter_header *", heap._tables.ptr)
        runs = ffi.cast("struct slitter_run *", heap._tables.ptr + header.run_table_off)
        table = ffi.cast("struct slitter_class *", heap._tables.ptr + header.class_table_off)
        for i in range(header.nruns):
            run = runs[i]
            base, stride = run.first_span * SPAN, table[run.class_id].stride
            pool += [base, base + stride, base + 8, base + run.nobjects * stride, base + run.nspans * SPAN - 16]
        vlive = list(victim.live)
        pool += vlive + [h + 16 for h in vlive] + [h + 1 for h in vlive]
        pool += [0, 1, 16, SPAN, U64, 1 << 48, (1 << 48) | vlive[0], header.arena_size, 1 << 63]
        self.pool, self.victim = pool, victim
        self.class_ids = [c.id for c in classes]
        r = self.rack
        self.saved = (r.threads_claimed, r.threads_touched, r.pid, r.client_id)

    def creds(self) -> tuple[int, int]:
        return self.heap._client_id, self.heap._token

    def poke(self, rng: random.Random) -> tuple[list, object]:
        """Garbage into the rack, counters included; returns (slots poked, undo)."""
        r = self.rack
        pool = self.pool
        edges = (0, 1, 8, MAG_CAP - 1, MAG_CAP, MAG_CAP + 1, 1 << 31, U32)

        def u32() -> int:
            return rng.choice((*edges, rng.randrange(U32 + 1)))

        poked, undo = [], []
        for _ in range(rng.randrange(1, 4)):
            t = self.slot if rng.random() < 0.7 else rng.randrange(MAX_THREADS)
            c = rng.choice(self.class_ids) if rng.random() < 0.8 else rng.randrange(64)
            tc = r.threads[t].classes[c]
            undo.append((tc, tc.capacity, tuple(tc.counters.errors), tc.counters.allocations, tc.counters.releases))
            for mag in (tc.alloc, tc.release):
                picks = [rng.choice(pool) if rng.random() < 0.8 else rng.randrange(U64 + 1)
                         for _ in range(rng.randrange(0, 24))]
                for i in range(min(rng.randrange(0, MAG_CAP + 1), MAG_CAP) if picks else 0):
                    mag[i] = picks[i % len(picks)]
            tc.alloc_count, tc.release_count = u32(), u32()
            if rng.random() < 0.3:
                tc.capacity = u32()
            tc.counters.allocations, tc.counters.releases = rng.randrange(U64 + 1), rng.randrange(U64 + 1)
            tc.counters.errors[rng.randrange(5)] = rng.randrange(U64 + 1)
            poked.append((t, c))
        masks = [r.threads[t].classes_touched for t in range(MAX_THREADS)]
        if rng.random() < 0.3:
            r.threads_claimed, r.threads_touched = rng.randrange(U64 + 1), rng.randrange(U64 + 1)
            r.threads[self.slot].classes_touched = rng.randrange(U64 + 1)
        if rng.random() < 0.2:
            r.pid, r.client_id = rng.randrange(U32 + 1), rng.randrange(U32 + 1)

        def restore() -> None:
            for tc, cap, errs, allocs, rels in undo:
                tc.alloc_count = tc.release_count = 0
                tc.capacity = cap
                tc.counters.allocations, tc.counters.releases = allocs, rels
                for k, v in enumerate(errs):
                    tc.counters.errors[k] = v
            r.threads_claimed, r.threads_touched, r.pid, r.client_id = self.saved
            for t, m in enumerate(masks):
                r.threads[t].classes_touched = m

        return poked, restore

    def zero_slot(self, t: int, c: int) -> None:
        if t < MAX_THREADS and c < 64:
            self.rack.threads[t].classes[c].alloc_count = 0


# -- the run -------------------------------------------------------------------


class Run:
    def __init__(self, args: argparse.Namespace, address: str, daemon) -> None:
        self.args, self.daemon = args, daemon
        self.rng = random.Random(args.seed)
        self.gen = Gen(self.rng)
        self.raw = Raw(address)
        self.victim = Victim(slitter.connect(address, name="victim", timeout=5))
        self.rack = RackAttacker(address, self.victim)
        self.attacker = self._attach()
        self.replies: collections.Counter[str] = collections.Counter()
        self.by_kind: collections.Counter[str] = collections.Counter()
        self.audited: collections.Counter[str] = collections.Counter()
        self.recent: collections.deque = collections.deque(maxlen=args.keep)
        #: Problem key -> (count, (message, kind, frames) of the first one).
        self.problems: dict[str, tuple[int, tuple]] = {}
        self.messages = 0

    def _attach(self) -> tuple[int, int]:
        reply = self.raw.ask(protocol.request(Op.ATTACH, 1, pid=os.getpid(), name="raw-attacker"))
        if not reply.get("ok"):
            raise Failure(f"the raw attacker could not attach: {reply}")
        return reply["client"], reply["token"]

    def victim_creds(self) -> tuple[int, int]:
        r, vid, token = self.rng, self.victim.heap._client_id, self.victim.heap._token
        k = r.randrange(5)
        if k == 0:
            return vid, token ^ r.randrange(1, U64 + 1)
        if k == 1:
            return vid, (token + r.randrange(1, 4)) % (1 << 64)
        if k == 2:
            return vid, r.choice((0, U64)) if token not in (0, U64) else 1
        if k == 3:
            return vid + r.randrange(1, 100), token
        return r.randrange(1, U32 + 1), r.randrange(U64 + 1)

    def attacker_creds(self) -> tuple[int, int]:
        return self.attacker

    def send(self, kind: str, frames: list[bytes]):
        self.recent.append((kind, frames))
        self.messages += 1
        oversized = any(len(f) > MAX_MESSAGE_BYTES for f in frames)
        quiet = not oversized and _quiet(frames)
        if quiet:
            reply = self.raw.exchange_quiet(frames, self.args.timeout_ms)
        else:
            reply = self.raw.exchange(frames, 200 if oversized else self.args.timeout_ms)
        if reply is None and self.daemon.process.poll() is not None:
            raise Failure(f"slitterd died (exit {self.daemon.process.returncode}):\n{self.daemon.log_tail(25)}")
        if oversized:
            self.raw.reopen()
        if quiet and reply is None:  # a success, unanswered as asked
            self.replies["quiet ok"] += 1
            return None
        try:
            if quiet and (not isinstance(reply, dict) or reply.get("ok") is not False):
                raise Problem("success answered despite reply=False", f"{reply!r:.300}")
            outcome, req = judge(frames, reply)
        except Problem as problem:
            count, first = self.problems.get(problem.key, (0, None))
            self.problems[problem.key] = (count + 1, first or (str(problem), kind, frames))
            self.replies["problem"] += 1
            return reply
        self.replies[outcome] += 1
        if req is not None and reply["ok"]:
            self.after_ok(req, reply)
        return reply

    def after_ok(self, req, reply) -> None:
        if req.op is Op.ATTACH:  # a valid attach (a live pid): give the rack back at once
            self.raw.ask(protocol.request(Op.DETACH, 2, client=reply["client"], token=reply["token"]))
        elif req.op is Op.DETACH and req.args["client"] == self.attacker[0]:
            self.attacker = self._attach()
        elif req.op is Op.FLUSH:
            self.audited["accepted"] += reply["accepted"]
            for _h, kind in reply["refused"]:
                self.audited[kind] += 1
            # The reply lists the first MAX_REFUSED_LISTED; the rest are counted, kind unknown here.
            self.audited["unlisted"] += reply["refused_total"] - len(reply["refused"])

    def case(self) -> None:
        g, r = self.gen, self.rng
        kind = r.choices(list(KINDS), weights=list(KINDS.values()))[0]
        self.by_kind[kind] += 1
        if kind == "bytes":
            self.send(kind, [g.random_bytes()])
        elif kind == "mutated":
            self.send(kind, [g.mutated_bytes()])
        elif kind == "msgpack":
            value = g.value() if r.random() < 0.6 else {
                "v": r.choice((1, g.scalar())), "id": r.choice((r.randrange(U64 + 1), g.scalar())),
                "op": r.choice((r.choice(OPS).value, g.scalar())),
                **{r.choice((r.choice(FIELD_NAMES), g.key())): g.value(1) for _ in range(r.randrange(0, 7))}}
            self.send(kind, [pack(value)])
        elif kind == "near_valid":
            msg = g.request(OPS if r.random() < 0.5 else CRED_OPS, self.victim_creds, small=False)
            if (msg.get("client"), msg.get("token")) != (self.victim.heap._client_id, self.victim.heap._token):
                self.send(kind, [pack(msg)])
        elif kind == "attacker":
            if r.random() < 0.5:
                msg = g.request(CRED_OPS, self.attacker_creds, small=True)
            else:
                msg = protocol.request(r.choice((Op.REFILL, Op.FLUSH)), r.randrange(U64 + 1),
                                       client=self.attacker[0], token=self.attacker[1],
                                       thread=r.choice((r.randrange(MAX_THREADS), r.randrange(MAX_THREADS, 64))),
                                       class_id=r.choice((r.randrange(1, 64), r.choice(self.victim.classes).id)))
            self.send(kind, [pack(msg)])
        elif kind == "multipart":
            self.send(kind, [r.choice((b"", g.random_bytes()[:100], pack(g.minimal(Op.PING))))
                             for _ in range(r.randrange(2, 40))])
        elif kind == "oversized":
            frames = [r.randbytes(MAX_MESSAGE_BYTES + r.randrange(1, 4 * MAX_MESSAGE_BYTES))]
            if r.random() < 0.3:
                frames.insert(0, pack(g.minimal(Op.PING)))
            self.send(kind, frames)
        else:
            self.rack_case()

    def rack_case(self) -> None:
        r, a = self.rng, self.rack
        poked, restore = a.poke(r)
        client, token = a.creds()
        calls = [(op, t, c) for t, c in poked if c for op in r.sample((Op.REFILL, Op.FLUSH), r.randrange(1, 3))]
        calls += [(r.choice((Op.REFILL, Op.FLUSH)), r.randrange(64), r.randrange(1, 64))
                  for _ in range(r.randrange(0, 3))]
        r.shuffle(calls)
        try:
            for op, t, c in calls:
                self.send("rack", [pack(protocol.request(op, r.randrange(U64 + 1), client=client, token=token,
                                                         thread=t, class_id=c))])
            self.send("rack", [pack(protocol.request(Op.STATS, 3))])  # sums the garbage counters
        finally:
            restore()
            for _op, t, c in calls:
                a.zero_slot(t, c)

    def checkpoint(self, before: dict) -> dict:
        if self.daemon.process.poll() is not None:
            raise Failure(f"slitterd died (exit {self.daemon.process.returncode}):\n{self.daemon.log_tail(25)}")
        ping = self.raw.ask(protocol.request(Op.PING, 424242))
        if not ping.get("ok"):
            raise Failure(f"ping refused: {ping}")
        return self.victim.check(before)

    def save(self) -> str:
        fd, path = tempfile.mkstemp(prefix=f"slitter-fuzz-{self.args.seed}-", suffix=".msgpack",
                                    dir=self.args.save)
        with os.fdopen(fd, "wb") as f:
            f.write(pack([[kind, frames] for kind, frames in self.recent]))
        return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=100_000, help="hostile cases to send (default 100000)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    ap.add_argument("--check-every", type=int, default=500, metavar="N", help="check daemon and victim every N cases")
    ap.add_argument("--timeout-ms", type=int, default=5000, help="wait this long for each reply")
    ap.add_argument("--arena-size", default="4G")
    ap.add_argument("--keep", type=int, default=200, help="frames kept for the failure file")
    ap.add_argument("--save", default=None, help="directory for the failure file (default: the temp dir)")
    args = ap.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 32)
    print(f"slitter fuzz: {args.cases} cases, seed {args.seed}, check every {args.check_every}", flush=True)

    failure = None
    daemon = slitter.spawn_daemon(arena_size=args.arena_size)
    address = daemon.start()
    run = None
    t0 = time.monotonic()
    done = 0
    try:
        run = Run(args, address, daemon)
        before = run.victim.state()
        for done in range(1, args.cases + 1):
            run.case()
            if done % args.check_every == 0 or done == args.cases:
                before = run.checkpoint(before)
            if done % 10_000 == 0:
                rate = done / (time.monotonic() - t0)
                print(f"  {done:>9} cases  {rate:8.0f} cases/s", flush=True)
    except Failure as exc:
        failure = exc
    elapsed = time.monotonic() - t0

    print(f"\ncases:     {done} in {elapsed:.1f} s = {done / elapsed:.0f} cases/s "
          f"({run.messages if run else 0} messages)")
    if run is not None:
        print("kinds:     " + ", ".join(f"{k} {v}" for k, v in sorted(run.by_kind.items())))
        names = {f"code {int(c)}": f"{c.name}" for c in ErrorCode}
        print("replies:   " + ", ".join(f"{names.get(k, k)} {v}" for k, v in sorted(run.replies.items(),
                                                                                        key=lambda kv: -kv[1])))
        print(f"dropped:   {run.replies.get('drop', 0)} (over MAXMSGSIZE)")
        if run.audited:
            print("flushed:   " + ", ".join(f"{k} {v}" for k, v in sorted(run.audited.items())))
    if run is not None and run.problems:
        print(f"\nPROBLEMS ({sum(c for c, _ in run.problems.values())} replies broke the protocol's promise):")
        for key, (count, (message, kind, frames)) in sorted(run.problems.items(), key=lambda kv: -kv[1][0]):
            print(f"  {count:>7}  {key}\n           first ({kind}): {[f[:200] for f in frames]}\n"
                  f"           {message[:300]}")
    if failure is not None:
        last_kind, last_frames = run.recent[-1] if run and run.recent else ("-", [])
        print(f"\nFAILED after {done} cases: {failure}")
        print(f"last case ({last_kind}): {[f[:300] for f in last_frames]}")
        if run is not None and run.recent:
            print(f"the last {len(run.recent)} cases (msgpack list of [kind, frames]): {run.save()}")
    elif run is not None and run.problems:
        print("\nFAILED: the daemon lived and the victim is unchanged, but some replies broke the promise (above)")
    else:
        print("\nOK: every frame refused or dropped, the daemon alive, the victim unchanged")
    try:
        if run is not None:
            run.raw.close()
            if daemon.process.poll() is None:
                run.rack.heap.close()
                run.victim.heap.close()
    finally:
        code = daemon.stop()
        if failure is None and code not in (0, None):
            print(f"slitterd exited with {code}")
            return 1
    return 1 if failure is not None or (run is not None and run.problems) else 0


if __name__ == "__main__":
    sys.exit(main())
