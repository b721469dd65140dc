"""Error policies: raise (default), log (refuse, record, continue), abort (record, SIGABRT)."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import textwrap

import pytest

import slitter


def test_raise_is_the_default(heap):
    cls = heap.register_class("r", size=32)
    assert cls.policy == "raise" and heap.policy is None
    with pytest.raises(slitter.ForeignAddress):
        cls.release(16)


def test_log_policy_per_class_refuses_records_and_continues(heap, caplog):
    cls = heap.register_class("logged", size=32, policy="log")
    h = cls.allocate()
    cls.release(h)
    with caplog.at_level(logging.ERROR, logger="slitter"):
        assert cls.release(h) is None  # no exception
    assert "DoubleFree" in caplog.text and hex(h) in caplog.text and "'logged'" in caplog.text
    assert heap.audit()["entries"][-1][5] == "double_free"
    assert heap.stats()["classes"]["logged"]["errors"]["double_free"] == 1
    assert len({cls.allocate() for _ in range(2)}) == 2  # refused: h is not cached twice


def test_class_policy_is_seen_by_every_client_and_set_once(daemon, heap):
    heap.register_class("p", size=32, policy="log")
    with slitter.connect(daemon.address) as other:
        assert other.register_class("p", size=32).policy == "log"
        with pytest.raises(slitter.ClassConflict, match="policy"):
            other.register_class("p", size=32, policy="abort")
    with pytest.raises(ValueError):
        heap.register_class("q", size=32, policy="ignore")


def test_client_policy_overrides_the_class(daemon):
    with slitter.connect(daemon.address, policy="log") as heap:
        cls = heap.register_class("strict", size=32, policy="raise")
        cls.release(16)  # logged, not raised
    with slitter.connect(daemon.address) as heap:
        with pytest.raises(slitter.ForeignAddress):
            heap.register_class("strict", size=32).release(16)
        assert heap.stats()["classes"]["strict"]["errors"]["foreign_address"] == 2


ABORT = textwrap.dedent("""
    import slitter, sys
    heap = slitter.connect(sys.argv[1], policy=sys.argv[2] or None)
    cls = heap.register_class("fatal", size=32, policy="abort")
    h = cls.allocate()
    cls.release(h)
    cls.release(h)
    print("survived")
    """)


def test_abort_policy_records_then_sigabrts(daemon, heap):
    r = subprocess.run([sys.executable, "-c", ABORT, daemon.address, ""], capture_output=True, text=True,
                       timeout=60, cwd="/")
    assert r.returncode == -signal.SIGABRT
    assert "survived" not in r.stdout
    assert "DoubleFree" in r.stderr and "'fatal'" in r.stderr and "aborting" in r.stderr
    assert heap.audit()["entries"][-1][3:6:2] == ["fatal", "double_free"]
    # the daemon reclaimed the aborted client and carries on
    assert heap.register_class("fatal", size=32).allocate()


def test_client_log_policy_overrides_class_abort(daemon):
    r = subprocess.run([sys.executable, "-c", ABORT, daemon.address, "log"], capture_output=True, text=True,
                       timeout=60, cwd="/")
    assert r.returncode == 0 and "survived" in r.stdout


def test_daemon_default_policy_applies_to_classes_without_one(manual_daemon):
    d = manual_daemon("--ephemeral").start("--error-policy", "log")
    with slitter.connect(d.address) as heap:
        plain = heap.register_class("plain", size=16)
        strict = heap.register_class("strict", size=16, policy="raise")
        assert plain.policy == "log" and strict.policy == "raise"
        plain.release(16)  # logged
        with pytest.raises(slitter.ForeignAddress):
            strict.release(16)
