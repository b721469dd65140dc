"""The wire protocol between clients and slitterd, declared once.

Both sides import this module: the client to build requests and turn error
replies into exceptions, the daemon to validate every request before it
dispatches it.  ``doc/protocol.md`` documents it; a test checks that every op
and error code here appears there.

Framing: one ZeroMQ frame per message (DEALER on the client, ROUTER on the
daemon), a msgpack map.  Every request carries ``v`` (PROTOCOL_VERSION),
``id`` (echoed in the reply) and ``op``; every reply carries ``v``, ``id``
and ``ok``.  A refusal is ``{"ok": False, "code": ErrorCode, "error": str}``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import msgpack

from slitter import errors

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024
#: A flush reply lists at most this many refused handles (``refused``) and counts them all
#: (``refused_total``): two magazines of garbage would make a reply no client could decode.
MAX_REFUSED_LISTED = 256
MAX_CLASS_NAME = 47  # bytes of UTF-8; the class table keeps a NUL after it
#: Why a name with a NUL or control character is refused (the class table is C strings).
CLASS_NAME_PRINTABLE = "a class name must be printable (no NUL or control characters)"
MAX_OBJECT_SIZE = 64 << 20
U32 = (1 << 32) - 1
PID_MAX = 1 << 22  # Linux's PID_MAX_LIMIT
U64 = (1 << 64) - 1


class Op(str, enum.Enum):
    """Request names.  Each op's fields are in REQUEST_FIELDS."""

    PING = "ping"
    ATTACH = "attach"
    DETACH = "detach"
    ABANDON = "abandon"
    REGISTER_CLASS = "register_class"
    REFILL = "refill"
    FLUSH = "flush"
    STATS = "stats"
    REPORT = "report"
    AUDIT = "audit"


class ErrorCode(enum.IntEnum):
    """Why a request was refused.  20 + k is fast-path error kind k (layout.h)."""

    MALFORMED = 1
    UNSUPPORTED_VERSION = 2
    UNKNOWN_OP = 3
    INVALID_FIELD = 4
    UNKNOWN_CLIENT = 5
    UNKNOWN_CLASS = 6
    CLASS_CONFLICT = 7
    OUT_OF_MEMORY = 8
    LIMIT_EXCEEDED = 9
    INTERNAL = 10
    CLASS_MISMATCH = 20
    INTERIOR_POINTER = 21
    FOREIGN_ADDRESS = 22
    DOUBLE_FREE = 23
    CORRUPT = 24


#: The exception a refusal becomes in the client.
ERROR_EXCEPTIONS: dict[ErrorCode, type[errors.SlitterError]] = {
    ErrorCode.MALFORMED: errors.ProtocolError,
    ErrorCode.UNSUPPORTED_VERSION: errors.ProtocolError,
    ErrorCode.UNKNOWN_OP: errors.ProtocolError,
    ErrorCode.INVALID_FIELD: errors.ProtocolError,
    ErrorCode.UNKNOWN_CLIENT: errors.ProtocolError,
    ErrorCode.UNKNOWN_CLASS: errors.ProtocolError,
    ErrorCode.CLASS_CONFLICT: errors.ClassConflict,
    ErrorCode.OUT_OF_MEMORY: errors.OutOfMemory,
    ErrorCode.LIMIT_EXCEEDED: errors.LimitExceeded,
    ErrorCode.INTERNAL: errors.SlitterError,
    ErrorCode.CLASS_MISMATCH: errors.ClassMismatch,
    ErrorCode.INTERIOR_POINTER: errors.InteriorPointer,
    ErrorCode.FOREIGN_ADDRESS: errors.ForeignAddress,
    ErrorCode.DOUBLE_FREE: errors.DoubleFree,
    ErrorCode.CORRUPT: errors.ReleaseError,
}

#: Error kinds as the fast path counts them (index k = ErrorCode 20 + k).
ERROR_KINDS = ("class_mismatch", "interior_pointer", "foreign_address", "double_free", "corrupt")

#: What a client does when a release is refused: raise the named exception,
#: log it and carry on, or abort the process (SIGABRT) after reporting it.
POLICIES = ("raise", "log", "abort")


@dataclass(frozen=True)
class Field:
    """One request field: its type and the range (ints) or length (str) it must have."""

    name: str
    kind: type
    low: int = 0
    high: int = U64
    doc: str = ""
    #: Optional fields take this value when absent; None: the field is required.
    default: Any = None


_CLIENT = (Field("client", int, 1, U32, "client id from attach"),
           Field("token", int, 0, U64, "secret from attach; proves the sender is that client"))
_SLOT = (Field("thread", int, 0, 63, "thread slot in the client's rack"),
         Field("class_id", int, 1, 63, "class id from register_class"))
#: Optional behaviour a daemon announces in its attach reply, so that a newer
#: client uses it only with a daemon that has it: "reply" is the field below.
FEATURES = ["reply"]
#: A request nobody waits for need not be answered: the daemon's reply costs it
#: a wake-up of its ZeroMQ I/O thread, about half its time per magazine here.
_NO_WAIT = Field("reply", bool, doc="false: send no reply on success (errors are answered); optional",
                 default=True)

#: Every op's request fields, in order; nothing else is accepted.
REQUEST_FIELDS: dict[Op, tuple[Field, ...]] = {
    Op.PING: (),
    Op.ATTACH: (Field("pid", int, 1, PID_MAX, "the client's process id"),
                Field("name", str, 0, 64, "free-form client name for stats"),
                Field("nonce", int, 0, U64, "a random number, so that the client can abandon this attach if "
                      "no reply comes in time (0: none); optional", default=0)),
    Op.DETACH: _CLIENT,
    Op.ABANDON: (Field("pid", int, 1, PID_MAX, "the pid the attach named"),
                 Field("nonce", int, 1, U64, "the nonce the attach carried")),
    Op.REGISTER_CLASS: (*_CLIENT,
                        Field("name", str, 1, MAX_CLASS_NAME, "class name"),
                        Field("size", int, 1, MAX_OBJECT_SIZE, "object size in bytes"),
                        Field("zero_init", bool, doc="objects read as zeros when allocated"),
                        Field("policy", str, 0, 5, "error policy of the class: raise, log, abort; '' keeps it"),
                        Field("cap", int, 0, U64, "most objects the class may ever carve; 0 keeps it")),
    Op.REFILL: (*_CLIENT, *_SLOT,
                Field("spare", bool, doc="fill only the prefetch magazine (sent without waiting); optional",
                      default=False),
                _NO_WAIT),
    Op.FLUSH: (*_CLIENT, *_SLOT,
               Field("outgoing", bool, doc="audit only the outgoing magazine (sent without waiting); optional",
                     default=False),
               _NO_WAIT),
    Op.STATS: (),
    Op.REPORT: (*_CLIENT,
                Field("class_id", int, 1, 63, "the class the release named"),
                Field("handle", int, 0, U64, "the refused handle (2**64-1 when it was not a u64)"),
                Field("kind", int, 0, len(ERROR_KINDS) - 1, "index into ERROR_KINDS")),
    Op.AUDIT: (Field("since", int, 0, U64, "return entries with a sequence number above this"),
               Field("limit", int, 1, 1000, "at most this many entries")),
}

#: What each op does and replies; doc/protocol.md says the same at length.
OP_DOCS: dict[Op, str] = {
    Op.PING: "Liveness and capabilities. Reply: version, ops, instance, pid.",
    Op.ATTACH: "Join the instance. Reply: client, token, rack index/offset/size, segment names and layout sizes.",
    Op.DETACH: "Leave: the daemon reclaims every magazine in the rack. Reply: reclaimed.",
    Op.ABANDON: "Undo an attach whose reply the client stopped waiting for: detach the client it made, or refuse it if it comes later. Reply: detached.",
    Op.REGISTER_CLASS: "Create a class, or return the existing one with the same spec. Reply: class_id, size, stride, zero_init.",
    Op.REFILL: "Fill the thread's empty allocation magazine, and its spare if empty; with spare, only the spare. Reply: count.",
    Op.FLUSH: "Audit and take back the thread's release and outgoing magazines (with outgoing, only that one). Reply: accepted, refused [[handle, kind]].",
    Op.STATS: "Per-class and per-client figures. Reply: instance, classes, clients.",
    Op.REPORT: "A release the fast path refused, for the audit log (counted in the rack already). Reply: seq.",
    Op.AUDIT: "Audit log entries after `since`, and counters per class and kind. Reply: entries, next, counters, dropped.",
}

# Lookups the daemon does per request, computed once (Enum calls are slow).
_OPS_BY_NAME: dict[str, Op] = {op.value: op for op in Op}
_ALLOWED_KEYS: dict[Op, frozenset[str]] = {
    op: frozenset({"v", "id", "op", *(f.name for f in fields)}) for op, fields in REQUEST_FIELDS.items()}
_ABSENT = object()  # a field the message does not carry (None is a value msgpack can carry)

_UNPACK_LIMITS = {
    "max_str_len": MAX_MESSAGE_BYTES,
    "max_bin_len": MAX_MESSAGE_BYTES,
    "max_array_len": 4096,
    "max_map_len": 64,
    "max_ext_len": 0,
}


class Request(NamedTuple):
    """A validated request: ``args`` holds exactly the op's fields."""

    op: Op
    id: int
    args: dict[str, Any]


class Refusal(Exception):
    """Raised by validation and handlers in the daemon; becomes an error reply."""

    def __init__(self, code: ErrorCode, message: str, request_id: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


def pack(message: dict[str, Any]) -> bytes:
    """Serialise one message."""
    return msgpack.packb(message, use_bin_type=True)


def reply_packer() -> Callable[[dict[str, Any]], bytes]:
    """``pack`` for one thread's use: a reused msgpack Packer (the daemon's loop; about 0.4 µs a reply less)."""
    return msgpack.Packer(use_bin_type=True).pack


def unpack(frame: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Any:
    """Deserialise one frame with hostile-input limits; raises Refusal(MALFORMED)."""
    _check_size(frame, max_bytes)
    try:
        return msgpack.unpackb(frame, raw=False, strict_map_key=True, **_UNPACK_LIMITS)
    except Exception as exc:  # msgpack raises many types for bad input
        raise _malformed(exc) from None


def frame_decoder(max_bytes: int = MAX_MESSAGE_BYTES) -> Callable[[bytes], Any]:
    """``unpack`` for one thread's use: a reused msgpack Unpacker (the daemon's loop).

    ``msgpack.unpackb`` parses its keyword arguments on every call, about
    1.1 µs of a 1.5 µs decode; an Unpacker takes them once.  A frame must
    hold exactly one message: anything left over, or a bad frame, is
    MALFORMED and the decoder starts afresh.
    """
    def fresh() -> msgpack.Unpacker:
        return msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=max_bytes, **_UNPACK_LIMITS)

    unpacker = fresh()

    def decode(frame: bytes) -> Any:
        nonlocal unpacker
        _check_size(frame, max_bytes)
        start = unpacker.tell()
        try:
            unpacker.feed(frame)
            message = unpacker.unpack()
            if unpacker.tell() - start != len(frame):
                raise msgpack.ExtraData(message, b"")
        except Exception as exc:  # msgpack raises many types for bad input
            unpacker = fresh()  # drop whatever the bad frame left in the buffer
            raise _malformed(exc) from None
        return message

    return decode


def _check_size(frame: bytes, max_bytes: int) -> None:
    if len(frame) > max_bytes:
        raise Refusal(ErrorCode.MALFORMED, f"message of {len(frame)} bytes exceeds {max_bytes}")


def _malformed(exc: Exception) -> Refusal:
    return Refusal(ErrorCode.MALFORMED, f"not a msgpack message: {type(exc).__name__}")


def request(op: Op, request_id: int, **args: Any) -> dict[str, Any]:
    """Build a request message (the client side)."""
    return {"v": PROTOCOL_VERSION, "id": request_id, "op": op.value, **args}


def parse_request(frame: bytes, max_bytes: int = MAX_MESSAGE_BYTES,
                  decode: Callable[[bytes], Any] | None = None) -> Request:
    """Decode and validate a request frame (the daemon side); ``decode``: a ``frame_decoder``.

    Raises:
        Refusal: with the code and a message naming the bad field.
    """
    message = unpack(frame, max_bytes) if decode is None else decode(frame)
    if not isinstance(message, dict):
        raise Refusal(ErrorCode.MALFORMED, "a request must be a msgpack map")
    request_id = message.get("id", 0)
    if type(request_id) is not int or not 0 <= request_id <= U64:
        raise Refusal(ErrorCode.MALFORMED, "field 'id' must be an integer in [0, 2**64)")
    if message.get("v") != PROTOCOL_VERSION:
        raise Refusal(ErrorCode.UNSUPPORTED_VERSION,
                      f"protocol version {message.get('v')!r} is not {PROTOCOL_VERSION}", request_id)
    name = message.get("op")
    op = _OPS_BY_NAME.get(name) if isinstance(name, str) else None
    if op is None:
        raise Refusal(ErrorCode.UNKNOWN_OP, f"unknown op {name!r}", request_id)
    if not _ALLOWED_KEYS[op].issuperset(message):
        extra = set(message) - _ALLOWED_KEYS[op]
        raise Refusal(ErrorCode.INVALID_FIELD, f"{op.value}: unexpected fields {sorted(map(str, extra))}", request_id)
    return Request(op, request_id, _FIELD_CHECKS[op](message, request_id))


def _field(op: Op, field: Field, value: Any, request_id: int) -> Any:
    """A field the inline test of ``_field_check`` did not pass: its value, or the refusal.

    Only a required field can be absent here: an optional one reads as its default.
    """
    if value is _ABSENT:
        raise Refusal(ErrorCode.INVALID_FIELD, f"{op.value}: missing field '{field.name}'", request_id)
    return _check(op, field, value, request_id)


def _field_check(op: Op) -> Callable[[dict[str, Any], int], dict[str, Any]]:
    """The daemon's check of one op's fields, as one straight-line function made from REQUEST_FIELDS.

    The table stays the one declaration; this compiles it, as ``dataclasses``
    compiles ``__init__``.  Each int field is one ``dict.get`` (an optional
    field's default given to it), a type test and a range test inline; bool
    fields a type test; anything else (a str, a required field absent, a bad
    value) goes to ``_field``, which has every rule and every message.  A
    loop over the table took about 1.4 times as long: 0.3-0.6 µs more a
    REFILL, of the 7-10 µs the daemon spends on one.
    """
    fields = REQUEST_FIELDS[op]
    lines = ["def check(message, request_id):", "    get = message.get"]
    for i, f in enumerate(fields):
        # An optional field absent reads as its default, which passes its own test.
        lines.append(f"    v{i} = get({f.name!r}, {'ABSENT' if f.default is None else f'D{i}'})")
        slow = f"v{i} = field(OP, F{i}, v{i}, request_id)"
        if f.kind is int:
            lines += [f"    if type(v{i}) is not int or not {f.low} <= v{i} <= {f.high}:", f"        {slow}"]
        elif f.kind is bool:
            lines += [f"    if type(v{i}) is not bool:", f"        {slow}"]
        else:  # a str: length in bytes, not worth inlining (attach and register_class only)
            lines.append(f"    {slow}")
    lines.append("    return {" + ", ".join(f"{f.name!r}: v{i}" for i, f in enumerate(fields)) + "}")
    scope: dict[str, Any] = {"ABSENT": _ABSENT, "field": _field, "OP": op,
                             **{f"F{i}": f for i, f in enumerate(fields)},
                             **{f"D{i}": f.default for i, f in enumerate(fields)}}
    exec(compile("\n".join(lines), f"<slitter.protocol: {op.value} fields>", "exec"), scope)  # noqa: S102
    return scope["check"]


class _FieldChecks(dict):
    """Op -> its compiled field check, compiled on the op's first request: clients, which import this
    module but parse no request, pay nothing (all nine took about 1.5 ms at import)."""

    def __missing__(self, op: Op) -> Callable[[dict[str, Any], int], dict[str, Any]]:
        check = self[op] = _field_check(op)
        return check


_FIELD_CHECKS = _FieldChecks()


def _check(op: Op, field: Field, value: Any, request_id: int) -> Any:
    if type(value) is not field.kind:
        raise Refusal(ErrorCode.INVALID_FIELD,
                      f"{op.value}: field '{field.name}' must be {field.kind.__name__}", request_id)
    if field.kind is int and not field.low <= value <= field.high:
        raise Refusal(ErrorCode.INVALID_FIELD,
                      f"{op.value}: field '{field.name}' = {value} is outside [{field.low}, {field.high}]",
                      request_id)
    if field.kind is str and not field.low <= len(value.encode()) <= field.high:
        raise Refusal(ErrorCode.INVALID_FIELD,
                      f"{op.value}: field '{field.name}' must be {field.low}..{field.high} bytes", request_id)
    return value


def ok_reply(request_id: int, **fields: Any) -> dict[str, Any]:
    """A success reply."""
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, **fields}


def error_reply(request_id: int, code: ErrorCode, message: str) -> dict[str, Any]:
    """A refusal; never carries a traceback."""
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": False, "code": int(code), "error": message}


def raise_for_reply(reply: dict[str, Any], address: str) -> None:
    """Turn an error reply into the exception ERROR_EXCEPTIONS maps its code to."""
    if reply.get("ok"):
        return
    try:
        code = ErrorCode(reply.get("code"))
    except ValueError:
        code = ErrorCode.INTERNAL
    message = reply.get("error") or code.name
    raise ERROR_EXCEPTIONS[code](f"{message} (daemon at {address})", code=code)
