"""slitterd's defaults and flags; slitterctl's commands against a real daemon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ctl, run_slitterd

import slitter
from slitter import address


def test_slitterd_defaults_need_no_config(tmp_path):
    """Only a name: the socket lands in $XDG_RUNTIME_DIR/slitter, the arena is 64 GiB sparse."""
    name = f"defaults-{os.getpid()}"
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "slitterd", "--name", name, "--ephemeral"], env=env,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    sock = tmp_path / "slitter" / f"{name}.sock"
    try:
        deadline = time.monotonic() + 20
        while not sock.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        with slitter.connect(str(sock)) as heap:
            assert heap.stats()["instance"]["arena_bytes"] == 64 << 30
            heap.register_class("d", size=8).allocate()
            committed = heap.stats()["instance"]["committed_bytes"]
            assert committed < 64 << 20, "a sparse arena commits only what runs use"
        assert oct(sock.stat().st_mode & 0o777) == oct(0o600) or sock.stat().st_mode & 0o077 == 0
        seg_modes = [p.stat().st_mode & 0o777 for p in address.segment_paths(name)]
        assert seg_modes == [0o600, 0o600]
    finally:
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=20)[1]
        for p in address.segment_paths(name):
            p.unlink(missing_ok=True)
    assert proc.returncode == 0, err
    assert "serving on" in err and "stopped" in err


def test_slitterd_rejects_bad_flags(tmp_path):
    for args, word in ((["--arena-size", "lots"], "--arena-size"), (["--name", "../etc"], "--name"),
                       (["--arena-size", "1000"], "arena size")):
        r = run_slitterd("--socket", str(tmp_path / "s.sock"), *args, cwd=tmp_path)
        assert r.returncode != 0 and word in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr


def test_slitterctl_stats_table_and_json(daemon, heap):
    cls = heap.register_class("order", size=64)
    handles = [cls.allocate() for _ in range(5)]
    table = ctl("--socket", daemon.address, "stats", env={**os.environ, "COLUMNS": "200"})
    assert table.returncode == 0, table.stderr
    for column in ("size", "carved", "live", "cached", "shelved", "free", "allocations", "releases", "refills",
                   "flushes", "errors"):
        assert column in table.stdout
    assert "order" in table.stdout
    data = json.loads(ctl("--socket", daemon.address, "stats", "--json").stdout)
    assert data["classes"]["order"]["live"] == 5
    assert data["classes"]["order"] == heap.stats()["classes"]["order"]
    for h in handles:
        cls.release(h)


def test_slitterctl_classes_clients_ping(daemon, heap):
    heap.register_class("trade", size=1000)
    env = {**os.environ, "COLUMNS": "200"}
    classes = ctl("--socket", daemon.address, "classes", env=env)
    assert classes.returncode == 0 and "trade" in classes.stdout and "1,008" in classes.stdout
    clients = ctl("--socket", daemon.address, "clients", env=env)
    assert clients.returncode == 0 and str(os.getpid()) in clients.stdout and "test" in clients.stdout
    ping = ctl("--socket", daemon.address, "ping")
    assert ping.returncode == 0 and f"pid {daemon.pid}" in ping.stdout and "refill" in ping.stdout


def test_slitterctl_without_daemon_is_one_line_and_exit_1(tmp_path):
    missing = str(tmp_path / "none.sock")
    r = ctl("--socket", missing, "stats")
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and missing in r.stderr and "Traceback" not in r.stderr


def test_client_limit(manual_daemon):
    d = manual_daemon("--ephemeral").start("--max-clients", "2")
    a = slitter.connect(d.address)
    b = slitter.connect(d.address)
    with pytest.raises(slitter.LimitExceeded, match="2 client racks"):
        slitter.connect(d.address)
    a.close()
    with slitter.connect(d.address) as c:
        assert len(c.stats()["clients"]) == 2
    b.close()


def test_slitterctl_top_refreshes(daemon, heap):
    cls = heap.register_class("topped", size=64)
    held = [cls.allocate() for _ in range(3)]
    r = ctl("--socket", daemon.address, "top", "--interval", "0.05", "--count", "3",
            env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    assert "topped" in r.stdout and "clients" in r.stdout and str(os.getpid()) in r.stdout
    for h in held:
        cls.release(h)


def test_slitterctl_top_without_daemon(tmp_path):
    r = ctl("--socket", str(tmp_path / "none.sock"), "top", "--count", "1")
    assert r.returncode == 1 and "Traceback" not in r.stderr
