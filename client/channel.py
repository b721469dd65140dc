"""``Channel``: a one-way ring of handles from one thread to another, in any two attached processes.

Processes share objects by passing their 8-byte handles.  A Pipe or a
Queue costs a system call on each side and a wake-up per message (12-15 us
here); a channel is a ring in the arena itself, a slitter object of class
``slitter.channel.N``, so a batch of handles costs a copy and two cache-line
transfers while both sides keep up.  A side that has to wait spins briefly,
yielding the CPU, then sleeps on a futex without the GIL (native/channel.c).

One thread sends and one thread receives: the first ``send`` (``recv``)
claims the channel for its thread, and another thread, here or in another
process, gets ``ChannelInUse`` while that thread lives.  A channel carries
integers: it does not check or own the objects they name.  The receiver
checks them (``Class.check``) before it trusts them, as for any handle
from elsewhere.
"""

from __future__ import annotations

import os
import re
import threading
from array import array
from collections.abc import Iterable
from typing import TYPE_CHECKING

from slitter import _channel, _fastpath, errors

if TYPE_CHECKING:
    from slitter.alloc_class import Class
    from slitter.heap import Heap

CLASS_PREFIX = "slitter.channel."
_CLASS_RE = re.compile(r"slitter\.channel\.(\d+)")
MIN_CAPACITY, MAX_CAPACITY = 16, 1 << 20
DEFAULT_CAPACITY = 1024

_send, _recv, _wait_any = _channel.send, _channel.recv, _channel.wait_any
_ZERO = array("Q", [0])
_NOT_A_HANDLE = "a handle is an int from 0 to 2**64 - 1"  # send's and send_many's ValueError
# Per thread, wait_any's last call: [channels, arena, [(handle, capacity, serial), ...], where the next
# call's scan starts].  A consumer waits on the same channels batch after batch; rebuilding the list cost
# about 1 us a call for four of them.  Per thread, so that consumer threads waiting on sets of their own
# each keep their cache and their round robin.  It holds the last channels alive, as their consumer does.
_waits = threading.local()
_OK, _TIMEOUT, _CLOSED, _STALE, _SELF, _PEER_GONE = (_channel.OK, _channel.TIMEOUT, _channel.CLOSED, _channel.STALE,
                                                      _channel.SELF, _channel.PEER_GONE)  # anything else: IN_USE


def claimant(token: int) -> tuple[int, int]:
    """(pid, tid) of a side's claim token (native/channel.c token(): pid, tid and the process's start)."""
    return token >> _channel.TOKEN_PID_SHIFT, token >> _channel.TOKEN_TID_SHIFT & _channel.TOKEN_ID_MASK


def channel_size(capacity: int) -> int:
    """Bytes of a channel object: the header's three cache lines, then one 8-byte slot per handle."""
    return _channel.HEADER + 8 * capacity


class Channel:
    """A one-way ring of handles.  Make one with ``Heap.channel``, open it elsewhere with ``Heap.open_channel``."""

    __slots__ = ("_arena", "_class", "_heap", "_serial", "capacity", "handle")

    def __init__(self, cls: Class, handle: int, capacity: int, serial: int) -> None:
        self._class = cls
        self._heap = cls._heap
        self._arena = cls._heap.arena
        self._serial = serial
        self.handle = handle
        self.capacity = capacity

    @classmethod
    def _create(cls, heap: Heap, capacity: int) -> Channel:
        if not isinstance(capacity, int) or not MIN_CAPACITY <= capacity <= MAX_CAPACITY \
                or capacity & (capacity - 1):
            raise ValueError(f"channel capacity must be a power of two, {MIN_CAPACITY} to {MAX_CAPACITY}, "
                             f"not {capacity!r}")
        klass = heap.register_class(f"{CLASS_PREFIX}{capacity}", channel_size(capacity))
        handle = klass.allocate()
        channel = cls(klass, handle, capacity, int.from_bytes(os.urandom(8), "little") or 1)
        _channel.init(channel._arena, handle, capacity, channel._serial)
        return channel

    @classmethod
    def _open(cls, heap: Heap, handle: int) -> Channel:
        size = heap.view(handle).nbytes  # an object start (ForeignAddress, InteriorPointer otherwise)
        _ptr, class_id, _kind = _fastpath.locate(heap._view, handle)
        name = heap._class_name(class_id)
        match = _CLASS_RE.fullmatch(name)
        capacity = int(match[1]) if match else 0
        if not MIN_CAPACITY <= capacity <= MAX_CAPACITY or channel_size(capacity) != size:
            raise errors.ClassMismatch(f"handle {handle:#x} is an object of class '{name}', not a channel",
                                       handle=handle, class_name=name, expected_class=f"{CLASS_PREFIX}N")
        klass = heap.register_class(name, size)
        klass.check(array("Q", [handle]))  # live: DoubleFree for a released channel
        serial = _channel.serial(heap.arena, handle, capacity)
        if serial is None:
            raise errors.ChannelError(f"channel {handle:#x}: its header is not a channel's (overwritten?)",
                                      channel=handle)
        return cls(klass, handle, capacity, serial)

    # -- sending ------------------------------------------------------------

    def send(self, handle: int, timeout: float | None = None) -> None:
        """Send one handle; waits while the ring is full (up to ``timeout`` seconds; None: no limit).

        Raises as ``send_many``.
        """
        try:
            one = array("Q", (handle,))  # straight to the native call: a second wrapper was a third of it
        except OverflowError:
            raise ValueError(f"channel {self.handle:#x}: {_NOT_A_HANDLE}") from None
        if self._heap._closed:
            raise self._heap._closed_error()
        sent, status, peer = _send(self._arena, self.handle, self.capacity, self._serial, one, timeout)
        if status != _OK:
            raise self._error(status, "send to", sent, peer)

    def send_many(self, handles: Iterable[int], timeout: float | None = None) -> None:
        """Send every handle, in order; waits for room as the receiver takes them.

        An ``array('Q')`` goes without a copy.  ``timeout`` bounds the whole
        call.  If it runs out, or the channel is closed, the exception's
        ``sent`` says how many went (the first ``sent``, in order).  Sent
        means put in the ring: if the receiver closes the channel, what it
        left there is the last ``len(channel)`` handles sent.  A signal
        handler that raises while it waits leaves an unknown prefix sent.

        Raises:
            ChannelTimeout, ChannelClosed, ChannelInUse (another thread sends on it),
            ChannelPeerGone (a ChannelClosed: the ring is full and its receiver's process is gone),
            ChannelError (released, or this thread is its receiver and would wait forever).
        """
        if type(handles) is not array or handles.typecode != "Q":
            if isinstance(handles, (bytes, bytearray, memoryview)):
                raise TypeError(f"channel {self.handle:#x}: send_many takes handles (ints), not a bytes-like object")
            try:
                handles = array("Q", handles)
            except OverflowError:
                raise ValueError(f"channel {self.handle:#x}: {_NOT_A_HANDLE}") from None
        if self._heap._closed:  # the mapping outlives the heap; the channel does not
            raise self._heap._closed_error()
        sent, status, peer = _send(self._arena, self.handle, self.capacity, self._serial, handles, timeout)
        if status != _OK:
            raise self._error(status, "send to", sent, peer)

    # -- receiving ----------------------------------------------------------

    def recv(self, timeout: float | None = None) -> int:
        """The next handle; waits for one (up to ``timeout`` seconds; None: no limit).

        Raises:
            ChannelClosed: the channel is closed and every handle sent before has been received.
            ChannelPeerGone (a ChannelClosed): the ring is empty and its sender's process is gone
                (exited without closing it).
            ChannelTimeout, ChannelInUse (another thread receives from it),
            ChannelError (released, or this thread is its sender and would wait forever).
        """
        if self._heap._closed:
            raise self._heap._closed_error()
        out = _ZERO * 1
        _got, status, peer = _recv(self._arena, self.handle, self.capacity, self._serial, out, timeout)
        if status != _OK:
            raise self._error(status, "receive from", 0, peer)
        return out[0]

    def recv_many(self, limit: int = 1024, timeout: float | None = None) -> array:
        """The handles waiting, up to ``limit``, oldest first, as ``array('Q')``: at least one; waits for it.

        Raises as ``recv``.
        """
        if not isinstance(limit, int) or limit < 1:
            raise ValueError(f"channel {self.handle:#x}: recv_many(limit) needs an int limit >= 1, not {limit!r}")
        if self._heap._closed:
            raise self._heap._closed_error()
        out = _ZERO * min(limit, self.capacity)  # never more than the ring holds
        got, status, peer = _recv(self._arena, self.handle, self.capacity, self._serial, out, timeout)
        if status != _OK:
            raise self._error(status, "receive from", 0, peer)
        if got < len(out):
            del out[got:]
        return out

    @staticmethod
    def wait_any(channels: Iterable[Channel], timeout: float | None = None) -> Channel:
        """A channel of ``channels`` with a handle to receive, or closed: a receiver's wait on several at once.

        For one consumer of several producers, a channel each: wait, then
        ``recv_many(limit, timeout=0)`` from the channel returned.  It takes
        nothing; up to 128 channels of one heap.  Round robin: called again
        by the same thread with the same channels in the same order, it
        looks first at the one after the channel it returned, so a producer
        that is always ready does not starve the others; with other
        channels, it looks in the order given.  A channel released
        meanwhile is returned too: its ``recv_many`` raises ChannelError; so
        is one whose sender's process is gone, once the call would sleep or
        at its timeout: its ``recv_many`` raises ChannelPeerGone when it is
        empty.  Drop a channel that raised from the set, as a closed one:
        it would be returned again at once.
        Sleeps on all of them at once (Linux 5.16's futex_waitv) after the
        same short spin as ``recv``.

        Raises:
            ChannelTimeout: none was ready within ``timeout`` seconds.
        """
        channels = tuple(channels)
        if not channels:
            raise ValueError("wait_any needs at least one channel")
        if channels[0]._heap._closed:
            raise channels[0]._heap._closed_error()
        try:
            last = _waits.last
        except AttributeError:
            last = _waits.last = [(), None, None, 0]
        if channels != last[0]:  # element by element, identity first: a few ns a channel
            arena = channels[0]._arena
            if any(c._arena is not arena for c in channels):
                raise ValueError("wait_any: the channels must be of one heap")
            last[:] = channels, arena, [(c.handle, c.capacity, c._serial) for c in channels], 0
        index = _wait_any(last[1], last[2], timeout, last[3])
        if index < 0:
            names = ", ".join(f"{c.handle:#x}" for c in channels)
            raise errors.ChannelTimeout(f"channels {names}: timed out waiting for a handle",
                                        channel=channels[0].handle, sent=0)
        last[3] = index + 1 if index + 1 < len(channels) else 0
        return channels[index]

    # -- the channel itself ---------------------------------------------------

    def close(self) -> None:
        """No more sends, from now on; either side may close.  Wakes both sides.

        The receiver still gets what was sent before, then ChannelClosed.
        A receiver that closes gives up what is still in the ring.
        """
        if _channel.close(self._arena, self.handle, self.capacity, self._serial) != _OK:
            raise self._error(_STALE, "close", 0)

    def release(self) -> None:
        """Close the channel and release its object: once neither side uses it again.

        Every Channel of it, in any process, then raises ChannelError.

        Raises:
            DoubleFree: released already.
            ChannelError: released, and its object is another channel now: nothing is released.
        """
        self._class.check(array("Q", [self.handle]))  # refuses a released channel before touching its header
        if _channel.close(self._arena, self.handle, self.capacity, self._serial, True) != _OK:
            raise self._error(_STALE, "release", 0)
        self._class.release(self.handle)

    @property
    def closed(self) -> bool:
        return bool(self._state()[2])

    def __len__(self) -> int:
        """Handles sent and not yet received."""
        head, tail = self._state()[:2]
        return head - tail

    def _state(self) -> tuple[int, ...]:
        """(head, tail, closed, sender token, receiver token, receiver sleeping, sender sleeping)."""
        return _channel.state(self._arena, self.handle, self.capacity)

    def _error(self, status: int, verb: str, sent: int, peer: int = 0) -> errors.ChannelError:
        """The exception for a refused call; ``peer``: the gone claim's token (``claimant``), for PEER_GONE."""
        where = f"channel {self.handle:#x} ({self.capacity} slots)"
        sending = verb.startswith("send")
        if status == _TIMEOUT:
            what = f"room; {sent} sent" if sending else "a handle"
            return errors.ChannelTimeout(f"{where}: timed out waiting for {what}", channel=self.handle, sent=sent)
        if status == _CLOSED:
            what = f"it is closed; {sent} sent" if sending else "it is closed and empty"
            return errors.ChannelClosed(f"cannot {verb} {where}: {what}", channel=self.handle, sent=sent)
        if status == _STALE:
            return errors.ChannelError(f"cannot {verb} {where}: it was released (or its header overwritten)",
                                       channel=self.handle, sent=sent)
        if status == _SELF:
            other = "receiver" if sending else "sender"
            return errors.ChannelError(f"cannot {verb} {where}: this thread is its {other} too, and would wait "
                                       f"forever (pass a timeout); {sent} sent", channel=self.handle, sent=sent)
        if status == _PEER_GONE:
            other = "receiver" if sending else "sender"
            what = f"the ring is full; {sent} sent" if sending else "everything it sent has been received"
            pid, tid = claimant(peer)
            return errors.ChannelPeerGone(f"cannot {verb} {where}: its {other}, thread {tid} of process {pid}, "
                                          f"is gone (the process exited without closing it), and {what}",
                                          channel=self.handle, sent=sent, thread=tid, pid=pid)
        side = "sender" if sending else "receiver"
        pid, tid = claimant(self._state()[3 if sending else 4])
        return errors.ChannelInUse(f"cannot {verb} {where}: thread {tid} of process {pid} is its {side} "
                                   f"(one per channel)", channel=self.handle, thread=tid, pid=pid)

    def __repr__(self) -> str:
        head, tail, closed = self._state()[:3]
        return (f"<slitter.Channel {self.handle:#x} {head - tail}/{self.capacity}"
                f"{' closed' if closed else ''}>")
