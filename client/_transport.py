"""The client's channel to slitterd: a DEALER socket, msgpack frames, timeouts.

One request at a time per transport (a lock serialises threads); replies
are matched by id, so a late reply to a request that timed out is dropped.
A timeout closes the socket and opens a fresh one, then raises
``DaemonUnavailable`` naming the address.
"""

from __future__ import annotations

import collections
import itertools
import os
import threading
from typing import Any

import zmq

from slitter import address as _address
from slitter import protocol
from slitter.errors import DaemonUnavailable, ProtocolError


class Transport:
    """Request/reply to one daemon address."""

    def __init__(self, address: str, timeout: float) -> None:
        self.address = _address.socket_path(address)
        self.endpoint = _address.endpoint(address)
        self.timeout_ms = int(timeout * 1000)
        self.lock = threading.Lock()
        self.ids = itertools.count(1)
        self.context = zmq.Context()
        self.socket = None
        self.messages = 0
        #: Requests sent, by op name (tests and bench/ count slow-path trips).
        self.sent: collections.Counter[str] = collections.Counter()

    def _open(self) -> zmq.Socket:
        if not os.path.exists(self.address):
            raise DaemonUnavailable(f"no slitterd at {self.address}: the socket does not exist",
                                    address=self.address)
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        return sock

    def call(self, op: protocol.Op, **args: Any) -> dict[str, Any]:
        """Send one request and wait for its reply.

        Raises:
            DaemonUnavailable: no reply within the timeout.
            SlitterError: the subclass the daemon's error code maps to.
        """
        with self.lock:
            if self.socket is None:
                self.socket = self._open()
            request_id = next(self.ids)
            self.socket.send(protocol.pack(protocol.request(op, request_id, **args)))
            self.messages += 1
            self.sent[op.value] += 1
            while True:
                if not self.socket.poll(self.timeout_ms, zmq.POLLIN):
                    self.socket.close(0)
                    self.socket = None
                    raise DaemonUnavailable(
                        f"no reply from slitterd at {self.address} to '{op.value}' within "
                        f"{self.timeout_ms / 1000:g} s", address=self.address)
                try:
                    reply = protocol.unpack(self.socket.recv())
                except protocol.Refusal as exc:
                    raise ProtocolError(f"bad reply from {self.address}: {exc.message}") from None
                if isinstance(reply, dict) and reply.get("id") == request_id:
                    break
        protocol.raise_for_reply(reply, self.address)
        return reply

    def close(self) -> None:
        """Close the socket and context; safe in a forked child (pyzmq skips foreign contexts)."""
        if self.socket is not None:
            self.socket.close(0)
            self.socket = None
        self.context.term()
