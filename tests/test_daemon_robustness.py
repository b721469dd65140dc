"""The daemon survives its clients' mistakes, limits and hostile bytes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import msgpack
import pytest
from conftest import dealer, run_slitterd

import slitter
from slitter import protocol
from slitter.protocol import ErrorCode


@pytest.fixture
def raw(daemon):
    with dealer(daemon.address) as sock:
        def ask(*frames: bytes) -> dict:
            sock.send_multipart(list(frames))
            assert sock.poll(5000), "no reply"
            return msgpack.unpackb(sock.recv(), raw=False)

        yield ask


BAD = [
    (b"", ErrorCode.MALFORMED),
    (b"\xc1", ErrorCode.MALFORMED),
    (os.urandom(64), None),
    (msgpack.packb([1, 2, 3]), ErrorCode.MALFORMED),
    # A frame holds exactly one message: neither more nor less (the daemon's decoder is reused,
    # so what a bad frame leaves behind must not reach the next request, the PING below).
    (msgpack.packb({"v": 1, "id": 1, "op": "ping"}) + b"\x01", ErrorCode.MALFORMED),
    (msgpack.packb({"v": 1, "id": 1, "op": "ping"})[:-1], ErrorCode.MALFORMED),
    (msgpack.packb({"v": 99, "id": 1, "op": "ping"}), ErrorCode.UNSUPPORTED_VERSION),
    (msgpack.packb({"v": 1, "id": 1, "op": "explode"}), ErrorCode.UNKNOWN_OP),
    (msgpack.packb({"v": 1, "id": -1, "op": "ping"}), ErrorCode.MALFORMED),
    (msgpack.packb({"v": 1, "id": 1, "op": "ping", "extra": 1}), ErrorCode.INVALID_FIELD),
    (msgpack.packb({"v": 1, "id": 1, "op": "attach", "pid": "me", "name": ""}), ErrorCode.INVALID_FIELD),
    (msgpack.packb({"v": 1, "id": 1, "op": "attach", "pid": 2**40, "name": ""}), ErrorCode.INVALID_FIELD),
    (msgpack.packb({"v": 1, "id": 1, "op": "refill", "client": 1, "token": 0, "thread": 0, "class_id": 1}),
     ErrorCode.UNKNOWN_CLIENT),
    (msgpack.packb({"v": 1, "id": 1, "op": "flush", "client": 1, "token": 5, "thread": 99, "class_id": 1}),
     ErrorCode.INVALID_FIELD),
    (msgpack.packb({"v": 1, "id": 1, "op": "register_class", "client": 1, "token": 1, "name": "x",
                    "size": 2**40, "zero_init": False}), ErrorCode.INVALID_FIELD),
    (b"\x00" * (protocol.MAX_MESSAGE_BYTES + 10), None),
]


@pytest.mark.parametrize("frame,code", BAD)
def test_malformed_messages_get_error_replies(daemon, raw, heap, frame, code):
    cls = heap.register_class("bystander", size=64)
    h = cls.allocate()
    if len(frame) > protocol.MAX_MESSAGE_BYTES:
        # over the socket's MAXMSGSIZE: ZeroMQ drops the connection, no reply
        with dealer(daemon.address) as s:
            s.send(frame)
            assert not s.poll(300)
    else:
        reply = raw(frame)
        assert reply["ok"] is False
        assert isinstance(reply["error"], str) and "Traceback" not in reply["error"]
        if code is not None:
            assert reply["code"] == code, reply
    # the daemon carries on, and the bystander's state is intact
    assert raw(protocol.pack(protocol.request(protocol.Op.PING, 7)))["ok"] is True
    cls.release(h)
    assert heap.stats()["classes"]["bystander"]["live"] == 0


def test_extra_frames_are_refused(raw):
    reply = raw(b"a", b"b")
    assert reply["ok"] is False and reply["code"] == ErrorCode.MALFORMED


def test_wrong_token_cannot_act_for_another_client(raw, heap):
    cls = heap.register_class("victim", size=64)
    cls.release(cls.allocate())
    before = heap.stats()["classes"]["victim"]
    for op in ("refill", "flush"):
        msg = {"v": 1, "id": 3, "op": op, "client": heap._client_id, "token": heap._token ^ 1,
               "thread": 0, "class_id": cls.id}
        reply = raw(msgpack.packb(msg))
        assert reply["code"] == ErrorCode.UNKNOWN_CLIENT
    detach = {"v": 1, "id": 4, "op": "detach", "client": heap._client_id, "token": heap._token + 1}
    assert raw(msgpack.packb(detach))["code"] == ErrorCode.UNKNOWN_CLIENT
    assert heap.stats()["classes"]["victim"] == before


def test_exhausted_arena_raises_out_of_memory_and_daemon_serves_on(manual_daemon):
    d = manual_daemon("--ephemeral").start("--arena-size", "64M")
    with slitter.connect(d.address) as heap:
        big = heap.register_class("big", size=1 << 20)
        got = []
        with pytest.raises(slitter.OutOfMemory, match="big"):
            for _ in range(100):
                got.append(big.allocate())
        assert got, "some objects fit before the arena ran out"
        for h in got:
            big.release(h)
        assert len({big.allocate() for _ in range(len(got))}) == len(got)  # recycled objects still work
        with pytest.raises(slitter.OutOfMemory):
            heap.register_class("more", size=1 << 20).allocate()
        assert heap.stats()["classes"]["big"]["live"] == len(got)


def test_client_exit_never_unlinks_the_segments(daemon):
    code = textwrap.dedent(f"""
        import slitter
        from multiprocessing import shared_memory  # the resource tracker is loaded, and must not matter
        heap = slitter.connect({daemon.address!r})
        heap.register_class("x", size=8).allocate()
        """)
    for _ in range(2):
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd="/")
    assert all(p.exists() for p in slitter.address.segment_paths(daemon.name))
    with slitter.connect(daemon.address) as heap:
        assert heap.stats()["classes"]["x"]["live"] == 2


def test_daemon_sigkill_leaves_the_segments(manual_daemon):
    d = manual_daemon().start()
    with slitter.connect(d.address) as heap:
        heap.register_class("x", size=8).allocate()
    d.kill(signal.SIGKILL)
    assert all(p.exists() for p in slitter.address.segment_paths(d.name))


def test_named_instance_keeps_segments_on_sigterm_and_ephemeral_removes_them(manual_daemon):
    named = manual_daemon().start()
    assert named.kill(signal.SIGTERM) == 0
    assert all(p.exists() for p in slitter.address.segment_paths(named.name))
    assert not os.path.exists(named.address)
    eph = manual_daemon("--ephemeral").start()
    assert eph.kill(signal.SIGTERM) == 0
    assert not any(p.exists() for p in slitter.address.segment_paths(eph.name))


def test_restart_over_a_live_daemon_is_refused(manual_daemon, tmp_path):
    d = manual_daemon("--ephemeral").start()
    second = run_slitterd("--name", d.name, "--socket", str(tmp_path / "other.sock"), cwd=tmp_path)
    assert second.returncode != 0 and f"served by pid {d.proc.pid}" in second.stderr


def test_damaged_header_is_refused(manual_daemon, tmp_path):
    d = manual_daemon().start()
    d.kill(signal.SIGKILL)
    meta = slitter.address.segment_paths(d.name)[0]
    with open(meta, "r+b") as f:
        f.write(b"garbage!")
    again = run_slitterd("--name", d.name, "--socket", str(tmp_path / "x.sock"), cwd=tmp_path)
    assert again.returncode != 0 and "bad magic" in again.stderr


FULL_SHM_SCRIPT = textwrap.dedent("""
    import slitter, sys
    with slitter.spawn_daemon(arena_size="1G") as address, slitter.connect(address) as heap:
        cls = heap.register_class("fat", size=256 << 10)
        n = 0
        try:
            while True:
                h = cls.allocate(); heap.view(h)[:] = b"x" * (256 << 10); n += 1
        except slitter.OutOfMemory as exc:
            print("OOM after", n, exc)
        heap.register_class("thin", size=64).allocate()   # the daemon still serves
        print("served")
    """)


def test_full_dev_shm_is_out_of_memory_not_sigbus():
    unshare = ["unshare", "--mount", "--propagation", "private"]
    probe = subprocess.run([*unshare, "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a private mount namespace here: {probe.stderr.decode().strip()}")
    cmd = f"mount -t tmpfs -o size=48m tmpfs /dev/shm && exec {sys.executable} -c \"$0\""
    result = subprocess.run([*unshare, "sh", "-c", cmd, FULL_SHM_SCRIPT], capture_output=True, text=True,
                            timeout=120, cwd="/")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "OOM after" in result.stdout and "served" in result.stdout, result.stdout


def test_message_size_limit_is_configurable(manual_daemon):
    d = manual_daemon("--ephemeral").start("--max-message-bytes", "2048")
    with dealer(d.address) as big:
        big.send(msgpack.packb({"v": 1, "id": 1, "op": "attach", "pid": os.getpid(), "name": "x" * 3000}))
        assert not big.poll(500), "a frame over the limit is dropped unanswered"
    with slitter.connect(d.address) as heap:  # the daemon carries on
        assert heap.register_class("ok", size=8).allocate()
