"""The ``AuditLog``: every refused release and every object the frees-audit refused.

Entries come from two places: the daemon's own audit of flushed magazines
(``source`` "flush"), and clients reporting
what their fast path refused (``source`` "release").  The log is bounded: the
oldest entries go first and ``dropped`` counts them; the per-class, per-kind
counters are never dropped.  Each entry is also one log line.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import astuple, dataclass

log = logging.getLogger("slitterd")


@dataclass(frozen=True)
class AuditEntry:
    """One finding."""

    seq: int
    time: float
    pid: int
    class_name: str
    handle: int
    kind: str
    source: str


class AuditLog:
    """A bounded log of findings with exact counters."""

    def __init__(self, capacity: int = 10000) -> None:
        self.entries: deque[AuditEntry] = deque(maxlen=capacity)
        self.seq = 0
        self.dropped = 0

    def record(self, pid: int, class_name: str, handle: int, kind: str, source: str) -> AuditEntry:
        self.seq += 1
        if len(self.entries) == self.entries.maxlen:
            self.dropped += 1
        entry = AuditEntry(self.seq, time.time(), pid, class_name, handle, kind, source)
        self.entries.append(entry)
        log.warning("audit: %s of handle %#x in class '%s' by pid %d (%s)", kind, handle, class_name, pid, source)
        return entry

    def since(self, seq: int, limit: int) -> list[tuple]:
        """Entries with a sequence number above ``seq``, oldest first, as wire tuples."""
        out = []
        for entry in self.entries:
            if entry.seq > seq:
                out.append(list(astuple(entry)))
                if len(out) == limit:
                    break
        return out
