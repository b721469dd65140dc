"""The ``Server``: a plain zmq.Poller loop over the ROUTER socket and client pidfds.

Each frame is decoded and validated (``slitter.protocol``), dispatched to
``handlers`` and answered; any refusal, and any bug, becomes an error reply
without a traceback, and the loop goes on.  A client's pidfd turning
readable means the client died: its rack is reclaimed at once.  After every
poll the loop runs its ``tick_hooks`` (sd_notify watchdog, metrics snapshot,
SIGHUP reload); a hook that raises is logged and the loop goes on.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable

import zmq

from slitter import errors, protocol
from slitter.protocol import ErrorCode, Refusal

from slitterd.handlers import HANDLERS, attached_by
from slitterd.instance import Instance

log = logging.getLogger("slitterd")

_EXCEPTION_CODES = {v: k for k, v in reversed(protocol.ERROR_EXCEPTIONS.items())}
_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)


class Server:
    """Serves one instance on one socket until stopped."""

    def __init__(self, instance: Instance, endpoint: str,
                 max_message_bytes: int = protocol.MAX_MESSAGE_BYTES) -> None:
        self.instance = instance
        self.endpoint = endpoint
        self.max_message_bytes = max_message_bytes
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        # ZeroMQ drops a bigger frame (and the connection that sent it) itself.
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self.socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
        # A reply to a peer that has gone raises EHOSTUNREACH instead of vanishing: an attach whose client
        # stopped waiting is undone (_undeliverable).
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        old = os.umask(0o077)
        try:
            self.socket.bind(endpoint)
        finally:
            os.umask(old)
        self.running = False
        self.requests = 0
        self._pack = protocol.reply_packer()  # the loop's thread only
        self._decode = protocol.frame_decoder(max_message_bytes)  # likewise
        #: Called with time.monotonic() after a poll, at most every TICK_SECONDS, in the loop's thread.
        self.tick_hooks: list[Callable[[float], None]] = []
        #: Poll timeout: the longest a tick hook waits on an idle daemon.
        self.poll_ms = 200

    #: The shortest time between two runs of the tick hooks on a busy daemon.
    TICK_SECONDS = 0.02

    def stop(self, *_args: object) -> None:
        self.running = False

    def serve(self, on_ready=None) -> None:
        """Serve until ``stop()`` (SIGTERM/SIGINT call it)."""
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        self.running = True
        if on_ready is not None:
            on_ready()
        poller, pidfds, generation = None, {}, None
        racks = self.instance.racks
        next_tick = 0.0
        while self.running:
            if racks.generation != generation:  # rebuild the poller only when clients come or go
                generation = racks.generation
                clients = racks.clients
                poller = zmq.Poller()
                poller.register(self.socket, zmq.POLLIN)
                pidfds = {c.pidfd: c for c in clients.values() if c.pidfd is not None}
                for fd in pidfds:
                    poller.register(fd, zmq.POLLIN)
            for item, _ in poller.poll(self.poll_ms):
                if item is self.socket:
                    self._drain()
                elif item in pidfds and pidfds[item].id in self.instance.racks.clients:
                    try:
                        self.instance.reclaim(pidfds[item], "died")
                    except Exception:  # never die of a client's death
                        log.exception("reclaiming client %d failed", pidfds[item].id)
            now = time.monotonic()
            if now >= next_tick:  # not after every busy poll: a few times a second is enough
                next_tick = now + self.TICK_SECONDS
                self._tick(now)

    def _tick(self, now: float) -> None:
        for hook in self.tick_hooks:
            try:
                hook(now)
            except Exception:
                log.exception("tick hook %s failed", getattr(hook, "__qualname__", hook))

    def _drain(self) -> None:
        # Plain recv and send with int flags: recv_multipart asks getsockopt(RCVMORE)
        # after every part and send_multipart ORs enum Flags per part, about 3 µs
        # a request together.  A ROUTER message is the routing id and at least
        # one frame; the request frame's `more` says whether a client sent more.
        recv, send = self.socket.recv, self.socket.send
        for _ in range(256):
            try:
                routing_id = recv(_NOBLOCK)
                frame = recv(_NOBLOCK, copy=False)
            except zmq.Again:
                return
            if frame.more:  # a request is one frame: drop the rest, answer MALFORMED
                while recv(_NOBLOCK, copy=False).more:
                    pass
                reply = self.handle(b"")
            else:
                reply = self.handle(frame.bytes)
                if reply is None:
                    continue
            try:
                payload = self._pack(reply)
            except Exception:  # e.g. a figure msgpack cannot carry: answer, never die
                log.exception("could not encode the reply to request %s", reply.get("id"))
                payload = protocol.pack(protocol.error_reply(reply.get("id", 0), ErrorCode.INTERNAL,
                                                             "internal error; see the daemon log"))
            try:
                send(routing_id, _MORE_NOBLOCK)
                send(payload, _NOBLOCK)
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EHOSTUNREACH:
                    self._undeliverable(reply)
                else:
                    log.warning("could not reply: %s", exc)

    def _undeliverable(self, reply: dict) -> None:
        """The peer of ``reply`` closed its socket before the reply could go: it stopped waiting.

        For an attach, the process never learnt of the client made for it,
        which would hold a rack for as long as the process lives: detach it.
        Any other reply is one a client that has gone no longer needs.
        """
        attached = attached_by(reply)
        client = self.instance.racks.get(*attached) if attached else None
        if client is not None:
            self.instance.reclaim(client, "attached, but stopped waiting for the reply")
        else:
            log.debug("reply %s not delivered: its client has gone", reply.get("id"))

    def handle(self, frame: bytes) -> dict | None:
        """One request frame in, one reply message out (None: no reply asked for); never raises."""
        self.requests += 1
        request_id = 0
        try:
            req = protocol.parse_request(frame, decode=self._decode)
            request_id = req.id
            fields = HANDLERS[req.op](self.instance, req)
            if req.args.get("reply") is False:  # the sender does not wait (REFILL, FLUSH)
                return None
            return protocol.ok_reply(req.id, **fields)
        except Refusal as exc:
            return protocol.error_reply(exc.request_id or request_id, exc.code, exc.message)
        except errors.SlitterError as exc:
            code = _EXCEPTION_CODES.get(type(exc), ErrorCode.INTERNAL)
            return protocol.error_reply(request_id, code, str(exc))
        except Exception:
            log.exception("internal error handling request %d", request_id)
            return protocol.error_reply(request_id, ErrorCode.INTERNAL, "internal error; see the daemon log")

    def close(self) -> None:
        self.socket.close(0)
        self.context.term()
