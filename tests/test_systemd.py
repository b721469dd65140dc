"""systemd integration: the sd_notify protocol against a real datagram socket, SIGHUP reload, deploy/ files."""

from __future__ import annotations

import configparser
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import slitter
from slitter import address
from slitterd.notify import Notifier

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNIT = DEPLOY / "slitterd.service"


class NotifyListener:
    """The service manager's end: a bound AF_UNIX datagram socket."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.received: list[list[str]] = []

    def until(self, line: str, timeout: float = 20.0) -> list[list[str]]:
        """Receive datagrams until one holds ``line``; returns those received meanwhile."""
        got: list[list[str]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                msg = self.sock.recv(4096).decode().split("\n")
            except TimeoutError:
                break
            got.append(msg)
            self.received.append(msg)
            if line in msg:
                return got
        raise AssertionError(f"no {line} within {timeout} s; got {got}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notified_daemon(tmp_path):
    """Start slitterd with NOTIFY_SOCKET and WATCHDOG_USEC=400000 (a ping every 0.2 s) set."""
    started: list[tuple[subprocess.Popen, str, NotifyListener]] = []

    def start(*args: str) -> tuple[subprocess.Popen, NotifyListener, Path]:
        listener = NotifyListener(str(tmp_path / "notify.sock"))
        name = f"sd-{os.getpid()}-{time.monotonic_ns() % 10**9}"
        log = tmp_path / "d.log"
        env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000"}
        with open(log, "wb") as f:
            proc = subprocess.Popen([sys.executable, "-m", "slitterd", "--name", name, "--ephemeral",
                                     "--socket", str(tmp_path / "d.sock"), "--arena-size", "1G", *args],
                                    env=env, stdout=f, stderr=f, stdin=subprocess.DEVNULL, cwd=tmp_path)
        started.append((proc, name, listener))
        return proc, listener, log

    yield start
    for proc, name, listener in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        listener.close()
        for path in address.segment_paths(name):
            path.unlink(missing_ok=True)


def test_ready_watchdog_stopping(notified_daemon, tmp_path):
    proc, listener, log = notified_daemon()
    before_ready = listener.until("READY=1")
    assert before_ready[-1][0] == "READY=1" and before_ready[-1][1].startswith("STATUS=serving instance")
    with slitter.connect(str(tmp_path / "d.sock"), timeout=2):  # READY=1 means serving
        pass
    t0 = time.monotonic()
    listener.until("WATCHDOG=1", timeout=2)
    listener.until("WATCHDOG=1", timeout=2)
    assert time.monotonic() - t0 < 1.5, "a ping every 0.2 s (half of WATCHDOG_USEC)"
    proc.send_signal(signal.SIGTERM)
    listener.until("STOPPING=1", timeout=10)
    assert proc.wait(20) == 0, log.read_text()
    assert sum(m == ["WATCHDOG=1"] for m in listener.received) >= 2


def test_sighup_registers_new_classes_and_logs_conflicts(notified_daemon, tmp_path):
    conf = tmp_path / "slitterd.toml"
    conf.write_text('shelf_idle = 3600\n[[classes]]\nname = "order"\nsize = 64\n')
    proc, listener, log = notified_daemon("--config", str(conf))
    listener.until("READY=1")
    with slitter.connect(str(tmp_path / "d.sock"), name="hup") as heap:
        assert set(heap.stats()["classes"]) == {"order"}
        conf.write_text('shelf_idle = 0.2\n'  # applied at once
                        '[[classes]]\nname = "order"\nsize = 128\n\n'  # conflicts: logged, not fatal
                        '[[classes]]\nname = "fresh"\nsize = 32\nzero_init = true\ncap = 500\n')
        proc.send_signal(signal.SIGHUP)
        listener.until("RELOADING=1", timeout=10)
        listener.until("READY=1", timeout=10)
        classes = heap.stats()["classes"]
        assert set(classes) == {"order", "fresh"}
        assert classes["order"]["size"] == 64
        assert (classes["fresh"]["size"], classes["fresh"]["zero_init"], classes["fresh"]["cap"]) == (32, True, 500)
        order = heap.register_class("order", size=64)
        order.release_many(order.allocate_many(2 * heap._classes_table[order.id].mag_capacity))
        assert heap.stats()["classes"]["order"]["shelved"] > 0  # one full magazine waits on the shelf
        deadline = time.monotonic() + 20  # the new shelf_idle sweeps it back within 0.4 s; the old one, in an hour
        while heap.stats()["classes"]["order"]["shelved"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert heap.stats()["classes"]["order"]["shelved"] == 0
        conf.write_text("max_clients = 0\n")  # a broken file is refused; the daemon keeps serving
        proc.send_signal(signal.SIGHUP)
        listener.until("RELOADING=1", timeout=10)
        listener.until("READY=1", timeout=10)
        assert heap.stats()["classes"].keys() == {"order", "fresh"}
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    text = log.read_text()
    assert "reload: declared class 'order' not registered: class 'order' exists with size 64" in text
    assert "registered class 'fresh'" in text and "reloaded" in text
    assert "reload refused, keeping the running configuration" in text and "max_clients" in text
    assert f"(pid {os.getpid()}, hup) attached" in text and f"(pid {os.getpid()}, hup) detached" in text
    assert "Traceback" not in text


def test_notifier_abstract_socket_and_watchdog_rules():
    name = f"slitter-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        server.settimeout(5)
        n = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "1000000"})
        assert n.enabled and n.watchdog_interval == 0.5 and n.poll_ms(200) == 200
        assert n.ready("up")
        assert server.recv(100) == b"READY=1\nSTATUS=up"
        n.tick(100.0)
        n.tick(100.2)  # not due yet
        n.tick(100.6)
        assert server.recv(100) == b"WATCHDOG=1" and server.recv(100) == b"WATCHDOG=1"
        assert n.reloading()
        assert server.recv(100).startswith(b"RELOADING=1\nMONOTONIC_USEC=")
        n.close()
    assert not n.send("READY=1")
    # the watchdog is for WATCHDOG_PID only; a short one shortens the poll
    assert Notifier({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}).watchdog_interval is None
    short = Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "100000"})
    assert short.poll_ms(200) == 25
    short.close()
    quiet = Notifier({})
    assert not quiet.enabled and not quiet.ready() and quiet.poll_ms(200) == 200
    quiet.tick()
    gone = Notifier({"NOTIFY_SOCKET": "/nonexistent/notify.sock"})
    assert not gone.ready(), "a lost notification is not an error"
    gone.close()


def unit() -> configparser.ConfigParser:
    p = configparser.ConfigParser(strict=True, interpolation=None)
    p.optionxform = str  # keys are case-sensitive
    p.read_string(UNIT.read_text())
    return p


def test_unit_file_settings():
    s = unit()["Service"]
    expected = {"Type": "notify", "NotifyAccess": "main", "WatchdogSec": "10", "Restart": "on-failure",
                "User": "slitter", "Group": "slitter", "RuntimeDirectory": "slitter",
                "RuntimeDirectoryPreserve": "yes",
                "ExecStart": "/usr/local/bin/slitterd --config /etc/slitter/slitterd.toml",
                "ExecReload": "/bin/kill -HUP $MAINPID", "ProtectSystem": "strict", "ProtectHome": "yes",
                "PrivateTmp": "yes", "NoNewPrivileges": "yes", "PrivateDevices": "yes"}
    assert {k: s.get(k) for k in expected} == expected
    for forbidden in ("DynamicUser", "RemoveIPC", "MemoryDenyWriteExecute"):
        assert forbidden not in s, f"{forbidden}= would remove the arena's segments or break cffi"
    assert unit()["Install"]["WantedBy"] == "multi-user.target"
    sysusers = (DEPLOY / "sysusers.d" / "slitter.conf").read_text()
    assert any(line.split()[:2] == ["u", "slitter"] for line in sysusers.splitlines() if not line.startswith("#"))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed on this host")
def test_unit_file_verifies(tmp_path):
    """systemd-analyze verify, with ExecStart pointed at the installed slitterd (it checks the binary exists)."""
    installed = Path(sys.executable).parent / "slitterd"
    assert installed.exists()
    copy = tmp_path / "slitterd.service"
    copy.write_text(UNIT.read_text().replace("/usr/local/bin/slitterd", str(installed)))
    r = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    # verify exits 0 on unknown keys and bad values too, but says so: no output is the pass
    problems = [line for line in (r.stdout + r.stderr).splitlines() if "slitterd.service" in line]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers is not installed on this host")
def test_sysusers_file_creates_the_user(tmp_path):
    (tmp_path / "etc").mkdir()
    r = subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(DEPLOY / "sysusers.d" / "slitter.conf")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text()
    assert passwd.startswith("slitter:x:") and passwd.rstrip().endswith(":/:/usr/sbin/nologin")
    assert (tmp_path / "etc" / "group").read_text().startswith("slitter:x:")
