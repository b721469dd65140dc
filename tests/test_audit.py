"""The frees-audit and the audit log: findings are refused, recorded, counted and shown."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time

import pytest
from conftest import ctl, ctl_command

import slitter
from slitter._native import ffi, lib


def test_fast_path_refusals_reach_the_audit_log(heap):
    order = heap.register_class("order", size=64)
    trade = heap.register_class("trade", size=128)
    h = order.allocate()
    for bad in (lambda: trade.release(h), lambda: order.release(h + 8), lambda: order.release(7),
                lambda: order.release(1 << 80)):
        with pytest.raises(slitter.ReleaseError):
            bad()
    order.release(h)
    with pytest.raises(slitter.DoubleFree):
        order.release(h)
    log = heap.audit()
    entries = log["entries"]
    assert [(e[3], e[5], e[6]) for e in entries] == [
        ("trade", "class_mismatch", "release"), ("order", "interior_pointer", "release"),
        ("order", "foreign_address", "release"), ("order", "foreign_address", "release"),
        ("order", "double_free", "release")]
    assert entries[0][4] == h and entries[1][4] == h + 8 and entries[3][4] == 2**64 - 1
    assert all(e[2] == os.getpid() for e in entries)
    assert log["counters"]["order"]["foreign_address"] == 2  # the non-u64 one is counted too
    assert log["counters"]["order"]["double_free"] == 1
    assert log["counters"]["trade"]["class_mismatch"] == 1
    assert heap.stats()["classes"]["order"]["errors"] == log["counters"]["order"]


def test_audit_since_returns_only_newer_entries(heap):
    cls = heap.register_class("c", size=16)
    for _ in range(3):
        with pytest.raises(slitter.ForeignAddress):
            cls.release(16)
    first = heap.audit()
    assert first["next"] == 3 and len(first["entries"]) == 3
    assert heap.audit(since=2)["entries"][0][0] == 3
    assert heap.audit(since=3)["entries"] == []
    assert len(heap.audit(limit=2)["entries"]) == 2


def test_flush_audit_refuses_a_corrupted_rack(heap):
    """A client that scribbles on its own release magazine cannot poison the depot."""
    good = heap.register_class("good", size=64)
    other = heap.register_class("other", size=64)
    live_other = other.allocate()
    h = good.allocate()
    good.release(h)  # binds the thread; h sits in the allocation magazine
    slot = lib.slitter_bind(heap._client, good.id)
    tc = ffi.cast("struct slitter_rack *", heap._rack.ptr).threads[slot].classes[good.id]
    forged = [h, h, h + 8, 12345, live_other]
    # h is cached (not live), so a flush of it twice is a duplicate; the rest are wrong outright.
    tc.alloc_count = 0
    for i, value in enumerate(forged):
        tc.release[i] = value
    tc.release_count = len(forged)
    heap._flush(good, slot)
    found = [(e[4], e[5], e[6]) for e in heap.audit()["entries"]]
    assert (h, "double_free", "flush") in found  # the second copy
    assert (h + 8, "interior_pointer", "flush") in found
    assert (12345, "foreign_address", "flush") in found
    assert (live_other, "class_mismatch", "flush") in found
    stats = heap.stats()["classes"]["good"]
    assert stats["free"] == 1  # exactly one copy of h went back
    cap = heap._classes_table[good.id].mag_capacity  # past the magazines the first refills fill
    assert [good.allocate() for _ in range(4 * cap + 64)].count(h) == 1  # and it is handed out once
    assert stats["errors"]["double_free"] == 1 and stats["errors"]["interior_pointer"] == 1
    other.release(live_other)  # the forged flush did not free another class's live object


def test_flush_of_a_live_object_is_refused(heap):
    cls = heap.register_class("live", size=64)
    h = cls.allocate()
    cls.release(cls.allocate())
    slot = lib.slitter_bind(heap._client, cls.id)
    tc = ffi.cast("struct slitter_rack *", heap._rack.ptr).threads[slot].classes[cls.id]
    tc.release[0] = h
    tc.release_count = 1
    heap._flush(cls, slot)
    assert (h, "corrupt", "flush") in [(e[4], e[5], e[6]) for e in heap.audit()["entries"]]
    cls.release(h)  # still live, still releasable


def test_audit_log_is_bounded_with_exact_counters():
    from slitterd.audit import AuditLog

    small = AuditLog(capacity=3)
    for i in range(5):
        small.record(1, "x", i, "double_free", "release")
    assert [e[4] for e in small.since(0, 10)] == [2, 3, 4] and small.dropped == 2 and small.seq == 5


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _audit_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("audit:")]


def test_a_big_batch_of_findings_is_one_log_line(caplog):
    from slitterd.audit import LOG_EACH, AuditLog

    audit = AuditLog(clock=_Clock())
    findings = [(0x1000 + i, "double_free" if i % 3 else "foreign_address") for i in range(300)]
    with caplog.at_level("WARNING", logger="slitterd"):
        audit.record_many(42, "order", findings, "flush")
        audit.record_many(42, "order", findings[:LOG_EACH], "flush")  # a small batch: a line each
    lines = _audit_lines(caplog)
    assert len(lines) == 1 + LOG_EACH
    assert lines[0].startswith("audit: 300 handles refused in class 'order' by pid 42 (flush)")
    assert "200 double_free, 100 foreign_address" in lines[0] and "first 0x1000, 0x1001" in lines[0]
    assert lines[1] == "audit: foreign_address of handle 0x1000 in class 'order' by pid 42 (flush)"
    assert len(audit.since(0, 1000)) == 300 + LOG_EACH  # every finding is an entry

    small = AuditLog(capacity=100, clock=_Clock())
    small.record(1, "x", 1, "corrupt", "release")
    small.record_many(1, "x", findings, "flush")  # bigger than the log: only its newest 100 are kept
    kept = small.since(0, 1000)
    assert small.seq == 301 and small.dropped == 201 and len(kept) == 100
    assert [e[0] for e in kept] == list(range(202, 302)) and [e[4] for e in kept] == [h for h, _ in findings[-100:]]
    small.record(2, "y", 7, "double_free", "release")  # pushes out the oldest kept finding of the batch
    assert small.dropped == 202 and small.since(0, 1)[0][0] == 203
    assert [e[0] for e in small.since(299, 10)] == [300, 301, 302] and small.since(299, 10)[-1][3:] == [
        "y", 7, "double_free", "release"]
    assert [e[0] for e in small.since(250, 3)] == [251, 252, 253] and small.since(302, 10) == []


def test_each_client_gets_a_bounded_number_of_log_lines(caplog):
    from slitterd.audit import LINES_PER_SECOND, AuditLog

    clock = _Clock()
    audit = AuditLog(clock=clock)
    with caplog.at_level("WARNING", logger="slitterd"):
        for i in range(LINES_PER_SECOND + 30):
            audit.record(7, "c", i, "double_free", "release")
        audit.record(8, "c", 1, "interior_pointer", "release")  # another client has its own budget
        assert len(_audit_lines(caplog)) == LINES_PER_SECOND + 1
        clock.now += 1.0  # the next window: what was kept quiet is logged first
        audit.record(7, "c", 99, "class_mismatch", "release")
        lines = _audit_lines(caplog)[LINES_PER_SECOND + 1:]
        assert lines[0].startswith("audit: 30 more findings by pid 7 not logged") and "30 double_free" in lines[0]
        assert lines[1] == "audit: class_mismatch of handle 0x63 in class 'c' by pid 7 (release)"
        for i in range(LINES_PER_SECOND + 5):  # over budget again, then the client leaves
            audit.record(7, "c", i, "double_free", "release")
        audit.forget(7)
        assert _audit_lines(caplog)[-1].startswith("audit: 6 more findings by pid 7 not logged")
        audit.forget(7)  # nothing left to say
        assert _audit_lines(caplog)[-1].startswith("audit: 6 more findings")
    assert audit.seq == 2 * LINES_PER_SECOND + 30 + 5 + 2  # every one of them is an entry


def test_a_garbage_magazine_is_one_log_line_in_the_daemon(manual_daemon):
    """A client that fills its release magazine with garbage costs the daemon one log line, not one a handle."""
    d = manual_daemon("--ephemeral").start()
    with slitter.connect(d.address) as heap:
        cls = heap.register_class("garbage", size=64)
        cls.release(cls.allocate())
        slot = lib.slitter_bind(heap._client, cls.id)
        tc = ffi.cast("struct slitter_rack *", heap._rack.ptr).threads[slot].classes[cls.id]
        n = 500  # the release array holds SLITTER_MAG_CAP handles, whatever the class's capacity
        assert n <= lib.SLITTER_MAG_CAP
        for i in range(n):
            tc.release[i] = 0x10 + 8 * i  # below the arena: every one a foreign address
        tc.release_count = n
        heap._flush(cls, slot)
        assert heap.audit()["counters"]["garbage"]["foreign_address"] == n
    lines = [line for line in d.log.read_text().splitlines() if "audit:" in line]
    assert len(lines) == 1, lines
    assert f"audit: {n} handles refused in class 'garbage'" in lines[0] and f"{n} foreign_address" in lines[0]


def test_a_flush_of_two_magazines_of_garbage_is_answered_with_a_count(heap, caplog):
    """Both magazines full of garbage (2 x SLITTER_MAG_CAP handles): the reply lists the first
    MAX_REFUSED_LISTED and counts them all, so the client can decode it; every one is counted."""
    from slitter.protocol import MAX_REFUSED_LISTED, Op

    cls = heap.register_class("garbage-2", size=64)
    cls.release(cls.allocate())
    slot = lib.slitter_bind(heap._client, cls.id)
    tc = ffi.cast("struct slitter_rack *", heap._rack.ptr).threads[slot].classes[cls.id]
    n = lib.SLITTER_MAG_CAP
    for i in range(n):  # in the guard span before the first run: every one a foreign address
        tc.release[i] = tc.outgoing[i] = 0x10 + 8 * (i % 8000)
    tc.release_count = tc.outgoing_count = n
    reply = heap._call(Op.FLUSH, thread=slot, class_id=cls.id)
    assert (reply["accepted"], reply["refused_total"], len(reply["refused"])) == (0, 2 * n, MAX_REFUSED_LISTED)
    assert reply["refused"][0] == [0x10, "foreign_address"]
    assert heap.audit()["counters"]["garbage-2"]["foreign_address"] == 2 * n
    for i in range(n):  # again through the client's flush, which logs what the reply lists and the rest
        tc.release[i] = 0x10 + 8 * (i % 8000)
    tc.release_count = n
    with caplog.at_level(logging.WARNING, logger="slitter"):
        heap._flush(cls, slot)
    warnings = [r.getMessage() for r in caplog.records if "audit refused" in r.getMessage()]
    assert len(warnings) == MAX_REFUSED_LISTED + 1, len(warnings)
    assert f"refused {n - MAX_REFUSED_LISTED} more handles of class 'garbage-2'" in warnings[-1]


def test_a_client_over_its_line_budget_gets_a_summary_when_it_leaves(manual_daemon):
    """Refusals past the line budget are counted, and the count is logged when the client detaches."""
    from slitterd.audit import LINES_PER_SECOND

    d = manual_daemon("--ephemeral").start()
    n = LINES_PER_SECOND * 5
    with slitter.connect(d.address, policy="log") as heap:
        cls = heap.register_class("noisy", size=64)
        for i in range(n):
            cls.release(16 * (i + 1))  # below the arena: each one reported on its own
        assert heap.audit()["counters"]["noisy"]["foreign_address"] == n
    lines = [line.split("audit: ", 1)[1] for line in d.log.read_text().splitlines() if "audit: " in line]
    one_each = [line for line in lines if line.startswith("foreign_address of handle")]
    quiet = [int(line.split()[0]) for line in lines if "more findings by pid" in line]
    assert quiet, "the findings kept quiet were never summarised"
    assert "more findings by pid" in lines[-1]  # logged when the client left
    assert len(one_each) + sum(quiet) == n  # every finding is on a line or in a count, once


def test_slitterctl_audit_and_follow(daemon, heap):
    cls = heap.register_class("shown", size=64)
    with pytest.raises(slitter.ForeignAddress):
        cls.release(4096)
    out = ctl("--socket", daemon.address, "audit", env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0 and "shown" in out.stdout and "0x1000" in out.stdout and "foreign_address" in out.stdout
    data = json.loads(ctl("--socket", daemon.address, "audit", "--json", env={**os.environ, "COLUMNS": "200"}).stdout)
    assert data["entries"][0][5] == "foreign_address"
    follower = subprocess.Popen(ctl_command("--socket", daemon.address, "audit", "--follow", "--json"),
                                stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        first = json.loads(follower.stdout.readline())
        assert first["handle"] == 4096
        time.sleep(0.2)
        with pytest.raises(slitter.DoubleFree):
            h = cls.allocate()
            cls.release(h)
            cls.release(h)
        second = json.loads(follower.stdout.readline())
        assert second["kind"] == "double_free" and second["class"] == "shown"
    finally:
        follower.kill()
        follower.wait()


@pytest.mark.parametrize("bad", [1 << 48, (1 << 64) - 1, 1 << 64, 1 << 80, -5])
def test_every_refusal_is_counted_once(heap, bad):
    cls = heap.register_class("counted", size=16)
    with pytest.raises(slitter.ForeignAddress):
        cls.release(bad)
    with pytest.raises(slitter.ForeignAddress):
        cls.release_many([bad])
    assert heap.stats()["classes"]["counted"]["errors"]["foreign_address"] == 2
    assert len(heap.audit()["entries"]) == 2


def test_log_policy_applies_to_batches_of_non_u64(daemon):
    with slitter.connect(daemon.address, policy="log") as heap:
        cls = heap.register_class("batchlog", size=16)
        h = cls.allocate()
        assert cls.release_many([h, 1 << 70]) is None  # refused, logged, nothing released
        assert heap.stats()["classes"]["batchlog"]["live"] == 1


def test_a_report_resent_to_a_silent_daemon_is_recorded_once(daemon, heap):
    """The transport resends a request the daemon leaves unanswered for RETRY_SECONDS, with the
    same id; the refusal a REPORT carries must still reach the audit log once, not twice."""
    import signal
    import threading

    from slitter._transport import Transport

    order = heap.register_class("order", size=64)
    h = order.allocate()
    order.release(h)
    outcome = []

    def double_free() -> None:
        try:
            order.release(h)
        except slitter.SlitterError as exc:
            outcome.append(exc)

    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        releaser = threading.Thread(target=double_free)
        releaser.start()
        time.sleep(Transport.RETRY_SECONDS * 1.5)  # past one resend
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    releaser.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], slitter.DoubleFree)
    assert heap._transport.sent["report"] >= 2  # it was sent again
    entries = [e for e in heap.audit()["entries"] if e[4] == h]
    assert [e[5] for e in entries] == ["double_free"]
