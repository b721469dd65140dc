"""Hostile input: random bytes, random msgpack, near-valid requests, oversized
frames, other clients' ids, and a client's own rack filled with garbage.

The promise under test: every hostile frame gets an error reply (``ok`` False,
an integer ``ErrorCode`` other than INTERNAL, a string message without a
traceback) or is dropped (over MAXMSGSIZE: ZeroMQ closes the connection); the
daemon never dies; and a victim client -- classes registered, live objects of
known content, objects cached in both magazines of its rack -- sees no change:
its entry in ``stats``, its rack, its objects' bytes; and it can still
allocate and release.

Hypothesis makes the frames and sends them over a raw DEALER socket.  The
daemon is shared by all examples of a test, so an example's outcome can
depend on the ones before it: shrinking is off (it would replay examples
against a daemon that has moved on, or died), and each example ``note()``s
what it sent, so a failure shows the exact frames.  A schema refusal is
checked against ``protocol.parse_request`` run here on the same frame: the
daemon must refuse with the very code the shared schema gives.

``bench/fuzz.py`` does the same kind of fuzzing for 100k+ cases.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, Phase, example, given, note, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

import slitter
from slitter import protocol
from slitter._native import ffi, lib
from slitter.protocol import MAX_MESSAGE_BYTES, POLICIES, REQUEST_FIELDS, U32, U64, ErrorCode, Op

I64_MIN = -(1 << 63)
CODES = {int(c) for c in ErrorCode}
OPS = tuple(Op)
CRED_OPS = tuple(op for op in OPS if any(f.name == "client" for f in REQUEST_FIELDS[op]))
ALL_FIELD_NAMES = sorted({f.name for fields in REQUEST_FIELDS.values() for f in fields})
PROTOCOL_WORDS = ("v", "id", "op", *ALL_FIELD_NAMES, *(op.value for op in OPS))
MAG_CAP = lib.SLITTER_MAG_CAP
MAX_THREADS = lib.SLITTER_MAX_THREADS
SPAN = lib.SLITTER_SPAN_SIZE

#: (name, size, zero_init, policy): the victim sets every policy, which is set once per class.
VICTIM_CLASSES = (("victim.small", 48, False, "raise"), ("victim.zeroed", 200, True, "log"),
                  ("victim.page", 4096, False, "raise"))
#: Class figures any client legitimately moves (depot traffic, slow-path trips) or may set
#: (a non-zero ``cap`` in register_class replaces the class's cap: doc/protocol.md).
SHARED_FIGURES = ("carved", "cached", "free", "refills", "flushes", "runs", "reserved_bytes", "cap")

FUZZ = dict(deadline=None, database=None, phases=(Phase.explicit, Phase.generate),
            suppress_health_check=(HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                   HealthCheck.data_too_large, HealthCheck.filter_too_much))


# -- the raw attacker's socket --------------------------------------------


PING_ID = 0x5EA1  # the id of Raw.ping's requests


class Raw:
    """A bare DEALER socket to the daemon: frames out, decoded replies (or None) in."""

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

    def exchange(self, frames: list[bytes], timeout_ms: int = 5000):
        self.socket.send_multipart(frames)
        if not self.socket.poll(timeout_ms):
            return None
        # Replies are not bounded like requests: an error message may quote a hostile value.
        return msgpack.unpackb(self.socket.recv(), raw=False, strict_map_key=False)

    def ping(self) -> None:
        """A PING answered, skipping any late reply to an earlier request."""
        self.socket.send(protocol.pack(protocol.request(Op.PING, PING_ID)))
        while True:
            assert self.socket.poll(5000), "no reply to PING within 5 s: the daemon hangs or died"
            reply = msgpack.unpackb(self.socket.recv(), raw=False, strict_map_key=False)
            if reply.get("id") == PING_ID:
                assert reply["ok"] is True, reply
                return

    def ask(self, message: dict) -> dict:
        reply = self.exchange([protocol.pack(message)])
        assert reply is not None, f"no reply to {message}"
        return reply

    def close(self) -> None:
        self.socket.close(0)
        self.context.term()


def check_error_reply(reply: dict) -> None:
    """An error reply as the protocol defines it, and not a bug (INTERNAL) in disguise."""
    assert reply.get("ok") is False, reply
    assert type(reply.get("code")) is int and reply["code"] in CODES, reply
    assert reply["code"] != ErrorCode.INTERNAL, f"an unhandled exception in the daemon: {reply}"
    assert type(reply.get("error")) is str and "Traceback" not in reply["error"], reply


def log(text: str) -> None:
    """Hypothesis prints these for the failing example."""
    if currently_in_test_context():
        note(text)


def send(raw: Raw, frames: list[bytes]):
    """Send one hostile message; check the reply it must (or must not) get.

    Returns (request parsed by the shared schema or None, reply or None).
    """
    log(f"send {[f[:200] + (b'...' if len(f) > 200 else b'') for f in frames]}")
    if any(len(f) > MAX_MESSAGE_BYTES for f in frames):
        reply = raw.exchange(frames, timeout_ms=300)
        assert reply is None, f"a frame over MAXMSGSIZE was answered: {reply}"
        raw.reopen()  # ZeroMQ dropped the connection
        return None, None
    quiet = False  # REFILL and FLUSH with reply=False: success is not answered, errors are
    if len(frames) == 1:
        try:
            quiet = protocol.parse_request(frames[0]).args.get("reply") is False
        except protocol.Refusal:
            pass
    reply = raw.exchange(frames, timeout_ms=300 if quiet else 5000)
    if reply is None and quiet:
        log("  no reply (reply=False)")
        raw.ping()  # but the daemon is alive, and answers the next request
        return protocol.parse_request(frames[0]), None
    assert reply is not None, "no reply within 5 s: the daemon hangs or died"
    assert not quiet or reply.get("ok") is False, f"a success answered despite reply=False: {reply}"
    log(f"  reply {str(reply)[:500]}")
    assert isinstance(reply, dict) and reply.get("v") == protocol.PROTOCOL_VERSION, reply
    assert type(reply.get("id")) is int and type(reply.get("ok")) is bool, reply
    if len(frames) != 1:
        check_error_reply(reply)
        assert reply["code"] == ErrorCode.MALFORMED, reply
        return None, reply
    try:
        req = protocol.parse_request(frames[0])
    except protocol.Refusal as refusal:
        check_error_reply(reply)
        assert (reply["code"], reply["id"]) == (refusal.code, refusal.request_id), (refusal.message, reply)
        return None, reply
    assert reply["id"] == req.id, reply
    if not reply["ok"]:
        check_error_reply(reply)
    return req, reply


# -- the victim -----------------------------------------------------------


def content(handle: int, size: int) -> bytes:
    seed = hashlib.blake2b(handle.to_bytes(8, "little"), digest_size=32).digest()
    return (seed * (size // 32 + 1))[:size]


def tc_state(tc) -> tuple:
    n, m = min(tc.alloc_count, MAG_CAP), min(tc.release_count, MAG_CAP)
    c = tc.counters
    return (tc.alloc_count, tc.release_count, tc.capacity, c.allocations, c.releases, tuple(c.errors),
            tuple(ffi.unpack(tc.alloc, n)), tuple(ffi.unpack(tc.release, m)))


class Victim:
    """A client with classes, live objects of known content and objects cached in its rack."""

    def __init__(self, heap: slitter.Heap) -> None:
        self.heap = heap
        self.classes = [heap.register_class(n, s, zero_init=z, policy=p) for n, s, z, p in VICTIM_CLASSES]
        self.live: dict[int, tuple[slitter.Class, bytes]] = {}
        self.rack = ffi.cast("struct slitter_rack *", heap._rack.ptr)
        self.slot = {cls.id: lib.slitter_bind(heap._client, cls.id) for cls in self.classes}
        assert all(s >= 0 for s in self.slot.values())
        for cls in self.classes:
            # Two refills' worth; then the releases fill the allocation magazine (LIFO)
            # and overflow into the release magazine, so both hold cached objects.
            cap = self.tc(cls).capacity
            handles = [cls.allocate() for _ in range(cap + 40)]
            for h in handles[:24]:
                self.live[h] = (cls, content(h, cls.size))
                self.heap.view(h)[:] = self.live[h][1]
            for h in handles[24:]:
                cls.release(h)
            tc = self.tc(cls)
            assert tc.alloc_count == cap and 0 < tc.release_count < cap, (cls.name, tc_state(tc)[:3])

    def tc(self, cls):
        return self.rack.threads[self.slot[cls.id]].classes[cls.id]

    def cached(self) -> set[int]:
        """Handles cached in the victim's magazines right now."""
        out = set()
        for cls in self.classes:
            t = tc_state(self.tc(cls))
            out.update(t[6], t[7])
        return out

    def state(self, level: str) -> dict:
        """What must not change.

        "strict": the victim's stats entry and rack, and every figure of its classes;
        "shared": the same less the class figures other clients move by using the class;
        "own": the victim's stats entry and rack alone.
        """
        stats = self.heap.stats()
        me = [c for c in stats["clients"] if c["id"] == self.heap._client_id]
        classes = {}
        for name, *_ in VICTIM_CLASSES:
            figures = stats["classes"][name]
            if level == "shared":
                figures = {k: v for k, v in figures.items() if k not in SHARED_FIGURES}
            if level != "own":
                classes[name] = figures
        r = self.rack
        rack = (r.threads_claimed, r.threads_touched, r.pid, r.client_id,
                {cls.name: tc_state(self.tc(cls)) for cls in self.classes},
                {s: r.threads[s].classes_touched for s in set(self.slot.values())})
        return {"client": me, "classes": classes, "rack": rack}

    def check_objects(self) -> None:
        for h, (cls, data) in self.live.items():
            assert bytes(self.heap.view(h)) == data, f"victim object {h:#x} of '{cls.name}' changed"

    def exercise(self) -> None:
        """The victim still allocates, writes, reads and releases in every class."""
        for cls in self.classes:
            h = cls.allocate()
            view = self.heap.view(h)
            if cls.zero_init:
                assert not any(view), f"zero_init object {h:#x} handed out dirty"
            view[:] = content(h ^ 1, cls.size)
            assert bytes(self.heap.view(h)) == content(h ^ 1, cls.size)
            cls.release(h)


@pytest.fixture
def victim(heap):
    return Victim(heap)


@pytest.fixture
def raw(daemon):
    r = Raw(daemon.address)
    yield r
    r.close()


class Checker:
    """After every batch: the daemon lives and answers, and the victim is as it was."""

    def __init__(self, daemon, raw: Raw, victim: Victim, level: str) -> None:
        self.daemon, self.raw, self.victim, self.level = daemon, raw, victim, level
        self.before = victim.state(level)
        self.before_own = victim.state("own")
        self.batches = 0

    def __call__(self) -> None:
        assert self.daemon.process.poll() is None, f"slitterd died:\n{self.daemon.log_tail(40)}"
        ping = self.raw.ask(protocol.request(Op.PING, 424242))
        assert ping["ok"] is True and ping["id"] == 424242, ping
        assert self.victim.state(self.level) == self.before, "the victim's state changed"
        self.victim.check_objects()
        self.victim.exercise()
        self.before = self.victim.state(self.level)
        self.before_own = self.victim.state("own")
        self.batches += 1


# -- strategies -----------------------------------------------------------

SCALARS = (st.none() | st.booleans() | st.integers(I64_MIN, U64)
           | st.sampled_from([0, 1, -1, U32, U32 + 1, U64, I64_MIN, 1 << 31, 1 << 63])
           | st.floats() | st.text(max_size=24) | st.binary(max_size=24) | st.sampled_from(PROTOCOL_WORDS))
KEYS = st.sampled_from(PROTOCOL_WORDS) | st.text(max_size=8) | st.binary(max_size=4) | st.integers(-3, 3)
EXTS = (st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=16))
        | st.builds(msgpack.Timestamp, st.integers(0, 2**34 - 1), st.integers(0, 999_999_999)))
MSGPACK_VALUES = st.recursive(SCALARS | EXTS,
                              lambda kids: st.lists(kids, max_size=6) | st.dictionaries(KEYS, kids, max_size=6),
                              max_leaves=20)


def packed(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


@st.composite
def request_shaped(draw) -> bytes:
    """A map with the request keys and random values, often with a valid v/op."""
    msg = {"v": draw(st.just(1) | SCALARS), "id": draw(st.integers(0, U64) | SCALARS),
           "op": draw(st.sampled_from([op.value for op in OPS]) | SCALARS)}
    for key in draw(st.lists(st.sampled_from(ALL_FIELD_NAMES) | KEYS, max_size=6)):
        msg[key] = draw(MSGPACK_VALUES)
    return packed(msg)


def minimal_args(op: Op) -> dict:
    """The lowest value of every field of ``op``: valid by the schema."""
    return {f.name: f.low if f.kind is int else (False if f.kind is bool else "x" * f.low) for f in REQUEST_FIELDS[op]}


@st.composite
def mutated_bytes(draw) -> bytes:
    """A valid request's bytes, truncated, extended or with bytes flipped."""
    op = draw(st.sampled_from(OPS))
    frame = bytearray(packed(protocol.request(op, draw(st.integers(0, U64)), **minimal_args(op))))
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(("cut", "flip", "insert", "append")))
        at = draw(st.integers(0, len(frame)))
        if how == "cut":
            del frame[at:]
        elif how == "flip" and at < len(frame):
            frame[at] = draw(st.integers(0, 255))
        elif how == "insert":
            frame[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            frame += draw(st.binary(min_size=1, max_size=8))
    return bytes(frame)


HEADERS = st.sampled_from([b"", b"\x81", b"\x83", b"\xde\xff\xff", b"\xdf\xff\xff\xff\xff", b"\x91" * 200,
                           b"\xdd\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff", b"\xc7\xff\x01", b"\xc1"])
RANDOM_BYTES = st.builds(lambda h, b: h + b, HEADERS, st.binary(max_size=300)) | mutated_bytes()


def str_of_bytes(low: int, high: int):
    return st.text(max_size=high).filter(lambda s: low <= len(s.encode()) <= high)


def valid_value(op: Op, field: protocol.Field, *, small: bool):
    """A value the schema accepts (the handler may still refuse it)."""
    if field.kind is bool:
        return st.booleans()
    if field.kind is str:
        if field.name == "policy":
            return st.sampled_from(("", *POLICIES))
        if op is Op.REGISTER_CLASS and field.name == "name":
            return st.sampled_from([c[0] for c in VICTIM_CLASSES]) | str_of_bytes(field.low, field.high)
        return str_of_bytes(field.low, field.high)
    if field.name == "pid":
        return st.sampled_from([1, os.getpid(), 2**22, 2**31 - 1, 2**31, U32]) | st.integers(1, U32)
    if field.name == "size" and small:
        return st.sampled_from([1, 48, 200, 4096]) | st.integers(1, 1 << 16)
    if field.name == "thread":
        return st.integers(0, MAX_THREADS - 1) | st.integers(field.low, field.high)
    edges = [v for v in (field.low, field.low + 1, field.high - 1, field.high) if field.low <= v <= field.high]
    return (st.sampled_from(edges) | st.integers(field.low, min(field.high, field.low + 100))
            | st.integers(field.low, field.high))


WRONG_TYPES = (None, 1.5, "1", b"1", [], {}, [1], {"a": 1}, True, False, 0, 7, "")


@st.composite
def near_valid(draw, creds, *, small: bool = False, ops=OPS):
    """A request of a real op, its fields valid or nearly so: ``creds`` gives (client, token) labels."""
    op = draw(st.sampled_from(ops))
    fields = REQUEST_FIELDS[op]
    msg = {"v": protocol.PROTOCOL_VERSION, "id": draw(st.integers(0, U64)), "op": op.value}
    for f in fields:
        msg[f.name] = draw(valid_value(op, f, small=small))
    if "client" in msg:
        msg["client"], msg["token"] = draw(creds)
    for _ in range(draw(st.integers(0, 2))):
        how = draw(st.sampled_from(("type", "range", "length", "missing", "extra", "version", "op", "id",
                                    "bytes_key")))
        f = draw(st.sampled_from(fields)) if fields else None
        if how == "type" and f:
            msg[f.name] = draw(st.sampled_from([v for v in WRONG_TYPES if type(v) is not f.kind]))
        elif how == "range" and f and f.kind is int:
            outside = [v for v in (f.low - 1, f.high + 1, -1, I64_MIN, U32 + 1, U64, 1 << 63)
                       if not f.low <= v <= f.high and I64_MIN <= v <= U64]
            msg[f.name] = draw(st.sampled_from(outside))
        elif how == "length" and f and f.kind is str:
            wrong = ["x" * (f.high + 1), "\u00e9" * (f.high // 2 + 1), "\U0001f600" * (f.high // 4 + 1)]
            msg[f.name] = draw(st.sampled_from(wrong + ([""] if f.low else [])))
        elif how == "missing":
            msg.pop(draw(st.sampled_from(sorted(msg, key=repr))), None)
        elif how == "extra":
            msg[draw(st.sampled_from(ALL_FIELD_NAMES) | st.text(max_size=6))] = draw(SCALARS)
        elif how == "version":
            msg["v"] = draw(st.sampled_from([0, 2, -1, "1", None, 1.5, [1], U64, b"\x01"]))
        elif how == "op":
            msg["op"] = draw(st.sampled_from(["", "PING", "ping ", "attach\x00", 1, None, ["ping"], "x" * 300,
                                              op.value.upper(), b"ping"]))
        elif how == "id":
            msg["id"] = draw(st.sampled_from([-1, "1", 1.5, None, True, [1], I64_MIN]))
        elif how == "bytes_key" and msg:
            key = draw(st.sampled_from(sorted(k for k in msg if isinstance(k, str)) or ["op"]))
            if key in msg:
                msg[key.encode()] = msg.pop(key)
    return msg


class Cred:
    """A (client, token) placeholder resolved when the message is sent."""

    def __init__(self, who: str, delta: int = 0) -> None:
        self.who, self.delta = who, delta

    def __repr__(self) -> str:
        return f"Cred({self.who!r}, {self.delta:#x})"


def victim_creds():
    """The victim's id with a wrong token, and ids and tokens nobody has."""
    delta = st.integers(1, U64) | st.sampled_from([1, 1 << 63, U64])
    return (st.builds(lambda d: (Cred("victim_id"), Cred("victim_token", d)), delta)
            | st.builds(lambda d: (Cred("victim_id"), Cred("victim_token_plus", d)), st.integers(1, 3))
            | st.tuples(st.just(Cred("victim_id")), st.sampled_from([0, U64]))
            | st.tuples(st.integers(1, U32), st.integers(0, U64))
            | st.tuples(st.just(Cred("victim_id_plus", 1)), st.just(Cred("victim_token", 0))))


def resolve(msg: dict, env: dict) -> dict:
    out = {}
    for k, v in msg.items():
        if isinstance(v, Cred):
            if v.who == "victim_token":
                v = env["victim_token"] ^ v.delta
            elif v.who == "victim_token_plus":
                v = (env["victim_token"] + v.delta) % (1 << 64)
            elif v.who == "victim_id_plus":
                v = env["victim_id"] + v.delta
            else:
                v = env[v.who]
        out[k] = v
    return out


def env_of(victim: Victim) -> dict:
    return {"victim_id": victim.heap._client_id, "victim_token": victim.heap._token}


def run_batch(raw: Raw, frames_list, env=None, on_ok=None) -> None:
    for item in frames_list:
        if isinstance(item, dict):
            env = env or {}
            msg = resolve(item, env)
            if (msg.get("client"), msg.get("token")) == (env.get("victim_id"), env.get("victim_token")):
                continue  # a Cred label landed on the real token: not hostile
            item = [packed(msg)]
        elif isinstance(item, bytes):
            item = [item]
        req, reply = send(raw, item)
        if req is not None and (reply is None or reply["ok"]) and on_ok is not None:
            on_ok(req, reply)


def detach_new_clients(raw: Raw):
    """A valid attach (a live pid) made a client: detach it, so the racks are not used up."""

    def on_ok(req, reply):
        if req.op is Op.ATTACH:
            gone = raw.ask(protocol.request(Op.DETACH, 1, client=reply["client"], token=reply["token"]))
            assert gone["ok"] is True, gone

    return on_ok


# -- tests: hostile frames ------------------------------------------------


def test_random_bytes(daemon, raw, victim):
    check = Checker(daemon, raw, victim, level="strict")

    @settings(max_examples=250, **FUZZ)
    @given(st.lists(RANDOM_BYTES, min_size=1, max_size=8))
    def fuzz(frames):
        run_batch(raw, frames)
        check()

    fuzz()
    assert check.batches > 0


def test_random_msgpack(daemon, raw, victim):
    check = Checker(daemon, raw, victim, level="strict")

    @settings(max_examples=200, **FUZZ)
    @given(st.lists(st.builds(packed, MSGPACK_VALUES) | request_shaped(), min_size=1, max_size=8))
    def fuzz(frames):
        run_batch(raw, frames)
        check()

    fuzz()


def test_near_valid_requests_and_the_victims_id_with_wrong_tokens(daemon, raw, victim):
    check = Checker(daemon, raw, victim, level="strict")
    env = env_of(victim)
    on_ok = detach_new_clients(raw)

    @settings(max_examples=300, **FUZZ)
    @given(st.lists(near_valid(victim_creds()) | near_valid(victim_creds(), ops=CRED_OPS), min_size=1, max_size=8))
    @example([{"v": 1, "id": 1, "op": "attach", "pid": pid, "name": ""} for pid in (1 << 31, U32, 0, -1)])
    def fuzz(messages):
        run_batch(raw, messages, env, on_ok)
        check()

    fuzz()


def test_every_op_naming_the_victim_with_a_wrong_token_is_refused(daemon, raw, victim):
    """Exhaustive over ops and token errors, with otherwise valid fields."""
    check = Checker(daemon, raw, victim, level="strict")
    vid, token = victim.heap._client_id, victim.heap._token
    cls = victim.classes[0]
    valid = {"thread": victim.slot[cls.id], "class_id": cls.id, "name": cls.name, "size": cls.size,
             "zero_init": cls.zero_init, "policy": "abort", "cap": 1, "handle": next(iter(victim.live)), "kind": 3}
    for op in CRED_OPS:
        for wrong in (token ^ 1, token ^ (1 << 63), (token + 1) % (1 << 64), 0, U64, ~token & U64):
            if wrong == token:
                continue
            args = minimal_args(op)
            args.update({k: v for k, v in valid.items() if k in args})
            del args["client"], args["token"]
            reply = raw.ask(protocol.request(op, 9, client=vid, token=wrong, **args))
            check_error_reply(reply)
            assert reply["code"] == ErrorCode.UNKNOWN_CLIENT, (op, reply)
        check()


def test_attacker_with_its_own_credentials_cannot_reach_the_victim(daemon, raw, victim):
    """A second client (attached by a raw message) names slots, classes and fields out of range."""
    check = Checker(daemon, raw, victim, level="shared")
    env = env_of(victim)

    def attach():
        reply = raw.ask(protocol.request(Op.ATTACH, 1, pid=os.getpid(), name="attacker"))
        assert reply["ok"] is True, reply
        env["attacker_id"], env["attacker_token"] = reply["client"], reply["token"]

    attach()

    def on_ok(req, reply):
        if req.op is Op.DETACH and req.args["client"] == env["attacker_id"]:
            attach()  # it detached itself: come back for more

    mine = st.just((Cred("attacker_id"), Cred("attacker_token")))
    victim_ids = st.sampled_from([c.id for c in victim.classes])

    @st.composite
    def slot_request(draw):
        op = draw(st.sampled_from((Op.REFILL, Op.FLUSH)))
        thread = draw(st.integers(MAX_THREADS, 63) | st.integers(0, MAX_THREADS - 1))
        class_id = draw(victim_ids | st.integers(1, 63))
        return {"v": 1, "id": draw(st.integers(0, U64)), "op": op.value, "client": Cred("attacker_id"),
                "token": Cred("attacker_token"), "thread": thread, "class_id": class_id}

    @settings(max_examples=300, **FUZZ)
    @given(st.lists(near_valid(mine, small=True, ops=CRED_OPS) | slot_request()
                    | near_valid(victim_creds(), small=True, ops=CRED_OPS), min_size=1, max_size=8))
    def fuzz(messages):
        run_batch(raw, messages, env, on_ok)
        check()

    fuzz()
    raw.ask(protocol.request(Op.DETACH, 2, client=env["attacker_id"], token=env["attacker_token"]))
    check()


def test_oversized_empty_and_multipart_frames(daemon, raw, victim):
    check = Checker(daemon, raw, victim, level="strict")
    big_request = packed({"v": 1, "id": 5, "op": "attach", "pid": os.getpid(), "name": "x" * (MAX_MESSAGE_BYTES + 1)})
    fill = MAX_MESSAGE_BYTES - len(packed({"v": 1, "id": 5, "op": "ping", "pad": ""})) - 2
    exactly_max = packed({"v": 1, "id": 5, "op": "ping", "pad": "y" * fill})
    exactly_max += b"\xc0" * (MAX_MESSAGE_BYTES - len(exactly_max))  # trailing nils: extra data
    assert len(exactly_max) == MAX_MESSAGE_BYTES
    cases = [
        [b""], [b"", b""], [b"\xc0"], [packed(protocol.request(Op.PING, 1)), b"x"],
        [packed(protocol.request(Op.PING, 1))] * 3, [b""] * 50,
        [exactly_max], [exactly_max[: MAX_MESSAGE_BYTES - 1]],
        [os.urandom(MAX_MESSAGE_BYTES)], [os.urandom(MAX_MESSAGE_BYTES + 1)],
        [big_request], [b"\x00" * (4 * MAX_MESSAGE_BYTES)], [b"ok", os.urandom(MAX_MESSAGE_BYTES + 1)],
        [packed({"v": 1, "id": 5, "op": "attach", "pid": os.getpid(), "name": "\u00e9" * 40})],
    ]
    for frames in cases:
        send(raw, frames)
        check()


# -- tests: a client writing garbage into its own rack --------------------


@dataclass
class Attacker:
    heap: slitter.Heap
    rack: object
    slot: int
    classes: list
    pool: list  # handles worth flushing: every kind of wrong but the victim's cached objects


def make_attacker(daemon, victim: Victim, timeout: float = 10.0) -> Attacker:
    heap = slitter.connect(daemon.address, name="attacker", timeout=timeout)
    own = [heap.register_class("attacker.a", 64), heap.register_class("attacker.b", 1024, zero_init=True)]
    shared = [heap.register_class(n, s, zero_init=z) for n, s, z, _ in VICTIM_CLASSES]
    classes = own + shared
    live, released = [], []
    for cls in classes:
        hs = [cls.allocate() for _ in range(20)]
        live += hs[:10]
        for h in hs[10:]:
            cls.release(h)
            released.append(h)
    slot = lib.slitter_bind(heap._client, classes[0].id)
    own_cached = []
    rack = ffi.cast("struct slitter_rack *", heap._rack.ptr)
    for cls in classes:
        assert lib.slitter_bind(heap._client, cls.id) == slot
        tc = rack.threads[slot].classes[cls.id]
        own_cached += ffi.unpack(tc.alloc, min(tc.alloc_count, 64))
    header = ffi.cast("struct slitter_header *", heap._tables.ptr)
    runs = ffi.cast("struct slitter_run *", heap._tables.ptr + header.run_table_off)
    table = ffi.cast("struct slitter_class *", heap._tables.ptr + header.class_table_off)
    edges = []
    for i in range(header.nruns):
        run = runs[i]
        base, stride = run.first_span * SPAN, table[run.class_id].stride
        edges += [base, base + stride, base + 8, base + run.nobjects * stride, base + run.nspans * SPAN - 16,
                  base + run.nspans * SPAN]
    vlive = list(victim.live)
    pool = (vlive + [h + 16 for h in vlive] + [h + 1 for h in vlive] + live + released + own_cached + edges
            + [0, 1, 16, SPAN, U64, 1 << 48, (1 << 48) | vlive[0], header.arena_size, header.arena_size - 64,
               header.next_span * SPAN, 1 << 63])
    return Attacker(heap, rack, slot, classes, pool)


@pytest.fixture
def attacker(daemon, victim):
    a = make_attacker(daemon, victim, timeout=3)
    yield a
    a.heap.close()


U32S = st.sampled_from([0, 1, 7, 8, MAG_CAP - 1, MAG_CAP, MAG_CAP + 1, 1 << 31, U32]) | st.integers(0, U32)
U64S = st.sampled_from([0, 1, U64, 1 << 63, (1 << MAX_THREADS) - 1]) | st.integers(0, U64)


def test_garbage_in_its_own_rack_cannot_crash_the_daemon_or_touch_the_victim(daemon, raw, victim, attacker):
    """Counts over capacity, garbage handles and masks, then refill and flush of any slot.

    Handles cached in the victim's magazines are left out here: flushing them is
    test_flush_cannot_take_objects_cached_in_another_clients_rack.  Counters are
    left alone: test_garbage_counters_in_its_own_rack_*.
    """
    check = Checker(daemon, raw, victim, level="own")  # the attacker's refused handles count in the class figures
    a = attacker
    env = {"attacker_id": a.heap._client_id, "attacker_token": a.heap._token}
    class_ids = [c.id for c in a.classes]
    r = a.rack
    saved = (r.threads_claimed, r.threads_touched, r.pid, r.client_id)

    @st.composite
    def poke(draw):
        cached = victim.cached()
        pool = st.sampled_from([h for h in a.pool if h not in cached])
        handles = st.one_of(pool, pool, pool, st.integers(0, U64))
        thread = st.just(a.slot) | st.integers(0, MAX_THREADS - 1)
        class_id = st.sampled_from(class_ids) | st.integers(0, 63)
        pokes = []
        for _ in range(draw(st.integers(1, 3))):
            pokes.append((draw(thread), draw(class_id), draw(U32S), draw(U32S), draw(U32S | st.just(None)),
                          draw(st.lists(handles, max_size=24)), draw(st.lists(handles, max_size=24))))
        masks = draw(st.none() | st.tuples(U64S, U64S, U64S))
        header = draw(st.none() | st.tuples(st.integers(0, U32), st.integers(0, U32), st.integers(0, U64)))
        ops = st.lists(st.sampled_from((Op.REFILL, Op.FLUSH)), min_size=1, max_size=3)
        calls = [(op, t, c) for t, c, *_ in pokes if c for op in draw(ops)]
        calls += draw(st.lists(st.tuples(st.sampled_from((Op.REFILL, Op.FLUSH)),
                                         thread | st.integers(MAX_THREADS, 63), class_id.filter(bool)),
                               min_size=0 if calls else 1, max_size=3))
        return pokes, masks, header, draw(st.permutations(calls))

    @settings(max_examples=200, **FUZZ)
    @given(poke())
    def fuzz(example):
        pokes, masks, header, calls = example
        touched = []
        for thread, class_id, alloc_count, release_count, capacity, alloc, release in pokes:
            tc = r.threads[thread].classes[class_id]
            touched.append((tc, tc.capacity))
            fill(tc.alloc, alloc, alloc_count)
            fill(tc.release, release, release_count)
            tc.alloc_count, tc.release_count = alloc_count, release_count
            if capacity is not None:
                tc.capacity = capacity
        slot_masks = {t: r.threads[t].classes_touched for t in range(MAX_THREADS)}
        if masks:
            r.threads_claimed, r.threads_touched, r.threads[a.slot].classes_touched = masks
        if header:
            r.pid, r.client_id = header[:2]
        try:
            run_batch(raw, [{"v": 1, "id": 77, "op": op.value, "client": Cred("attacker_id"),
                             "token": Cred("attacker_token"), "thread": t, "class_id": c} for op, t, c in calls], env)
            check()
        finally:
            # Leave the rack sane for the next example (what was refilled into it is lost to the attacker).
            for tc, capacity in touched:
                tc.alloc_count = tc.release_count = 0
                tc.capacity = capacity
            for op, t, c in calls:
                if t < MAX_THREADS:
                    r.threads[t].classes[c].alloc_count = 0
            r.threads_claimed, r.threads_touched, r.pid, r.client_id = saved
            for t, mask in slot_masks.items():
                r.threads[t].classes_touched = mask

    fuzz()
    # Last, garbage in every magazine the attacker has, and detach: the daemon audits it all.
    cached = victim.cached()
    pool = [h for h in a.pool if h not in cached] + [0, U64]
    for cls in a.classes:
        tc = r.threads[a.slot].classes[cls.id]
        fill(tc.alloc, pool[::2], U32)
        fill(tc.release, pool[1::2], U32)
        tc.alloc_count = tc.release_count = U32
    r.threads_touched, r.threads[a.slot].classes_touched = U64, U64
    a.heap.close()
    check()


def fill(magazine, handles: list[int], count: int) -> None:
    """Write ``handles`` over and over into the first ``count`` entries (at most a magazine's)."""
    if handles:
        for i in range(min(count, MAG_CAP)):
            magazine[i] = handles[i % len(handles)]


def _attacker_counter(attacker: Attacker, field: str, value: int) -> int:
    """Set one fast-path counter of the attacker's own rack (class victim.small, bound); returns the old value."""
    counters = attacker.rack.threads[attacker.slot].classes[attacker.classes[2].id].counters
    if field == "errors":
        old, counters.errors[0] = counters.errors[0], value
    else:
        old = getattr(counters, field)
        setattr(counters, field, value)
    return old


@pytest.mark.parametrize("field,value", [("allocations", U64), ("releases", U64), ("errors", U64),
                                         ("releases", 1 << 63)])
def test_garbage_counters_in_its_own_rack_do_not_kill_the_daemon(daemon, raw, victim, attacker, field, value):
    """Counters are client-written: summing them for stats (and metrics) must not break the reply."""
    check = Checker(daemon, raw, victim, level="shared")
    old = _attacker_counter(attacker, field, value)
    try:
        for message in (protocol.request(Op.STATS, 1), protocol.request(Op.AUDIT, 2, since=0, limit=10)):
            raw.socket.send(packed(message))
            deadline = time.monotonic() + 5
            while not raw.socket.poll(50) and daemon.process.poll() is None and time.monotonic() < deadline:
                pass
            assert daemon.process.poll() is None, f"slitterd died on '{message['op']}':\n{daemon.log_tail(12)}"
            reply = msgpack.unpackb(raw.socket.recv(), raw=False) if raw.socket.poll(0) else None
            assert reply is not None and reply["id"] == message["id"], reply
            if not reply["ok"]:
                check_error_reply(reply)
            assert victim.state("own") == check.before_own
    finally:
        _attacker_counter(attacker, field, old)
    check()


def test_garbage_counters_of_a_dying_client_do_not_kill_the_daemon(daemon, raw, victim):
    """The daemon retires a dead client's counters into the segment's u64 totals."""
    check = Checker(daemon, raw, victim, level="own")
    with slitter.connect(daemon.address) as leaver:  # retired totals > 0 before the garbage comes
        leaver.register_class(VICTIM_CLASSES[0][0], VICTIM_CLASSES[0][1]).allocate()
    code = textwrap.dedent(f"""
        import os, slitter
        from slitter._native import ffi, lib
        heap = slitter.connect({daemon.address!r}, name="dying")
        cls = heap.register_class({VICTIM_CLASSES[0][0]!r}, {VICTIM_CLASSES[0][1]})
        cls.release(cls.allocate())
        slot = lib.slitter_bind(heap._client, cls.id)
        c = ffi.cast("struct slitter_rack *", heap._rack.ptr).threads[slot].classes[cls.id].counters
        c.allocations = c.releases = c.errors[3] = {U64}
        os._exit(0)  # dies attached: the daemon reclaims the rack through its pidfd
        """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd="/")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and daemon.process.poll() is None:
        reply = raw.exchange([packed(protocol.request(Op.STATS, 3))], timeout_ms=2000)
        if reply is not None and reply.get("ok") and not any(c["name"] == "dying" for c in reply["clients"]):
            break
        time.sleep(0.05)
    assert daemon.process.poll() is None, f"slitterd died reclaiming the rack:\n{daemon.log_tail(12)}"
    check()


@pytest.mark.parametrize("garbage", ["releases > allocations", "pid beyond pid_t", "the victim's client id"])
def test_garbage_in_its_own_rack_does_not_stop_the_daemon_from_restarting(manual_daemon, garbage):
    """A named instance restarts over its segments and adopts the racks of its live clients.

    Everything the new daemon reads from a rack (counters, pid, client id and token)
    was written by an untrusted client.
    """
    d = manual_daemon().start()
    heap = slitter.connect(d.address, name="victim", timeout=3)
    v = Victim(heap)
    a = make_attacker(d, v, timeout=3)
    try:
        if garbage == "releases > allocations":
            _attacker_counter(a, "releases", 1000)
        elif garbage == "pid beyond pid_t":
            a.rack.pid = U32
        else:
            a.rack.client_id = heap._client_id
        d.kill(signal.SIGTERM)
        d.start()  # fails if the new daemon exits
        v.check_objects()
        v.exercise()
        mine = [c for c in heap.stats()["clients"] if c["name"] == "victim" or c["id"] == heap._client_id]
        assert mine and all(c["id"] == heap._client_id for c in mine), mine
        v.heap.register_class(*VICTIM_CLASSES[0][:2])  # its id and token still work
    finally:
        a.heap.close()
        heap.close()


def test_flush_cannot_take_objects_cached_in_another_clients_rack(daemon, raw, victim, attacker):
    """Cached objects are neither live nor in the depot; the audit must still refuse another rack's.

    The attacker reads every carved handle from the run table it maps; here it
    flushes the ones cached in the victim's magazines, then allocates a lot.
    """
    cls = victim.classes[0]
    tc = victim.tc(cls)
    # The bottom of the allocation magazine (handed out last) and some of the release magazine.
    stolen = list(ffi.unpack(tc.alloc, 48)) + list(ffi.unpack(tc.release, 16))
    before = victim.state("own")
    free_before = victim.heap.stats()["classes"][cls.name]["free"]
    mine = attacker.rack.threads[attacker.slot].classes[cls.id]
    for i, h in enumerate(stolen):
        mine.release[i] = h
    mine.release_count = len(stolen)
    reply = raw.ask(protocol.request(Op.FLUSH, 1, client=attacker.heap._client_id, token=attacker.heap._token,
                                     thread=attacker.slot, class_id=cls.id))
    assert daemon.process.poll() is None
    assert reply["ok"] is False or reply["accepted"] == 0, (
        f"the daemon took {reply['accepted']} objects cached in the victim's rack into its depot")
    stats = victim.heap.stats()["classes"][cls.name]
    assert stats["free"] == free_before and stats["carved"] == stats["live"] + stats["cached"] + stats["free"]
    assert victim.state("own") == before
    shared = attacker.classes[2]
    assert shared.id == cls.id
    taken = {shared.allocate() for _ in range(3 * MAG_CAP)}
    assert not taken & set(stolen), "the attacker was handed objects cached in the victim's rack"
    for _ in range(min(tc.alloc_count, MAG_CAP) + min(tc.release_count, MAG_CAP)):
        cls.allocate()
    assert tc.counters.errors[lib.SLITTER_ERR_CORRUPT] == 0, "the victim's magazines held objects live elsewhere"


def test_refill_of_a_slot_the_client_never_bound_is_accounted_and_reclaimed(daemon, raw, victim):
    """Whatever a refill puts in a rack, stats count it as cached and detach gives it back."""
    cls = victim.classes[0]
    reply = raw.ask(protocol.request(Op.ATTACH, 1, pid=os.getpid(), name="unbound"))
    creds = {"client": reply["client"], "token": reply["token"]}

    def balanced():
        s = victim.heap.stats()["classes"][cls.name]
        return s["carved"] == s["live"] + s["cached"] + s["free"], s

    assert balanced()[0]
    for thread in (0, 5, MAX_THREADS - 1):
        reply = raw.ask(protocol.request(Op.REFILL, 2, thread=thread, class_id=cls.id, **creds))
        assert reply["ok"] or reply["code"] != ErrorCode.INTERNAL, reply
        ok, figures = balanced()
        assert ok, f"refill of unbound thread slot {thread} put objects nowhere stats can see: {figures}"
    raw.ask(protocol.request(Op.DETACH, 3, **creds))
    ok, figures = balanced()
    assert ok, f"objects refilled into unbound slots were not reclaimed at detach: {figures}"


def test_attach_with_a_pid_beyond_pid_t_is_an_invalid_field(raw):
    for pid in (1 << 31, U32):
        reply = raw.ask(protocol.request(Op.ATTACH, 1, pid=pid, name=""))
        check_error_reply(reply)
        assert reply["code"] == ErrorCode.INVALID_FIELD, reply


def test_class_names_are_what_the_class_table_says(raw, victim):
    """A name the class table cannot hold as given (a NUL inside) must be refused, not truncated."""
    reply = raw.ask(protocol.request(Op.ATTACH, 1, pid=os.getpid(), name="namer"))
    creds = {"client": reply["client"], "token": reply["token"]}
    for name in (VICTIM_CLASSES[0][0] + "\x00evil", "\x00"):
        reply = raw.ask(protocol.request(Op.REGISTER_CLASS, 2, name=name, size=128, zero_init=True, policy="",
                                         cap=0, **creds))
        if reply["ok"]:
            assert victim.heap._class_name(reply["class_id"]) == name, (
                f"class {reply['class_id']} registered as {name!r} is {victim.heap._class_name(reply['class_id'])!r} "
                "in the class table")
        else:
            check_error_reply(reply)
            assert reply["code"] == ErrorCode.INVALID_FIELD, reply


def _refusal(raw: Raw, message: dict) -> dict:
    reply = raw.ask(message)
    check_error_reply(reply)
    return reply


@pytest.mark.parametrize("op,field", [(op, f.name) for op, fields in REQUEST_FIELDS.items() for f in fields
                                      if f.default is None])
def test_a_request_without_a_required_field_is_refused_naming_it(raw, op, field):
    """Spelled out here, not asked of protocol.parse_request: a schema that let a field go missing would pass
    every test that compares the daemon's reply with the schema's."""
    args = minimal_args(op)
    del args[field]
    reply = _refusal(raw, protocol.request(op, 7, **args))
    assert (reply["code"], reply["id"]) == (ErrorCode.INVALID_FIELD, 7), reply
    assert f"missing field '{field}'" in reply["error"], reply


@pytest.mark.parametrize("op,field", [(op, f.name) for op, fields in REQUEST_FIELDS.items() for f in fields
                                      if f.kind is int])
def test_a_bool_where_an_int_goes_is_refused(raw, op, field):
    """msgpack's true is a Python bool, and bool is a subclass of int: the schema must tell them apart."""
    reply = _refusal(raw, protocol.request(op, 8, **{**minimal_args(op), field: True}))
    assert reply["code"] == ErrorCode.INVALID_FIELD and f"field '{field}' must be int" in reply["error"], reply


@pytest.mark.parametrize("op,field", [(op, f) for op, fields in REQUEST_FIELDS.items() for f in fields
                                      if f.kind is int], ids=lambda x: getattr(x, "name", x))
def test_an_int_field_just_past_either_end_of_its_range_is_refused_naming_it(raw, op, field):
    """Spelled out against the table, not asked of protocol.parse_request (whose per-op checks are compiled
    from that table): both ends are accepted by the schema, one past either end is refused by the daemon."""
    for edge in (field.low, field.high):
        assert protocol.parse_request(packed(protocol.request(op, 9, **{**minimal_args(op), field.name: edge}))) \
            .args[field.name] == edge
    for past in (field.low - 1, field.high + 1):
        if past < 0 or past > U64:  # msgpack carries no int beyond [-2**63, 2**64): another test's frames
            continue
        reply = _refusal(raw, protocol.request(op, 9, **{**minimal_args(op), field.name: past}))
        assert (reply["code"], reply["id"]) == (ErrorCode.INVALID_FIELD, 9), reply
        assert f"field '{field.name}' = {past} is outside [{field.low}, {field.high}]" in reply["error"], reply


@pytest.mark.parametrize("op,field", [(op, f) for op, fields in REQUEST_FIELDS.items() for f in fields
                                      if f.kind is not int], ids=lambda x: getattr(x, "name", x))
def test_a_bool_or_str_field_of_another_type_is_refused_and_an_optional_one_takes_its_default(raw, op, field):
    wrong = 1 if field.kind is bool else b"x"
    reply = _refusal(raw, protocol.request(op, 10, **{**minimal_args(op), field.name: wrong}))
    assert reply["code"] == ErrorCode.INVALID_FIELD, reply
    assert f"field '{field.name}' must be {field.kind.__name__}" in reply["error"], reply
    if field.default is not None:
        args = {k: v for k, v in minimal_args(op).items() if k != field.name}
        assert protocol.parse_request(packed(protocol.request(op, 10, **args))).args[field.name] is field.default


def test_a_class_name_is_limited_in_bytes_not_characters(raw):
    reply = raw.ask(protocol.request(Op.ATTACH, 1, pid=os.getpid(), name="namer"))
    creds = {"client": reply["client"], "token": reply["token"]}
    fits = "é" * (protocol.MAX_CLASS_NAME // 2)  # two bytes each in UTF-8
    too_long = fits + "é"  # fewer characters than MAX_CLASS_NAME, more bytes
    assert len(too_long) <= protocol.MAX_CLASS_NAME < len(too_long.encode())
    reply = _refusal(raw, protocol.request(Op.REGISTER_CLASS, 2, name=too_long, size=64, zero_init=False,
                                           policy="", cap=0, **creds))
    assert reply["code"] == ErrorCode.INVALID_FIELD and "'name'" in reply["error"], reply
    reply = raw.ask(protocol.request(Op.REGISTER_CLASS, 3, name=fits, size=64, zero_init=False, policy="",
                                     cap=0, **creds))
    assert reply["ok"] is True, reply


def test_reports_without_a_request_id_are_each_recorded(raw, victim):
    """A resent REPORT (the same nonzero id) is recorded once; id 0 says "no id", so two of those are two."""
    heap = victim.heap
    cls = heap.register_class("reported", size=64)
    creds = {"client": heap._client_id, "token": heap._token}
    report = {"class_id": cls.id, "handle": 0xdead0, "kind": 3, **creds}
    seqs = [raw.ask(protocol.request(Op.REPORT, 0, **report))["seq"] for _ in range(2)]
    assert seqs[1] == seqs[0] + 1, seqs
    resent = [raw.ask(protocol.request(Op.REPORT, 99, **report))["seq"] for _ in range(2)]
    assert resent[0] == seqs[1] + 1 and resent[1] == resent[0], resent
    entries = [e for e in heap.audit()["entries"] if e[4] == 0xdead0]
    assert len(entries) == 3, entries
