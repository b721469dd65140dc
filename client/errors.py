"""The exception tree of slitter.

Every exception carries structured attributes (``handle``, ``class_name``,
``expected_class``, ``address``) and a message that says what was wrong with
which handle and class.  The daemon refuses with an ``ErrorCode``
(``slitter.protocol``); the client raises the class mapped to it there.
"""

from __future__ import annotations


class SlitterError(Exception):
    """Base of every slitter error; never raised directly."""

    def __init__(self, message: str, **detail: object) -> None:
        super().__init__(message)
        self.detail = detail
        for key, value in detail.items():
            setattr(self, key, value)


class ReleaseError(SlitterError):
    """A release was refused and nothing changed; never raised directly.

    Attributes: ``handle`` (int) and ``class_name`` (the class it was
    released as).
    """

    handle: int
    class_name: str


class ClassMismatch(ReleaseError):
    """The handle belongs to another class: ``order.release(h_of_trade)``.

    ``expected_class`` names the class that owns the handle.
    """

    expected_class: str


class InteriorPointer(ReleaseError):
    """The handle points inside an object, not at its start: ``release(h + 8)``."""


class ForeignAddress(ReleaseError):
    """The arena does not manage the handle: outside it, in a span no class
    owns, or in a guard page: ``release(12345)``."""


class DoubleFree(ReleaseError):
    """The object is not live: released already, by this or any other
    process, however many releases came between."""


class OutOfMemory(SlitterError, MemoryError):
    """The arena (or /dev/shm behind it) cannot hold another run of the class."""


class DaemonUnavailable(SlitterError, ConnectionError):
    """No daemon answered at ``address`` in time."""

    address: str


class ProtocolError(SlitterError, ValueError):
    """A message was malformed, or named something the daemon does not know."""


class ClassConflict(SlitterError):
    """A class name was registered again with another size or options."""


class LimitExceeded(SlitterError):
    """A configured limit was reached: clients, classes or thread slots."""


class ChannelError(SlitterError):
    """A channel refused a send or a receive.

    Raised as itself when the channel was released (or its header
    overwritten), or when a thread that is both its sender and its receiver
    would wait forever on itself.  Attribute: ``channel`` (its handle).
    """

    channel: int


class ChannelClosed(ChannelError):
    """The channel is closed: a send after ``close``, or a receive once it is closed and empty.

    ``sent`` is how many handles of a ``send_many`` went before it was closed.
    """


class ChannelPeerGone(ChannelClosed):
    """The other side's process is gone (it exited, or was killed, without closing the channel).

    The wait for it would never end, so instead: a receive raises it once
    the ring is empty (everything the sender published has been received
    first); a send raises it when the ring is full.  A thread that exits
    while its process lives is not a gone peer: another thread of it may
    take the side over.  The channel stays open, and another process may
    take the side over too.  ``thread`` and ``pid`` name the claim that is
    gone; ``sent`` is how many handles of a ``send_many`` went.
    """


class ChannelTimeout(ChannelError, TimeoutError):
    """The wait for room (send) or for a handle (receive) ran past its timeout.

    ``sent`` is how many handles of a ``send_many`` went before it timed out.
    """


class ChannelInUse(ChannelError):
    """Another live thread, of this or any process, is the channel's sender (or receiver): one of each per channel.

    ``thread`` and ``pid`` name it.
    """
