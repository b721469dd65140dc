"""The ``AuditLog``: every refused release and every object the frees-audit refused.

Entries come from two places: the daemon's own audit of flushed magazines
(``source`` "flush"), and clients reporting what their fast path refused
(``source`` "release").  The log is bounded: the oldest entries go first and
``dropped`` counts them; the per-class, per-kind counters are never dropped.

The log lines are bounded too, so that a broken or hostile client cannot
flood the journal or slow the replies to other clients: a flushed magazine
with more than ``LOG_EACH`` refused handles is one summary line, and each
client gets at most ``LINES_PER_SECOND`` lines a second.  What goes past
that budget is counted, and the count is logged with the client's next line
or when it leaves.  Every finding is still counted and numbered, and the
newest ``capacity`` of them are kept.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger("slitterd")

LOG_EACH = 4  # a batch of findings up to this size is logged line by line; a bigger one, as one line
LINES_PER_SECOND = 20  # per client pid
SHOWN_HANDLES = 4  # handles quoted in a summary line


@dataclass
class _Batch:
    """The findings of one request or one audited magazine, ``findings[i]`` numbered ``first + i``.

    One object a batch, not one a finding: a garbage magazine of 4096
    handles costs the daemon one allocation here, not 4096.  The first
    ``dropped`` findings were pushed out by newer ones.
    """

    first: int
    time: float
    pid: int
    class_name: str
    source: str
    findings: Sequence[tuple[int, str]]  # (handle, kind)
    dropped: int = 0

    @property
    def kept(self) -> int:
        return len(self.findings) - self.dropped


@dataclass
class _Budget:
    """One client's log lines in the current one-second window, and the findings it kept quiet."""

    window: float
    lines: int = 0
    quiet: Counter = field(default_factory=Counter)  # findings not logged, by kind


class AuditLog:
    """A bounded log of findings with exact counters, and a bounded number of log lines."""

    def __init__(self, capacity: int = 10000, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self.seq = 0  # the sequence number of the newest finding
        self._batches: deque[_Batch] = deque()
        self._kept = 0  # findings in _batches, at most capacity
        self._clock = clock
        self._budgets: dict[int, _Budget] = {}

    @property
    def dropped(self) -> int:
        """Findings pushed out by newer ones (sequence numbers have no gaps)."""
        return self.seq - self._kept

    def record(self, pid: int, class_name: str, handle: int, kind: str, source: str) -> int:
        """One finding; returns its sequence number."""
        return self.record_many(pid, class_name, [(handle, kind)], source)

    def record_many(self, pid: int, class_name: str, findings: Sequence[tuple[int, str]], source: str) -> int:
        """The findings of one request or one audited magazine; returns the newest's sequence number.

        Every finding is kept (the newest ``capacity`` of the log) and logged
        as its own line when the batch has at most ``LOG_EACH``; a bigger
        batch is one line.
        """
        n = len(findings)
        if n == 0:
            return self.seq
        kept = findings[-self.capacity:] if n > self.capacity else findings
        self._batches.append(_Batch(self.seq + 1 + n - len(kept), time.time(), pid, class_name, source, kept))
        self.seq += n
        self._kept += len(kept)
        self._trim()
        if n <= LOG_EACH:
            for handle, kind in findings:
                self._line(pid, Counter((kind,)), "audit: %s of handle %#x in class '%s' by pid %d (%s)",
                           kind, handle, class_name, pid, source)
        else:
            kinds = Counter(kind for _, kind in findings)
            shown = ", ".join(f"{handle:#x}" for handle, _ in findings[:SHOWN_HANDLES])
            self._line(pid, kinds, "audit: %d handles refused in class '%s' by pid %d (%s): %s; first %s",
                       n, class_name, pid, source, _kinds_text(kinds), shown)
        return self.seq

    def _trim(self) -> None:
        """Drop the oldest findings past the capacity; the oldest batch may lose only its head."""
        while self._kept > self.capacity:
            oldest = self._batches[0]
            excess = self._kept - self.capacity
            if excess >= oldest.kept:
                self._batches.popleft()
                self._kept -= oldest.kept
            else:
                oldest.dropped += excess
                self._kept -= excess

    def since(self, seq: int, limit: int) -> list[list]:
        """Findings with a sequence number above ``seq``, oldest first, at most ``limit``, as wire lists.

        Each is ``[seq, time, pid, class, handle, kind, source]``.
        """
        out: list[list] = []
        for b in self._batches:
            if len(out) >= limit:
                break
            skip = max(b.dropped, seq + 1 - b.first)
            for i, (handle, kind) in enumerate(b.findings[skip:skip + limit - len(out)], b.first + skip):
                out.append([i, b.time, b.pid, b.class_name, handle, kind, b.source])
        return out

    def forget(self, pid: int) -> None:
        """A client left: log what its budget kept quiet, and drop the budget."""
        budget = self._budgets.pop(pid, None)
        if budget is not None and budget.quiet:
            _log_quiet(pid, budget)

    def _line(self, pid: int, kinds: Counter, fmt: str, *args) -> None:
        """Log one line for findings of ``kinds`` (a count each), within the client's budget; else count them."""
        now = self._clock()
        budget = self._budgets.get(pid)
        if budget is None:
            budget = self._budgets[pid] = _Budget(now)
        elif now - budget.window >= 1.0:
            if budget.quiet:
                _log_quiet(pid, budget)
            budget.window, budget.lines = now, 0
            budget.quiet.clear()
        if budget.lines < LINES_PER_SECOND:
            budget.lines += 1
            log.warning(fmt, *args)
        else:
            budget.quiet.update(kinds)


def _kinds_text(kinds: Counter) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())


def _log_quiet(pid: int, budget: _Budget) -> None:
    log.warning("audit: %d more findings by pid %d not logged (over %d lines a second): %s; "
                "the counters and `slitterctl audit` keep them", budget.quiet.total(), pid, LINES_PER_SECOND,
                _kinds_text(budget.quiet))
