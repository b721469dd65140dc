"""slitter: typed, fixed-size objects in shared memory, served by slitterd.

    import slitter
    with slitter.connect() as heap:
        order = heap.register_class("order", size=64, zero_init=True)
        h = order.allocate()          # an 8-byte handle, valid in every attached process
        heap.view(h)[:5] = b"hello"   # zero copy
        order.release(h)              # checked: class, interior, foreign, double free

The fast path (``Class.allocate``/``release``) is C through cffi on per-thread
magazines in shared memory; the slow path talks to slitterd over ZeroMQ.
"""

from slitter._spawn import spawn_daemon
from slitter.alloc_class import Class
from slitter.channel import Channel
from slitter.errors import (
    ChannelClosed,
    ChannelError,
    ChannelInUse,
    ChannelPeerGone,
    ChannelTimeout,
    ClassConflict,
    ClassMismatch,
    DaemonUnavailable,
    DoubleFree,
    ForeignAddress,
    InteriorPointer,
    LimitExceeded,
    OutOfMemory,
    ProtocolError,
    ReleaseError,
    SlitterError,
)
from slitter.heap import Heap, connect

__all__ = [
    "Channel",
    "ChannelClosed",
    "ChannelError",
    "ChannelInUse",
    "ChannelPeerGone",
    "ChannelTimeout",
    "Class",
    "ClassConflict",
    "ClassMismatch",
    "DaemonUnavailable",
    "DoubleFree",
    "ForeignAddress",
    "Heap",
    "InteriorPointer",
    "LimitExceeded",
    "OutOfMemory",
    "ProtocolError",
    "ReleaseError",
    "SlitterError",
    "connect",
    "spawn_daemon",
]
__version__ = "0.1.0"
