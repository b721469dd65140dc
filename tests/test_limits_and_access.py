"""Limits raise OutOfMemory for the caller alone; other users cannot attach; no TCP unless asked."""

from __future__ import annotations

import contextlib
import ctypes
import grp
import os
import pwd
import shutil
import stat
import tempfile

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


def test_a_cap_that_fills_the_first_magazine_alone_still_hands_every_object_out(heap):
    """The first refill fills the allocation magazine and finds nothing for the spare: the allocation
    succeeds with what was found; OutOfMemory comes only when the cap is truly reached."""
    probe = heap.register_class("probe", size=4096)
    cap = heap._classes_table[probe.id].mag_capacity
    capped = heap.register_class("one-magazine", size=4096, cap=cap)
    got = [capped.allocate() for _ in range(cap)]
    assert len(set(got)) == cap
    with pytest.raises(slitter.OutOfMemory, match="'one-magazine' reached its cap"):
        capped.allocate()
    capped.release_many(got)


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


@contextlib.contextmanager
def _group_daemon(manual_daemon, gid: int):
    """A daemon whose socket and segments the group ``gid`` may use, in a directory every user can reach."""
    top = tempfile.mkdtemp(prefix="slitter-group-", dir="/tmp")
    os.chmod(top, 0o755)
    try:
        d = manual_daemon("--ephemeral", "--socket-mode", "0660", "--socket-group", grp.getgrgid(gid).gr_name)
        d.address = os.path.join(top, "run", "d.sock")
        d.start("--socket", d.address)
        yield d
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _become(uid: int, gid: int) -> None:
    """This (forked) process drops root for ``uid``, with ``gid`` as its group and only group."""
    os.setgroups([gid])
    os.setgid(gid)
    os.setuid(uid)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another uid needs root")
def test_group_mode_lets_another_uid_of_the_group_attach(manual_daemon):
    uid, gid = _other_user()
    with _group_daemon(manual_daemon, gid) as d:
        assert stat.S_IMODE(os.stat(d.address).st_mode) == 0o660 and os.stat(d.address).st_gid == gid
        for p in address.segment_paths(d.name):
            assert stat.S_IMODE(p.stat().st_mode) == 0o660 and p.stat().st_gid == gid

        def as_group_member(send):
            _become(uid, gid)
            with slitter.connect(d.address, timeout=5) as heap:
                cls = heap.register_class("grouped", size=32)
                h = cls.allocate()
                heap.view(h)[:2] = b"ok"
                cls.release(h)
            send(b"attached")

        forked = fork_child(as_group_member)
        assert forked.report() == b"attached"  # AssertionError with the child's exception if it raised
        forked.wait()


def _hide_other_users_processes() -> str:
    """In a mount namespace of this process's own, mount /proc with hidepid=2; '' or why it could not."""
    libc = ctypes.CDLL(None, use_errno=True)
    clone_newns, ms_rec, ms_private = 0x00020000, 0x4000, 1 << 18
    if libc.unshare(clone_newns) != 0:
        return f"unshare(CLONE_NEWNS): {os.strerror(ctypes.get_errno())}"
    if libc.mount(b"none", b"/", None, ms_rec | ms_private, None) != 0:
        return f"making / private: {os.strerror(ctypes.get_errno())}"
    if libc.mount(b"proc", b"/proc", b"proc", 0, b"hidepid=2") != 0:
        return f"mounting /proc with hidepid=2: {os.strerror(ctypes.get_errno())}"
    return ""


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another uid and mounting /proc need root")
def test_a_sender_of_another_user_that_proc_hides_is_not_a_gone_peer(manual_daemon):
    """A receiver that may not signal the sender's process (EPERM) and whose /proc hides it (hidepid) cannot
    check it: it counts the sender as alive and times out, instead of calling it gone."""
    uid, gid = _other_user()
    with _group_daemon(manual_daemon, gid) as d, slitter.connect(d.address, timeout=5) as heap:
        channel = heap.channel(16)
        channel.send(1)  # this (root) process's thread claims the sending side

        def hidden_from(send):
            why = _hide_other_users_processes()
            _become(uid, gid)
            if why:
                send(f"cannot: {why}".encode())
                return
            root = os.getppid()
            try:
                os.kill(root, 0)
                send(b"kill(0) signalled root")
                return
            except PermissionError:
                pass
            if os.path.exists(f"/proc/{root}"):
                send(b"/proc shows root's process")
                return
            with slitter.connect(d.address, timeout=5) as mine:
                link = mine.open_channel(channel.handle)
                got = link.recv(timeout=10)
                try:
                    link.recv(timeout=0.5)  # past the spin, into the sleep and its probe of the sender
                    outcome = "received"
                except slitter.ChannelTimeout:
                    outcome = "timed out"
                except slitter.ChannelPeerGone as exc:
                    outcome = f"peer gone: {exc}"
            send(f"{got} {outcome}".encode())

        forked = fork_child(hidden_from)
        report = forked.report().decode()
        forked.wait()
        if report.startswith("cannot:"):
            pytest.skip(f"this machine cannot hide processes from another user: {report}")
        assert report == "1 timed out", report
        channel.send(2)  # the sender is alive and still holds its side
        channel.release()
