"""A client that stops waiting for its attach leaves no client attached.

``slitter.connect`` gives up when the daemon does not answer within its
timeout (busy recovering a big instance, overloaded), but the daemon may
have read the ATTACH and answer just too late.  It then made a client the
process never learnt of, which held a rack for as long as the process lived
and kept the shelf from going back to the depots when the other clients
left (found by bench/soak.py's start-up probe; doc/reliability.md, bug 4).
Now the daemon detaches the client when the attach's reply cannot be
delivered (ZMQ_ROUTER_MANDATORY), and the client sends ABANDON with the
attach's nonce, which undoes the attach in whichever order the two arrive.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import secrets
import subprocess
import sys
import termios
import threading
import time

import msgpack
import pytest
import zmq
from conftest import dealer

import slitter
from slitter import address, protocol
from slitter.protocol import ErrorCode, Op


def _ask(sock, op: Op, **args) -> dict:
    sock.send(protocol.pack(protocol.request(op, 1, **args)))
    assert sock.poll(5000), "no reply"
    return msgpack.unpackb(sock.recv(), raw=False)


def _clients(heap: slitter.Heap) -> list[int]:
    return sorted(c["id"] for c in heap.stats()["clients"])


@contextlib.contextmanager
def _daemon_logging_into_a_pipe(tmp_path):
    """A hand-started slitterd whose log goes into a 4 KiB pipe the test reads by hand.

    While nobody reads, the pipe fills and the daemon's loop blocks in its
    next log line: a daemon slow to answer, with no timing to win.
    ``drain()`` reads everything from then on, into ``log``.
    """
    name = f"abandon-{os.getpid()}-{secrets.randbits(24)}"
    sock_path = str(tmp_path / "d.sock")
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    proc = subprocess.Popen([sys.executable, "-m", "slitterd", "--name", name, "--socket", sock_path,
                             "--arena-size", "1G"], stdout=w, stderr=w, stdin=subprocess.DEVNULL, cwd=tmp_path)
    os.close(w)
    log = bytearray()

    def read_all() -> None:
        while chunk := os.read(r, 65536):
            log.extend(chunk)

    reader = threading.Thread(target=read_all, daemon=True)
    try:
        yield sock_path, r, reader.start, log
    finally:
        proc.kill()
        proc.wait(30)
        if not reader.is_alive() and reader.ident is None:
            reader.start()  # to EOF, so that the descriptor can close
        reader.join(30)
        os.close(r)
        for path in address.segment_paths(name):
            path.unlink(missing_ok=True)


PIPE_BYTES = 4096  # one page: a line that does not fit in what is left of it waits for the page to be read


def _unread(fd: int) -> int:
    """Bytes in the pipe that nobody has read."""
    count = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, count, True)
    return count[0]


def test_an_attach_whose_client_stopped_waiting_is_undone(tmp_path):
    """The daemon reads the attach, then stalls before it replies; the client gives up; the attach is undone."""
    with _daemon_logging_into_a_pipe(tmp_path) as (sock_path, pipe, drain, log):
        for _ in range(1000):
            if os.path.exists(sock_path):
                break
            time.sleep(0.02)
        watcher = slitter.connect(sock_path, name="watcher", timeout=30)
        try:
            with dealer(sock_path) as sock:
                def logged(op: Op, **args) -> tuple[dict, int]:
                    """The reply, and the bytes the daemon logged for the request (it logs before replying)."""
                    before = _unread(pipe)
                    reply = _ask(sock, op, **args)
                    return reply, _unread(pipe) - before

                # Fill the pipe's page with log lines, then leave less room in it than the line the daemon
                # logs for the attach below: that line then waits, in the middle of the attach, before the
                # reply, until the test reads the page.
                while PIPE_BYTES - _unread(pipe) > 400:
                    reply, line = logged(Op.ATTACH, pid=os.getpid(), name="filler")
                    logged(Op.DETACH, client=reply["client"], token=reply["token"])
                base = line - len("filler")  # an attach's line without the client's name
                gave_up_line = base + len("gave-up")
                while (room := PIPE_BYTES - _unread(pipe)) >= gave_up_line:
                    name = "f" * max(0, min(64, room - base - gave_up_line // 2))
                    logged(Op.ATTACH, pid=os.getpid(), name=name)
                assert _unread(pipe) > PIPE_BYTES - gave_up_line
            with pytest.raises(slitter.DaemonUnavailable, match="within 0.5 s"):
                slitter.connect(sock_path, name="gave-up", timeout=0.5)
            drain()
            clients = watcher.stats()["clients"]  # behind the attach's reply in the daemon's loop
        finally:
            watcher.close()
    text = log.decode(errors="replace")
    assert f"(pid {os.getpid()}, gave-up) attached, but stopped waiting for the reply" in text, text[-2000:]
    assert [c["name"] for c in clients if c["name"] in ("watcher", "gave-up")] == ["watcher"], clients


def test_a_connect_that_times_out_sends_abandon_with_its_attach_nonce(tmp_path):
    """On the wire: the attach's nonce, then, once the timeout has passed, an ABANDON naming it."""
    sock_path = str(tmp_path / "silent.sock")
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)  # a socket that reads requests and never answers
    router.setsockopt(zmq.LINGER, 0)
    router.bind("ipc://" + sock_path)
    try:
        with pytest.raises(slitter.DaemonUnavailable):
            slitter.connect(sock_path, name="impatient", timeout=0.3)
        got = []
        while router.poll(2000):
            _peer, frame = router.recv_multipart()
            got.append(msgpack.unpackb(frame, raw=False))
    finally:
        router.close(0)
        ctx.term()
    assert [m["op"] for m in got] == ["attach", "abandon"], got
    attach, abandon = got
    assert attach["nonce"] == abandon["nonce"] and attach["nonce"] > 0
    assert attach["pid"] == abandon["pid"] == os.getpid()
    with pytest.raises(slitter.DaemonUnavailable, match="does not exist"):  # no socket: nothing to abandon
        slitter.connect(str(tmp_path / "none.sock"), timeout=0.3)


def test_abandon_after_the_attach_detaches_the_client_it_made(daemon, heap):
    nonce = secrets.randbits(64) | 1
    with dealer(daemon.address) as sock:
        attached = _ask(sock, Op.ATTACH, pid=os.getpid(), name="late", nonce=nonce)
        assert attached["ok"] and attached["client"] in _clients(heap)
        # Another pid cannot abandon it, nor can the right pid with another nonce.
        assert _ask(sock, Op.ABANDON, pid=os.getppid(), nonce=nonce) == {"v": 1, "id": 1, "ok": True,
                                                                          "detached": False}
        assert _ask(sock, Op.ABANDON, pid=os.getpid(), nonce=nonce ^ 2)["detached"] is False
        assert attached["client"] in _clients(heap)
        assert _ask(sock, Op.ABANDON, pid=os.getpid(), nonce=nonce)["detached"] is True
        assert attached["client"] not in _clients(heap)
        # Its token is void: the client is gone, not just hidden.
        gone = _ask(sock, Op.DETACH, client=attached["client"], token=attached["token"])
        assert gone["ok"] is False and gone["code"] == ErrorCode.UNKNOWN_CLIENT


def test_an_attach_that_arrives_after_its_abandon_is_refused(daemon, heap):
    nonce = secrets.randbits(64) | 1
    before = _clients(heap)
    with dealer(daemon.address) as sock:
        assert _ask(sock, Op.ABANDON, pid=os.getpid(), nonce=nonce)["detached"] is False
        refused = _ask(sock, Op.ATTACH, pid=os.getpid(), name="too-late", nonce=nonce)
        assert refused["ok"] is False and refused["code"] == ErrorCode.INVALID_FIELD
        assert "abandoned" in refused["error"]
        assert _clients(heap) == before
        # Remembered once: the same nonce again is an attach like any other (a client picks a new one).
        again = _ask(sock, Op.ATTACH, pid=os.getpid(), name="again", nonce=nonce)
        assert again["ok"] and again["client"] in _clients(heap)
        assert _ask(sock, Op.DETACH, client=again["client"], token=again["token"])["ok"]


def test_an_attach_without_a_nonce_cannot_be_abandoned(daemon, heap):
    """Nonce 0 (a client that sends none) matches no ABANDON, which must name a nonce of at least 1."""
    with dealer(daemon.address) as sock:
        attached = _ask(sock, Op.ATTACH, pid=os.getpid(), name="plain")
        refused = _ask(sock, Op.ABANDON, pid=os.getpid(), nonce=0)
        assert refused["ok"] is False and refused["code"] == ErrorCode.INVALID_FIELD
        assert attached["client"] in _clients(heap)
        assert _ask(sock, Op.DETACH, client=attached["client"], token=attached["token"])["ok"]


def test_abandon_finds_an_attach_made_before_the_daemon_restarted(manual_daemon):
    """The nonce is kept in the owner table: the restarted daemon adopts the client with it."""
    d = manual_daemon().start()
    nonce = secrets.randbits(64) | 1
    with dealer(d.address) as sock:
        attached = _ask(sock, Op.ATTACH, pid=os.getpid(), name="before-restart", nonce=nonce)
        assert attached["ok"]
    d.kill()
    d.start()
    with d.first_client() as heap:
        assert attached["client"] in _clients(heap)  # adopted: this process still runs
        with dealer(d.address) as sock:
            assert _ask(sock, Op.ABANDON, pid=os.getpid(), nonce=nonce)["detached"] is True
        assert attached["client"] not in _clients(heap)
