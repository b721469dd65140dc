"""Fixtures: a real slitterd per test, with its own instance name and socket.

Every daemon is stopped and every segment it may have left is removed in a
finalizer, even when the test fails.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

import slitter
from slitter import address
from slitter._native import ffi, lib

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
        d.stop()  # also removes any segment the daemon left


@pytest.fixture
def heap(daemon):
    with slitter.connect(daemon.address, name="test") as h:
        yield h


def run_slitterd(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``slitterd`` by hand to completion (for what it refuses); its output captured as text."""
    return subprocess.run([sys.executable, "-m", "slitterd", *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd)


def ctl_command(*args: str) -> list[str]:
    """The command line of ``slitterctl *args`` (run from this interpreter, not the installed script)."""
    return [sys.executable, "-c", "import sys; from slitterd.ctl import main; sys.exit(main())", *args]


def ctl(*args: str, **kw) -> subprocess.CompletedProcess:
    """Run ``slitterctl *args`` to completion; its output captured as text."""
    return subprocess.run(ctl_command(*args), capture_output=True, text=True, timeout=60, cwd="/", **kw)


def start_spawned(target, argses) -> tuple[list, object]:
    """Start ``target(*args, queue)`` in a fresh "spawn" process for each ``args``; (processes, queue)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, queue)) for args in argses]
    for p in procs:
        p.start()
    return procs, queue


def collect_spawned(procs, queue, timeout: float = 120, join_timeout: float = 60) -> list:
    """One result from ``queue`` per process (each within ``timeout``), then join them all."""
    results = [queue.get(timeout=timeout) for _ in procs]
    for p in procs:
        p.join(join_timeout)
    return results


def run_spawned(target, argses, timeout: float = 120, join_timeout: float = 60) -> tuple[list, list]:
    """``start_spawned`` then ``collect_spawned``: (processes, their results)."""
    procs, queue = start_spawned(target, argses)
    return procs, collect_spawned(procs, queue, timeout, join_timeout)


class Forked:
    """A child made by ``fork_child``: its pid, its reports, how it ended."""

    def __init__(self, pid: int, reports: int) -> None:
        self.pid = pid
        self._reports = reports

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n and (chunk := os.read(self._reports, n - len(data))):
            data += chunk
        return data

    def report(self) -> bytes:
        """The child's next report (what it passed to ``send``); AssertionError if it raised or exited first."""
        head = self._read(5)
        if len(head) < 5:
            self.wait()  # it has exited: reap it
            raise AssertionError(f"forked child {self.pid} exited without reporting")
        data = self._read(int.from_bytes(head[1:], "little"))
        if head[0]:
            self.wait()
            raise AssertionError(f"forked child {self.pid} raised: {data.decode()}")
        return data

    def wait(self, options: int = 0) -> int:
        """``os.waitpid`` for the child: its status (``os.WUNTRACED``: returns once it stops, too)."""
        _, status = os.waitpid(self.pid, options)
        if not (options and os.WIFSTOPPED(status)):
            os.close(self._reports)
        return status


def thread_class(heap: slitter.Heap, cls: slitter.Class):
    """This thread's magazines and counters of ``cls`` in the heap's rack (binds the thread to the class)."""
    slot = lib.slitter_bind(heap._client, cls.id)
    return ffi.cast("struct slitter_rack *", heap._rack.ptr).threads[slot].classes[cls.id]


def settled_thread_class(heap: slitter.Heap, cls: slitter.Class):
    """``thread_class`` once the daemon has served this thread's last prefetch, which may have grown its
    magazines (it grows them only when it serves one): their ``capacity`` is final until the next one."""
    heap.stats()  # a round trip behind every request the heap sent before it
    return thread_class(heap, cls)


def fork_child(body) -> Forked:
    """Fork; the child runs ``body(send)``, where ``send(data: bytes)`` reports to the parent, and exits:
    status 0 if ``body`` returned, 1 if it raised (the exception is its last report: ``report`` raises it)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1

        def put(kind: int, data: bytes) -> None:
            message = bytes([kind]) + len(data).to_bytes(4, "little") + data
            while message:
                message = message[os.write(w, message):]

        try:
            os.close(r)
            body(lambda data: put(0, data))
            code = 0
        except BaseException as exc:  # report, never raise in the child: it would run the parent's test
            with contextlib.suppress(BaseException):
                put(1, repr(exc).encode())
        finally:
            os._exit(code)
    os.close(w)
    return Forked(pid, r)


def wait_reclaimed(heap, pid: int, since: float) -> tuple[float, dict]:
    """Poll the daemon every 20 ms until ``pid`` is no longer a client; (latency, stats)."""
    while True:
        stats = heap.stats()
        latency = time.monotonic() - since
        if pid not in {c["pid"] for c in stats["clients"]}:
            return latency, stats
        assert latency < 5, f"pid {pid} still listed {latency:.2f} s after SIGKILL"
        time.sleep(0.02)


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
            self.first_client().close()
        return self

    def first_client(self) -> slitter.Heap:
        """A heap attached as soon as the daemon answers (within 20 s)."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            if os.path.exists(self.address):
                try:
                    return slitter.connect(self.address, timeout=0.5)
                except slitter.DaemonUnavailable:
                    pass
            time.sleep(0.02)
        raise AssertionError("daemon did not start: " + self.log.read_text())

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


@contextlib.contextmanager
def dealer(address: str):
    """A bare DEALER socket connected to the daemon at ``address``: raw frames, no client library."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect("ipc://" + address)
    try:
        yield sock
    finally:
        sock.close(0)
        ctx.term()
