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
from itertools import islice
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

    @property
    def dropped(self) -> int:
        """Entries pushed out by newer ones (sequence numbers have no gaps)."""
        return self.seq - len(self.entries)

    def record(self, pid: int, class_name: str, handle: int, kind: str, source: str) -> AuditEntry:
        self.seq += 1
        entry = AuditEntry(self.seq, time.time(), pid, class_name, handle, kind, source)
        self.entries.append(entry)
        log.warning("audit: %s of handle %#x in class '%s' by pid %d (%s)", kind, handle, class_name, pid, source)
        return entry

    def since(self, seq: int, limit: int) -> list[tuple]:
        """Entries with a sequence number above ``seq``, oldest first, as wire tuples."""
        # Entry i holds sequence number dropped + 1 + i.
        first = min(max(0, seq - self.dropped), len(self.entries))
        return [list(astuple(entry)) for entry in islice(self.entries, first, first + max(0, limit))]
