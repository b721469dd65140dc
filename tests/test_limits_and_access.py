"""Limits raise OutOfMemory for the caller alone; other users cannot attach; no TCP unless asked."""

from __future__ import annotations

import os
import pwd
import stat

import pytest

import slitter
from conftest import fork_child
from slitter import address


def test_class_cap_is_out_of_memory_for_that_class_alone(daemon, heap):
    capped = heap.register_class("capped", size=64, cap=1000)
    other = heap.register_class("free_range", size=64)
    got = []
    with pytest.raises(slitter.OutOfMemory, match="'capped' reached its cap of 1000"):
        while True:
            got.append(capped.allocate())
    assert len(got) == 1000 and len(set(got)) == 1000
    assert [other.allocate() for _ in range(2000)]  # other classes go on
    with slitter.connect(daemon.address) as second:
        with pytest.raises(slitter.OutOfMemory):
            second.register_class("capped", size=64).allocate()
    capped.release(got.pop())
    assert capped.allocate()  # a released object is allocatable again under the cap
    stats = heap.stats()["classes"]["capped"]
    assert stats["cap"] == 1000 and stats["carved"] == 1000 and stats["live"] == 1000


def test_dead_clients_live_objects_are_reported_per_pid(daemon, heap):

    def leaver(send):
        h = slitter.connect(daemon.address, name="leaver")
        cls = h.register_class("kept", size=64)
        for _ in range(7):
            cls.allocate()
        h.close()
        send(b"left")

    forked = fork_child(leaver)
    pid = forked.pid
    assert forked.report() == b"left"
    forked.wait()
    departed = heap.stats()["instance"]["departed"]
    assert {"pid": pid, "name": "leaver", "live": {"kept": 7}} in departed
    assert heap.stats()["classes"]["kept"]["live"] == 7


def _other_user() -> tuple[int, int]:
    try:
        nobody = pwd.getpwnam("nobody")
        return nobody.pw_uid, nobody.pw_gid
    except KeyError:
        return 65534, 65534


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another uid needs root")
def test_another_uid_cannot_attach(daemon):
    sock_mode = stat.S_IMODE(os.stat(daemon.address).st_mode)
    seg_modes = [stat.S_IMODE(p.stat().st_mode) for p in address.segment_paths(daemon.name)]
    assert sock_mode & 0o077 == 0 and seg_modes == [0o600, 0o600]
    uid, gid = _other_user()

    def as_other_user(send):
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        results = []
        try:
            slitter.connect(daemon.address, timeout=1)
            results.append("attached")
        except slitter.DaemonUnavailable as exc:
            results.append(f"unavailable: {exc}")
        for path in address.segment_paths(daemon.name):
            try:
                open(path, "rb").close()
                results.append(f"opened {path}")
            except PermissionError:
                results.append("denied")
        send("\n".join(results).encode())

    forked = fork_child(as_other_user)
    lines = forked.report().decode().splitlines()
    forked.wait()
    assert lines[0].startswith("unavailable:") and daemon.address in lines[0], lines
    assert lines[1:] == ["denied", "denied"], lines


def _listening_tcp_inodes() -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == "0A":  # LISTEN
                inodes.add(cols[9])
    return inodes


def test_nothing_listens_on_tcp_unless_configured(daemon, heap):
    heap.register_class("x", size=8).allocate()
    fds = os.listdir(f"/proc/{daemon.pid}/fd")
    sockets = set()
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{daemon.pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            sockets.add(target[8:-1])
    assert sockets, "the daemon has its ipc socket at least"
    assert not sockets & _listening_tcp_inodes()


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another uid needs root")
def test_group_mode_lets_another_uid_of_the_group_attach(manual_daemon):
    import grp
    import shutil
    import tempfile

    uid, gid = _other_user()
    group = grp.getgrgid(gid).gr_name
    top = tempfile.mkdtemp(prefix="slitter-group-", dir="/tmp")
    os.chmod(top, 0o755)
    try:
        d = manual_daemon("--ephemeral", "--socket-mode", "0660", "--socket-group", group)
        d.address = os.path.join(top, "run", "d.sock")
        d.start("--socket", d.address)
        assert stat.S_IMODE(os.stat(d.address).st_mode) == 0o660 and os.stat(d.address).st_gid == gid
        for p in address.segment_paths(d.name):
            assert stat.S_IMODE(p.stat().st_mode) == 0o660 and p.stat().st_gid == gid

        def as_group_member(send):
            os.setgroups([gid])
            os.setgid(gid)
            os.setuid(uid)
            with slitter.connect(d.address, timeout=5) as heap:
                cls = heap.register_class("grouped", size=32)
                h = cls.allocate()
                heap.view(h)[:2] = b"ok"
                cls.release(h)
            send(b"attached")

        forked = fork_child(as_group_member)
        assert forked.report() == b"attached"  # AssertionError with the child's exception if it raised
        forked.wait()
    finally:
        shutil.rmtree(top, ignore_errors=True)
