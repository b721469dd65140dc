"""Fixtures: a real slitterd per test, with its own instance name and socket.

Every daemon is stopped and every segment it may have left is removed in a
finalizer, even when the test fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import slitter
from slitter import address

# Spawned children import their targets from tests/workers.py by module name.
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def daemon():
    """A running ephemeral slitterd (spawn_daemon object: .address, .name, .pid)."""
    d = slitter.spawn_daemon(arena_size="2G")
    d.start()
    try:
        yield d
    finally:
        d.stop()
        for path in address.segment_paths(d.name):
            path.unlink(missing_ok=True)


@pytest.fixture
def heap(daemon):
    with slitter.connect(daemon.address, name="test") as h:
        yield h


class DaemonProcess:
    """A slitterd started by hand (not ephemeral) so tests can kill and inspect it."""

    def __init__(self, tmp: Path, name: str, *args: str) -> None:
        self.name = name
        self.address = str(tmp / "d.sock")
        self.log = tmp / "d.log"
        self.args = args
        self.proc: subprocess.Popen | None = None

    def start(self, *extra: str, wait: bool = True) -> DaemonProcess:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "slitterd", "--name", self.name, "--socket", self.address,
                 "--arena-size", "1G", *self.args, *extra],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=self.log.parent)
        if wait:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, self.log.read_text()
                if os.path.exists(self.address):
                    try:
                        slitter.connect(self.address, timeout=0.5).close()
                        return self
                    except slitter.DaemonUnavailable:
                        pass
                time.sleep(0.02)
            raise AssertionError("daemon did not start: " + self.log.read_text())
        return self

    def kill(self, sig: int = signal.SIGKILL) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(20)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for path in address.segment_paths(self.name):
            path.unlink(missing_ok=True)


@pytest.fixture
def manual_daemon(tmp_path_factory, request):
    """Factory for hand-started daemons; all killed and their segments removed at the end."""
    made: list[DaemonProcess] = []

    def make(*args: str) -> DaemonProcess:
        tmp = Path(tmp_path_factory.mktemp("d", numbered=True))
        d = DaemonProcess(tmp, f"t{os.getpid()}-{len(made)}-{time.monotonic_ns() % 10**9}", *args)
        made.append(d)
        return d

    yield make
    for d in made:
        d.cleanup()
