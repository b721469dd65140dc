"""The client's channel to slitterd: a DEALER socket, msgpack frames, timeouts.

One request at a time per transport (a lock serialises threads); replies
are matched by id, so a late reply to a request that timed out is dropped.
A request that gets no answer is sent again on a fresh socket until the
timeout has passed in all, then ``DaemonUnavailable`` names the address.
"""

from __future__ import annotations

import collections
import itertools
import os
import threading
import time
from typing import Any

import zmq

from slitter import address as _address
from slitter import protocol
from slitter.errors import DaemonUnavailable, ProtocolError


class Transport:
    """Request/reply to one daemon address."""

    #: How long one attempt waits for its reply before the request is sent again.
    RETRY_SECONDS = 2.0

    def __init__(self, address: str, timeout: float) -> None:
        self.address = _address.socket_path(address)
        self.endpoint = _address.endpoint(address)
        self.timeout_ms = int(timeout * 1000)
        self.lock = threading.Lock()
        self.ids = itertools.count(1)
        self.context = zmq.Context()
        self.socket = None
        #: Set once attached: wait out daemon restarts instead of failing fast.
        self.patient = False
        #: Calls that waited for a reply (``send_nowait`` ones do not).
        self.round_trips = 0
        #: Requests sent, by op name (tests and bench/ count slow-path trips).
        self.sent: collections.Counter[str] = collections.Counter()

    def _open(self) -> zmq.Socket:
        if not os.path.exists(self.address):
            raise DaemonUnavailable(f"no slitterd at {self.address}: the socket does not exist",
                                    address=self.address)
        if not os.access(self.address, os.R_OK | os.W_OK):
            raise DaemonUnavailable(f"no access to slitterd at {self.address}: permission denied "
                                    "(the socket is 0600, or 0660 for its group)", address=self.address)
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        return sock

    @property
    def messages(self) -> int:
        """Requests sent, all ops together."""
        return sum(self.sent.values())

    def _send(self, op: protocol.Op, request_id: int, args: dict[str, Any], flags: int = 0,
              sock: zmq.Socket | None = None) -> None:
        """Build, pack, send and count one request, on ``sock`` or the transport's (the caller holds the lock)."""
        (sock or self.socket).send(protocol.pack(protocol.request(op, request_id, **args)), flags)
        self.sent[op.value] += 1

    def call(self, op: protocol.Op, **args: Any) -> dict[str, Any]:
        """Send one request and wait for its reply.

        A patient transport (one whose heap is attached) rides out a daemon
        restart: while no reply comes it reopens the socket and sends the
        request again, with the same id, until ``timeout`` has passed in all.
        Every op is safe to repeat: REPORT, the one that is not, is recorded
        once per id.  An impatient one (connecting) gives up at once when
        nothing listens.

        Raises:
            DaemonUnavailable: no reply within the timeout.
            SlitterError: the subclass the daemon's error code maps to.
        """
        deadline = time.monotonic() + self.timeout_ms / 1000
        with self.lock:
            self.round_trips += 1
            request_id = next(self.ids)
            while True:
                reply = self._attempt(op, request_id, args, deadline)
                if reply is not None:
                    break
                if not self.patient or time.monotonic() >= deadline:
                    raise DaemonUnavailable(
                        f"no reply from slitterd at {self.address} to '{op.value}' within "
                        f"{self.timeout_ms / 1000:g} s", address=self.address)
                time.sleep(0.05)
        protocol.raise_for_reply(reply, self.address)
        return reply

    def send_nowait(self, op: protocol.Op, **args: Any) -> bool:
        """Send a request whose reply nobody waits for (a prefetch); never blocks.

        Returns False when it could not go now (another thread is mid-call,
        no socket, or ZeroMQ would block).  A reply, if the request asks for
        one (REFILL and FLUSH can say ``reply=False``), is read and dropped by
        the next ``call``, which matches replies by id.
        """
        if not self.lock.acquire(blocking=False):
            return False
        try:
            if self.socket is None:
                return False
            self._send(op, next(self.ids), args, zmq.NOBLOCK)
            return True
        except zmq.ZMQError:
            return False
        finally:
            self.lock.release()

    def send_once(self, op: protocol.Op, linger_ms: int, **args: Any) -> bool:
        """Send one request on a fresh socket and wait for no reply: ABANDON, after an attach timed out.

        A fresh socket, since the one the request timed out on is closed.
        ``linger_ms`` bounds how long ``close`` then waits for ZeroMQ to
        deliver it: a daemon that listens takes it at once; one that does
        not never got the attach either.  Returns False when there is no
        socket to send to (nothing listens: then nothing was attached).
        """
        with self.lock:
            try:
                sock = self._open()
            except DaemonUnavailable:
                return False
            try:
                self._send(op, next(self.ids), args, zmq.NOBLOCK, sock)
                return True
            except zmq.ZMQError:
                return False
            finally:
                sock.close(linger_ms)  # the context's term() in close() waits for the delivery, up to this

    def _attempt(self, op: protocol.Op, request_id: int, args: dict[str, Any],
                 deadline: float) -> dict[str, Any] | None:
        """One send and wait; None when nothing answered (the socket is then reset)."""
        if self.socket is None:
            try:
                self.socket = self._open()
            except DaemonUnavailable:
                if not self.patient:
                    raise
                return None
        self._send(op, request_id, args)
        wait_until = min(deadline, time.monotonic() + self.RETRY_SECONDS) if self.patient else deadline
        while (left := wait_until - time.monotonic()) > 0:
            if not self.socket.poll(max(1, int(left * 1000)), zmq.POLLIN):
                continue
            try:
                reply = protocol.unpack(self.socket.recv())
            except protocol.Refusal as exc:
                raise ProtocolError(f"bad reply from {self.address}: {exc.message}") from None
            if isinstance(reply, dict) and reply.get("id") == request_id:
                return reply
        self.socket.close(0)
        self.socket = None
        return None

    def close(self) -> None:
        """Close the socket and context; safe in a forked child (pyzmq skips foreign contexts)."""
        if self.socket is not None:
            self.socket.close(0)
            self.socket = None
        self.context.term()
