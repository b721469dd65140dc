"""Prometheus exposition: a real daemon scraped over real HTTP, compared with heap.stats().

Also: the collector never raises into the exporter, nothing listens on TCP
without --metrics, and doc/operations.md lists every metric.
"""

from __future__ import annotations

import os
import re
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import run_slitterd
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import slitter
from slitter import address
from slitterd.metrics import REFRESH_SECONDS, Metrics, Snapshot, families

DOC = Path(__file__).resolve().parent.parent / "doc" / "operations.md"


def metrics_port(log: Path, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", log.read_text())
        if m:
            return int(m.group(1))
        time.sleep(0.02)
    raise AssertionError("no metrics line in the log: " + log.read_text())


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """Every sample of one scrape, keyed by (sample name, labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.status == 200
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def expected_samples(stats: dict, pid: int) -> dict[tuple[str, frozenset], float]:
    """What the scrape must say about each class and this client, from heap.stats()."""
    want = {}
    for name, c in stats["classes"].items():
        cls = frozenset({("class", name)})
        for state in ("live", "cached", "free"):
            want[("slitter_class_objects", cls | {("state", state)})] = c[state]
        want[("slitter_class_carved_objects", cls)] = c["carved"]
        want[("slitter_class_object_size_bytes", cls)] = c["size"]
        want[("slitter_class_allocations_total", cls)] = c["allocations"]
        want[("slitter_class_releases_total", cls)] = c["releases"]
        want[("slitter_class_refills_total", cls)] = c["refills"]
        want[("slitter_class_flushes_total", cls)] = c["flushes"]
        want[("slitter_class_shelved_objects", cls)] = c["shelved"]
        want[("slitter_class_shelf_puts_total", cls)] = c["shelf_puts"]
        want[("slitter_class_shelf_takes_total", cls)] = c["shelf_takes"]
        if c["cap"]:
            want[("slitter_class_cap_objects", cls)] = c["cap"]
        for kind, n in c["errors"].items():
            want[("slitter_release_errors_total", cls | {("kind", kind)})] = n
    want[("slitter_clients", frozenset())] = stats["instance"]["clients"]
    want[("slitter_arena_bytes", frozenset({("state", "committed")}))] = stats["instance"]["committed_bytes"]
    for client in stats["clients"]:
        if client["pid"] == pid:
            for name, f in client["classes"].items():
                labels = frozenset({("client", str(client["id"])), ("pid", str(pid)),
                                    ("name", client["name"] or ""), ("class", name)})
                want[("slitter_client_live_objects", labels)] = f["live"]
    return want


def test_scrape_matches_stats(manual_daemon):
    d = manual_daemon("--ephemeral").start("--metrics", "127.0.0.1:0")
    port = metrics_port(d.log)
    with slitter.connect(d.address, name="metrics-test") as heap:
        order = heap.register_class("order", size=64, cap=100_000)
        quote = heap.register_class("quote", size=1000, zero_init=True)
        orders = [order.allocate() for _ in range(3000)]  # more than a magazine: refills
        quotes = [quote.allocate() for _ in range(10)]
        for h in orders[:2500]:
            order.release(h)  # more than a magazine: flushes
        quote.release(quotes[0])
        with pytest.raises(slitter.DoubleFree):
            quote.release(quotes[0])
        stats = heap.stats()
        want = expected_samples(stats, os.getpid())
        assert stats["classes"]["order"]["refills"] > 0 and stats["classes"]["quote"]["errors"]["double_free"] == 1
        assert ("slitter_class_cap_objects", frozenset({("class", "order")})) in want
        deadline = time.monotonic() + 10 * REFRESH_SECONDS + 5
        while True:  # the snapshot is at most REFRESH_SECONDS (+ a tick) old
            got = scrape(port)
            wrong = {k: (v, got.get(k)) for k, v in want.items() if got.get(k) != v}
            if not wrong or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert not wrong, wrong
        assert got[("slitter_class_carved_objects", frozenset({("class", "order")}))] == (
            stats["classes"]["order"]["live"] + stats["classes"]["order"]["cached"]
            + stats["classes"]["order"]["free"])
        assert got[("slitter_metrics_snapshot_age_seconds", frozenset())] < 3
        assert got[("slitter_max_clients", frozenset())] == 64
        assert got[("slitter_arena_bytes", frozenset({("state", "size")}))] == 1 << 30
        for h in orders[2500:] + quotes[1:]:
            (order if h in orders else quote).release(h)
    assert "attached" in d.log.read_text()


def _listening_tcp_inodes() -> dict[int, str]:
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                if parts[3] == "0A":  # LISTEN
                    out[int(parts[9])] = parts[1]
    return out


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def test_nothing_listens_on_tcp_unless_asked(daemon, manual_daemon):
    assert not _socket_inodes(daemon.pid) & set(_listening_tcp_inodes())
    d = manual_daemon("--ephemeral").start("--metrics", "0")  # a port alone binds to loopback
    port = metrics_port(d.log)
    listening = {inode: addr for inode, addr in _listening_tcp_inodes().items()
                 if inode in _socket_inodes(d.proc.pid)}
    assert list(listening.values()) == [f"0100007F:{port:04X}"]


def test_metrics_port_in_use_is_one_error_and_no_segments(tmp_path):
    name = f"mbusy-{os.getpid()}"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run_slitterd("--name", name, "--socket", str(tmp_path / "s.sock"), "--arena-size", "1G",
                         "--metrics", f"127.0.0.1:{port}", cwd=tmp_path)
    leftover = [p for p in address.segment_paths(name) if p.exists()]
    for p in leftover:
        p.unlink()
    assert r.returncode == 1, r.stderr
    assert f"cannot serve on metrics address 127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr
    assert not leftover, "a daemon that never served must not leave its segments"
    assert not (tmp_path / "s.sock").exists()


class _Broken:
    name = "broken"

    def instance_stats(self):
        raise RuntimeError("boom")

    class_stats = client_stats = instance_stats


def _snapshot(**over) -> Snapshot:
    c = {"size": 8, "stride": 8, "carved": 10, "live": 5, "cached": 3, "free": 2, "allocations": 7, "releases": 2,
         "refills": 1, "flushes": 0, "errors": {"double_free": 1}, "runs": 1, "reserved_bytes": 65536, "cap": 100}
    fields = {"taken": time.monotonic(), "classes": {"a": c},
              "instance": {"arena_bytes": 1 << 30, "spans_used": 2, "committed_bytes": 4096, "clients": 1,
                           "departed": [{"pid": 41, "name": "w", "live": {"a": 2}}]},
              "clients": ({"id": 1, "pid": 42, "name": None, "classes": {"a": {"live": 5, "cached": 3}}},),
              "max_clients": 4}
    fields.update(over)
    return Snapshot(**fields)


def test_collector_survives_a_failing_instance_and_a_bad_snapshot(caplog):
    metrics = Metrics(_Broken())
    metrics.refresh(force=True)  # logs, never raises
    assert metrics.snapshot is None and "reading the figures failed" in caplog.text
    assert b"slitter_" not in generate_latest(metrics.registry)  # nothing to say yet, and no error
    metrics.snapshot = _snapshot(classes={"a": {"size": 8}})  # a snapshot missing figures
    text = generate_latest(metrics.registry).decode()  # the scrape still answers
    assert "slitter_info" in text and "building the exposition failed" in caplog.text
    metrics.snapshot = good = _snapshot()
    metrics.refresh(force=True)
    assert metrics.snapshot is good, "a failed refresh keeps the last snapshot"
    text = generate_latest(metrics.registry).decode()
    assert 'slitter_class_cap_objects{class="a"} 100.0' in text
    assert 'slitter_client_live_objects{class="a",client="1",name="",pid="42"} 5.0' in text
    assert 'slitter_departed_client_live_objects{class="a",name="w",pid="41"} 2.0' in text


def test_every_metric_is_documented():
    doc = DOC.read_text()
    names = [fam.name for fam in families(_snapshot(), "x", 0.0)]
    assert len(names) > 15
    missing = [n for n in names if n not in doc]
    assert not missing, f"doc/operations.md does not mention {missing}"
