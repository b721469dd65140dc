"""What the daemon does for each protocol op: one function per op, one table.

``protocol.parse_request`` has already checked every field's type and range;
handlers check what only the instance knows (client and token, class ids,
thread slots) and raise ``Refusal`` or a ``SlitterError``, which the server
turns into an error reply.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from slitter import errors
from slitter._native import lib
from slitter.protocol import (CLASS_NAME_PRINTABLE, ERROR_KINDS, FEATURES, MAX_REFUSED_LISTED, POLICIES,
                              PROTOCOL_VERSION, ErrorCode, Op, Refusal, Request)

from slitterd.instance import ClassSpec, Instance
from slitterd.rack import Client

log = logging.getLogger("slitterd")

Reply = dict[str, Any]


def _client(inst: Instance, req: Request) -> Client:
    client = inst.racks.get(req.args["client"], req.args["token"])
    if client is None:
        raise Refusal(ErrorCode.UNKNOWN_CLIENT, f"{req.op.value}: no client {req.args['client']} with that token")
    return client


def _slot(inst: Instance, req: Request) -> tuple[Client, int, int]:
    client = _client(inst, req)
    thread, class_id = req.args["thread"], req.args["class_id"]
    if thread >= lib.SLITTER_MAX_THREADS:
        raise Refusal(ErrorCode.INVALID_FIELD, f"{req.op.value}: thread slot {thread} >= {lib.SLITTER_MAX_THREADS}")
    if class_id not in inst.depots:
        raise Refusal(ErrorCode.UNKNOWN_CLASS, f"{req.op.value}: no class with id {class_id}")
    return client, thread, class_id


_OP_NAMES = [op.value for op in Op]


def ping(inst: Instance, req: Request) -> Reply:
    # The header's pid, not os.getpid(): a system call, about 2 µs in the daemon here.
    return {"version": PROTOCOL_VERSION, "ops": _OP_NAMES, "instance": inst.name,
            "pid": inst.arena.header.daemon_pid}


def attach(inst: Instance, req: Request) -> Reply:
    pid, nonce = req.args["pid"], req.args["nonce"]
    if nonce and inst.abandoned_attach(pid, nonce):
        raise Refusal(ErrorCode.INVALID_FIELD, f"attach: pid {pid} abandoned this attach before it arrived")
    try:
        pidfd = os.pidfd_open(pid)
    except (OSError, OverflowError, ValueError):
        raise Refusal(ErrorCode.INVALID_FIELD, f"attach: pid {pid} is not a live process") from None
    client = inst.racks.attach(pid, req.args["name"], pidfd, nonce)
    if client is None:
        os.close(pidfd)
        raise errors.LimitExceeded(f"attach: all {inst.racks.max_clients} client racks are in use")
    log.info("client %d (pid %d, %s) attached", client.id, pid, req.args["name"] or "-")
    g = inst.arena.geometry
    return {"client": client.id, "token": client.token, "rack_index": client.rack_index,
            "rack_offset": inst.arena.rack_offset(client.rack_index), "rack_size": g.rack_size,
            "tables_end": g.tables_end, "live_map_off": g.live_map_off, "live_map_bytes": g.live_map_bytes,
            "shelf_off": g.shelf_off, "shelf_bytes": g.shelf_bytes,
            "arena_size": g.arena_size, "instance": inst.name, "layout_version": lib.SLITTER_LAYOUT_VERSION,
            "features": FEATURES}


def attached_by(reply: dict) -> tuple[int, int] | None:
    """(client, token) if ``reply`` is an attach's successful reply, else None."""
    if reply.get("ok") and "rack_index" in reply:
        return reply["client"], reply["token"]
    return None


def detach(inst: Instance, req: Request) -> Reply:
    return {"reclaimed": inst.reclaim(_client(inst, req), "detached")}


def abandon(inst: Instance, req: Request) -> Reply:
    """An attach whose client gave up waiting for the reply: detach what it made, or refuse it when it comes."""
    return {"detached": inst.abandon(req.args["pid"], req.args["nonce"])}


def register_class(inst: Instance, req: Request) -> Reply:
    _client(inst, req)
    a = req.args
    if not a["name"].isprintable():
        raise Refusal(ErrorCode.INVALID_FIELD, f"register_class: {CLASS_NAME_PRINTABLE}")
    spec = ClassSpec(a["name"], a["size"], a["zero_init"])
    if a["policy"] and a["policy"] not in POLICIES:
        raise Refusal(ErrorCode.INVALID_FIELD, f"register_class: policy {a['policy']!r} is not one of {POLICIES}")
    class_id = inst.register_class(spec)
    policy = inst.set_policy(class_id, a["policy"])
    return {"class_id": class_id, "size": spec.size, "stride": inst.arena.classes[class_id].stride,
            "zero_init": spec.zero_init, "policy": policy, "cap": inst.set_cap(class_id, a["cap"])}


def refill(inst: Instance, req: Request) -> Reply:
    return {"count": inst.refill(*_slot(inst, req), spare=req.args["spare"])}


def flush(inst: Instance, req: Request) -> Reply:
    accepted, refused = inst.flush(*_slot(inst, req), outgoing=req.args["outgoing"])
    # (handle, kind) pairs: msgpack packs tuples as arrays.  Every one is counted and in the audit log.
    return {"accepted": accepted, "refused": refused[:MAX_REFUSED_LISTED], "refused_total": len(refused)}


def stats(inst: Instance, req: Request) -> Reply:
    return {"instance": inst.instance_stats(), "classes": inst.class_stats(), "clients": inst.client_stats()}


def report(inst: Instance, req: Request) -> Reply:
    client = _client(inst, req)
    class_id = req.args["class_id"]
    if class_id not in inst.depots:
        raise Refusal(ErrorCode.UNKNOWN_CLASS, f"report: no class with id {class_id}")
    # A client resends a request the daemon was too slow to answer, with the
    # same id: the refusal it reports goes into the log once.
    if req.id != 0 and client.last_report[0] == req.id:
        return {"seq": client.last_report[1]}
    seq = inst.audit.record(client.pid, inst.class_name(class_id), req.args["handle"],
                            ERROR_KINDS[req.args["kind"]], "release")
    client.last_report = (req.id, seq)
    return {"seq": seq}


def audit(inst: Instance, req: Request) -> Reply:
    return {"entries": inst.audit.since(req.args["since"], req.args["limit"]), "next": inst.audit.seq,
            "counters": inst.class_errors(), "dropped": inst.audit.dropped}


HANDLERS: dict[Op, Callable[[Instance, Request], Reply]] = {
    Op.PING: ping,
    Op.ATTACH: attach,
    Op.DETACH: detach,
    Op.ABANDON: abandon,
    Op.REGISTER_CLASS: register_class,
    Op.REFILL: refill,
    Op.FLUSH: flush,
    Op.STATS: stats,
    Op.REPORT: report,
    Op.AUDIT: audit,
}
