"""Channels: handles from one thread to another, in any two processes, through a ring in the arena."""

from __future__ import annotations

import collections
import multiprocessing
import os
import signal
import subprocess
import threading
import time
from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import slitter
from slitter import _channel
from slitter.channel import claimant
import workers
from conftest import collect_spawned, fork_child, run_spawned, start_spawned, wait_reclaimed


def _sender_and_receiver(address: str, handle: int, count: int, limit: int) -> tuple[list, list]:
    """A spawned receiver and a spawned sender on one channel; (processes, their results)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=workers.channel_receiver, args=(address, handle, limit, queue)),
             ctx.Process(target=workers.channel_sender, args=(address, handle, count, 7, queue))]
    for p in procs:
        p.start()
    return procs, collect_spawned(procs, queue)


def _until_asleep(channel, side: str = "receiver", seconds: float = 60) -> None:
    """Poll until the channel's receiver (or sender) has set its sleeping flag: it is past its spin, in the futex."""
    index = 5 if side == "receiver" else 6
    deadline = time.monotonic() + seconds
    while not channel._state()[index]:
        assert time.monotonic() < deadline, f"the {side} never went to sleep"
        time.sleep(0.005)


def test_handles_cross_processes_in_order_through_a_small_ring(daemon, heap):
    """Two real processes; 20,000 objects through 64 slots (it wraps 300 times): all arrive, in order."""
    channel = heap.channel(64)
    procs, results = _sender_and_receiver(daemon.address, channel.handle, count=20_000, limit=100)
    assert sorted(results) == [("received", 20_000, 20_000), ("sent", 20_000)]
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(channel) == 0 and channel.closed
    stats = heap.stats()["classes"]
    assert stats["item"]["live"] == 0 and stats["item"]["releases"] == 20_000
    assert stats["slitter.channel.64"]["live"] == 1  # the channel is an object of the arena
    channel.release()
    assert heap.stats()["classes"]["slitter.channel.64"]["live"] == 0


def test_send_many_and_recv_many_in_one_process(heap):
    channel = heap.channel(16)
    channel.send_many(range(1, 11))
    channel.send(11)
    assert len(channel) == 11
    assert list(channel.recv_many(4)) == [1, 2, 3, 4]
    assert list(channel.recv_many()) == list(range(5, 12))  # what is waiting, not the limit
    channel.send_many(array("Q", range(100, 116)))  # exactly full, across the ring's end
    assert list(channel.recv_many(100)) == list(range(100, 116))
    assert isinstance(channel.recv_many(1) if channel.send(5) is None else None, array)
    assert repr(channel).startswith(f"<slitter.Channel {channel.handle:#x} 0/16")


# Each example makes and releases its own channel: the heap fixture is shared on purpose.
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["send", "recv"]), st.integers(1, 40)), max_size=60))
def test_a_channel_behaves_as_a_bounded_fifo(heap, ops):
    """Against a deque model: what is received, and when a send times out on a full ring and how much went."""
    channel = heap.channel(32)
    model: collections.deque[int] = collections.deque()
    serial = 1
    try:
        for op, n in ops:
            if op == "send":
                batch = list(range(serial, serial + n))
                serial += n
                room = 32 - len(model)
                if n <= room:
                    channel.send_many(batch, timeout=0)
                    model.extend(batch)
                else:
                    with pytest.raises(slitter.ChannelTimeout) as info:
                        channel.send_many(batch, timeout=0)
                    assert info.value.sent == room
                    model.extend(batch[:room])
            elif model:
                got = list(channel.recv_many(n, timeout=0))
                assert got == [model.popleft() for _ in range(min(n, len(model)))]
            else:
                with pytest.raises(slitter.ChannelTimeout):
                    channel.recv_many(n, timeout=0)
            assert len(channel) == len(model)
    finally:
        channel.release()


def test_timeouts_say_which_channel_and_how_many_went(heap):
    channel = heap.channel(16)
    with pytest.raises(slitter.ChannelTimeout, match=f"channel {channel.handle:#x} .*a handle") as info:
        channel.recv(timeout=0.02)
    assert isinstance(info.value, TimeoutError) and info.value.channel == channel.handle
    with pytest.raises(slitter.ChannelTimeout, match="room; 16 sent") as info:
        channel.send_many(range(1, 21), timeout=0.02)
    assert info.value.sent == 16 and len(channel) == 16


def test_a_closed_channel_refuses_sends_and_drains_to_closed(heap):
    channel = heap.channel(16)
    channel.send_many([1, 2, 3])
    channel.close()
    with pytest.raises(slitter.ChannelClosed, match=f"send to channel {channel.handle:#x}.*closed; 0 sent") as info:
        channel.send(4)
    assert info.value.sent == 0
    assert list(channel.recv_many(2)) == [1, 2]
    assert channel.recv() == 3  # sent before the close: still delivered
    with pytest.raises(slitter.ChannelClosed, match="closed and empty"):
        channel.recv(timeout=5)  # closed: no wait for the timeout
    assert channel.closed


@pytest.mark.parametrize("side", ["recv", "send"])
def test_close_wakes_a_process_blocked_without_a_timeout(daemon, heap, side):
    """A receiver on an empty channel, or a sender on a full one, sleeps in the kernel until the close."""
    channel = heap.channel(16)
    (proc,), queue = start_spawned(workers.channel_waits, [(daemon.address, channel.handle, side)])
    try:
        assert queue.get(timeout=60) == "waiting"
        _until_asleep(channel, "receiver" if side == "recv" else "sender")
        assert proc.is_alive() and queue.empty()
        assert len(channel) == (16 if side == "send" else 0)
        channel.close()
        assert queue.get(timeout=60).startswith("ChannelClosed: ")
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert proc.exitcode == 0
    assert channel._state()[5:] == (0, 0)  # the flags cleared on the way out


def test_a_waiting_receiver_lets_other_threads_run(heap):
    """The wait drops the GIL: a sender thread of the same process gets to send while the receiver waits."""
    channel = heap.channel(16)
    got: list[int] = []
    receiver = threading.Thread(target=lambda: got.append(channel.recv(timeout=60)))
    receiver.start()
    _until_asleep(channel)  # while this thread runs: the receiver does not hold the GIL
    channel.send(42)  # this thread: the sender; the receiver thread holds the receive claim
    receiver.join(60)
    assert got == [42]


def test_a_signal_handler_that_raises_interrupts_a_wait(heap):
    channel = heap.channel(16)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            channel.recv()  # no timeout: only the signal ends it
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    channel.send(7)
    assert channel.recv(timeout=0) == 7  # and the channel still works


def test_one_sender_and_one_receiver_per_channel(daemon, heap):
    """Another thread, or another process, is refused with ChannelInUse naming the channel and the owner."""
    channel = heap.channel(16)
    channel.send(1)
    assert channel.recv() == 1  # this thread now holds both claims
    errors: list[str] = []

    def other_thread() -> None:
        for call in (lambda: channel.send(2), lambda: channel.recv(timeout=0)):
            try:
                call()
            except slitter.ChannelInUse as exc:
                errors.append(str(exc))

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    me = f"thread {threading.get_native_id()} of process {os.getpid()}"
    assert errors == [f"cannot send to channel {channel.handle:#x} (16 slots): {me} is its sender (one per channel)",
                      f"cannot receive from channel {channel.handle:#x} (16 slots): {me} is its receiver "
                      "(one per channel)"]
    _procs, [out] = run_spawned(workers.channel_claims, [(daemon.address, channel.handle)])
    assert [line.split(":")[0] for line in out] == ["send", "recv"]
    assert all(f"{me} is its" in line for line in out), out
    assert len(channel) == 0  # nothing of the refused calls went in


def test_open_channel_refuses_what_is_not_a_live_channel(heap):
    order = heap.register_class("order", size=64)
    h = order.allocate()
    with pytest.raises(slitter.ClassMismatch, match=f"handle {h:#x} is an object of class 'order', not a channel"):
        heap.open_channel(h)
    channel = heap.channel(16)
    with pytest.raises(slitter.InteriorPointer):
        heap.open_channel(channel.handle + 8)
    with pytest.raises(slitter.ForeignAddress):
        heap.open_channel(16)
    assert heap.open_channel(channel.handle).capacity == 16
    channel.release()
    with pytest.raises(slitter.DoubleFree):
        heap.open_channel(channel.handle)
    with pytest.raises(slitter.DoubleFree):
        channel.release()


def test_capacity_must_be_a_power_of_two_in_range(heap):
    for bad in (0, 15, 24, 1 << 21, 16.0, "16"):
        with pytest.raises(ValueError, match="power of two"):
            heap.channel(bad)
    with pytest.raises(ValueError, match="limit >= 1"):
        heap.channel(16).recv_many(0)


def test_a_stray_write_to_the_header_cannot_reach_past_the_ring(heap):
    """Head and tail are shared memory anyone can scribble on: the ring's slots stay the bound."""
    channel = heap.channel(16)
    words = heap.view(channel.handle).cast("Q")
    head = _channel.HEADER // 8 // 3  # line 1's first word: head
    words[head] = 1 << 40  # a head far past the tail
    got = channel.recv_many(1000, timeout=0)
    assert len(got) == 16  # no more than the ring holds
    words[0] = 0  # the magic
    with pytest.raises(slitter.ChannelError, match=f"channel {channel.handle:#x}: its header is not a channel's"):
        heap.open_channel(channel.handle)
    words.release()


def test_a_forked_child_is_not_its_parents_sender(heap):
    """After fork the child's thread is another thread: the parent's claim does not pass to it."""
    channel = heap.channel(16)
    channel.send(1)

    def in_child(send):
        try:
            channel.send(2)
            send(b"sent")
        except slitter.ChannelInUse:
            send(b"refused")

    forked = fork_child(in_child)
    assert forked.report() == b"refused"
    forked.wait()
    assert list(channel.recv_many(16, timeout=0)) == [1]


def test_one_receiver_waits_on_several_senders_at_once(daemon, heap):
    """Three sender processes, a channel each, one receiver process in wait_any: all arrive, each in order."""
    links = [heap.channel(32) for _ in range(3)]
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=workers.channel_fan_in, args=(daemon.address, [c.handle for c in links], queue))]
    procs += [ctx.Process(target=workers.channel_counter, args=(daemon.address, c.handle, 2000, queue)) for c in links]
    for p in procs:
        p.start()
    results = collect_spawned(procs, queue)
    assert sorted(results, key=str) == [(6000, 6000), "sent", "sent", "sent"]
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]


def test_wait_any_returns_the_ready_channel_and_times_out(heap):
    a, b, c = (heap.channel(16) for _ in range(3))
    with pytest.raises(slitter.ChannelTimeout, match=f"channels {a.handle:#x}, {b.handle:#x}, {c.handle:#x}"):
        slitter.Channel.wait_any([a, b, c], timeout=0.05)
    b.send(9)
    assert slitter.Channel.wait_any([a, b, c], timeout=0) is b
    assert b.recv() == 9
    c.close()  # closed counts as ready: the receiver learns it there
    assert slitter.Channel.wait_any([a, b, c]) is c
    with pytest.raises(ValueError, match="at least one"):
        slitter.Channel.wait_any([])


def test_wait_any_sleeps_until_a_sender_in_another_thread_sends(heap):
    """Past its spin the receiver sleeps on every channel's futex word; a send to any of them wakes it."""
    links = [heap.channel(16) for _ in range(4)]
    woke: list = []
    waiter = threading.Thread(target=lambda: woke.append(slitter.Channel.wait_any(links, timeout=60)))
    waiter.start()
    for link in links:
        _until_asleep(link)  # one sleep on all four words
    links[2].send(5)
    waiter.join(60)
    assert woke == [links[2]]


def test_a_claim_passes_on_when_its_thread_has_exited(heap):
    """A sender thread that ends does not lock the channel: the next thread to send takes the claim over."""
    channel = heap.channel(16)
    tids: list[int] = []
    first = threading.Thread(target=lambda: (tids.append(threading.get_native_id()), channel.send(1)))
    first.start()
    first.join()
    _gone(tids[0])  # the claim passes once the kernel has let the thread go
    channel.send(2)  # this thread, after the first has exited
    assert list(channel.recv_many(16, timeout=0)) == [1, 2]
    assert claimant(channel._state()[3]) == (os.getpid(), threading.get_native_id())


def test_a_released_channel_refuses_every_channel_of_it(heap):
    """Release retires the header: a stale Channel fails, even once the object is a new channel."""
    a = heap.channel(16)
    stale = heap.open_channel(a.handle)
    a.release()
    for call in (lambda: stale.send(1, timeout=0), lambda: stale.recv(timeout=0)):
        with pytest.raises(slitter.ChannelError, match=f"channel {a.handle:#x} .*it was released"):
            call()
    b = heap.channel(16)  # the same object again (LIFO): a new channel, with a new serial
    assert b.handle == a.handle
    b.send(5)
    with pytest.raises(slitter.ChannelError, match="it was released"):
        stale.recv(timeout=0)
    assert b.recv(timeout=0) == 5  # and the stale one took nothing of it
    with pytest.raises(slitter.ChannelError, match="cannot close channel .*it was released"):
        stale.close()
    with pytest.raises(slitter.ChannelError, match="cannot release channel .*it was released"):
        stale.release()  # the object is b's now: nothing is closed or released
    assert not b.closed and heap.stats()["classes"]["slitter.channel.16"]["live"] == 1
    b.release()


def test_a_waiter_woken_by_a_release_is_told_the_channel_is_gone(heap):
    channel = heap.channel(16)
    outcome: list[str] = []

    def receive() -> None:
        try:
            channel.recv(timeout=60)
        except slitter.ChannelError as exc:
            outcome.append(f"{type(exc).__name__}: {exc}")

    receiver = threading.Thread(target=receive)
    receiver.start()
    _until_asleep(channel)
    other = heap.open_channel(channel.handle)
    other.release()  # wakes the receiver, whose channel is gone: it must not read the ring again
    receiver.join(60)
    assert len(outcome) == 1 and outcome[0].startswith("ChannelError: ") and "it was released" in outcome[0]


def test_two_sleepers_on_one_channel_each_count(heap):
    """A receiver asleep in recv and another thread's wait_any on the same channel: when wait_any gives up,
    the receiver is still counted asleep, so the next send wakes it at once."""
    x, y = heap.channel(16), heap.channel(16)
    got: list[int] = []
    receiver = threading.Thread(target=lambda: got.append(x.recv(timeout=60)))
    receiver.start()
    _until_asleep(x)
    with pytest.raises(slitter.ChannelTimeout):
        slitter.Channel.wait_any([x, y], timeout=0.1)  # sleeps on x too, then leaves
    assert x._state()[5] == 1 and receiver.is_alive()
    x.send(7)
    receiver.join(60)
    assert got == [7]


def _gone(tid: int) -> None:
    """Wait until the kernel has let thread ``tid`` go (join() returns a little before)."""
    deadline = time.monotonic() + 60
    while os.path.exists(f"/proc/self/task/{tid}"):
        assert time.monotonic() < deadline, f"thread {tid} never exited"
        time.sleep(0.005)


def test_a_call_refused_for_waiting_on_itself_takes_no_claim(heap):
    """This thread sends; the receiver's claim is free (its thread exited).  A receive with no timeout on the
    empty ring would wait on itself: refused, and the claim it took for the call is given back."""
    channel = heap.channel(16)
    channel.send(1)
    tids: list[int] = []
    first = threading.Thread(target=lambda: (tids.append(threading.get_native_id()), channel.recv(timeout=10)))
    first.start()
    first.join()
    _gone(tids[0])
    with pytest.raises(slitter.ChannelError, match="this thread is its sender too"):
        channel.recv()
    assert claimant(channel._state()[4]) != (os.getpid(), threading.get_native_id())
    got: list[int] = []
    second = threading.Thread(target=lambda: got.append(channel.recv(timeout=60)))
    second.start()
    _until_asleep(channel)
    channel.send(2)
    second.join(60)
    assert got == [2]


def test_one_thread_on_both_ends_is_told_instead_of_waiting_forever(heap):
    channel = heap.channel(16)
    channel.send_many(range(1, 17))
    assert channel.recv() == 1  # this thread: sender and receiver
    channel.send(17)
    with pytest.raises(slitter.ChannelError, match="this thread is its receiver too.*; 0 sent") as info:
        channel.send(18)  # full, and no timeout: nobody else may receive
    assert type(info.value) is slitter.ChannelError
    assert len(channel.recv_many()) == 16
    with pytest.raises(slitter.ChannelError, match="this thread is its sender too"):
        channel.recv()


def test_send_many_refuses_bytes_and_an_empty_send_to_a_closed_channel(heap):
    channel = heap.channel(16)
    with pytest.raises(TypeError, match="not a bytes-like object"):
        channel.send_many(b"\x01" * 8)
    channel.close()
    with pytest.raises(slitter.ChannelClosed):
        channel.send_many([])
    assert channel._state()[3] == 0  # and claimed nothing


def test_send_and_recv_of_one_handle_check_it_as_send_many_does(daemon):
    """send(h) and recv() call the ring directly (not through send_many/recv_many): the same errors,
    nothing sent by a refused call, and a closed heap refused on both ends."""
    heap = slitter.connect(daemon.address)
    channel = heap.channel(16)
    for bad in (-1, 1 << 64):
        with pytest.raises(ValueError, match="an int from 0 to 2\\*\\*64 - 1"):
            channel.send(bad)
    for bad in ("x", 1.5, None):
        with pytest.raises(TypeError):
            channel.send(bad)
    assert len(channel) == 0
    channel.send((1 << 64) - 1)
    channel.send(True)  # an int subclass is its value, as array('Q') takes it
    assert (channel.recv(), channel.recv()) == ((1 << 64) - 1, 1)
    with pytest.raises(slitter.ChannelTimeout):
        channel.recv(timeout=0)
    heap.close()
    for call in (lambda: channel.send(5), channel.recv):
        with pytest.raises(slitter.SlitterError, match="closed"):
            call()


def test_a_header_of_another_capacity_or_a_stray_tail_is_contained(heap):
    channel = heap.channel(16)
    words = heap.view(channel.handle).cast("Q")
    words[1] = 32  # the header's capacity no longer matches the class's
    with pytest.raises(slitter.ChannelError, match="released"):
        channel.send(1, timeout=0)
    words[1] = 16
    words[16] = 5  # tail (line 2's first word) past head: the ring looks over-full to the sender
    with pytest.raises(slitter.ChannelTimeout, match="0 sent"):
        channel.send(1, timeout=0)
    words.release()


def test_objects_in_the_ring_outlive_a_sender_killed_with_sigkill(daemon, heap):
    """The sender dies with its objects in the channel: the daemon reclaims only what it cached, and the
    receiver still gets, checks and releases every object it was sent."""
    channel = heap.channel(1024)
    (proc,), queue = start_spawned(workers.channel_send_then_hang, [(daemon.address, channel.handle, 500)])
    try:
        assert queue.get(timeout=60) == ("sent", 500)
        since = time.monotonic()
        proc.kill()
        proc.join(60)
        _latency, stats = wait_reclaimed(heap, proc.pid, since)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
    item = stats["classes"]["item"]
    assert item["live"] == 500 and item["cached"] == 0  # the ring's 500 stay live: they were handed out
    cls = heap.register_class("item", size=workers.CHANNEL_ITEM)
    got = channel.recv_many(1024, timeout=0)
    assert [int.from_bytes(view[:8], "little") for view in cls.views(got)] == list(range(500))  # checked
    cls.release_many(got)
    item = heap.stats()["classes"]["item"]
    assert item["live"] == 0 and item["carved"] == item["live"] + item["cached"] + item["free"]


def test_a_channel_of_a_closed_heap_refuses_to_send_or_receive(daemon):
    heap = slitter.connect(daemon.address)
    channel = heap.channel(16)
    channel.send(1)
    heap.close()  # the arena stays mapped while the Channel holds it: the heap's close still counts
    for call in (lambda: channel.send(2), lambda: channel.recv(timeout=0)):
        with pytest.raises(slitter.SlitterError, match="closed"):
            call()


def test_wait_any_follows_the_channels_it_is_given(heap):
    """It keeps the last call's arguments for speed: a call with other channels, or another order, is not served
    from them."""
    a, b = heap.channel(16), heap.channel(16)
    b.send(1)
    assert slitter.Channel.wait_any([a, b], timeout=0) is b
    with pytest.raises(slitter.ChannelTimeout):
        slitter.Channel.wait_any([a], timeout=0)  # b is not among these
    a.send(2)
    assert slitter.Channel.wait_any([a, b], timeout=0) is a  # the first ready, in the order given
    assert slitter.Channel.wait_any((b, a), timeout=0) is b
    assert slitter.Channel.wait_any(iter([a]), timeout=0) is a


def _take_turns(links, times: int) -> list:
    """``times`` rounds of wait_any(links) and one recv from the channel it returns: the channels, in order."""
    order = []
    for _ in range(times):
        link = slitter.Channel.wait_any(links, timeout=0)
        link.recv()
        order.append(link)
    return order


def test_wait_any_takes_ready_channels_in_turn(heap):
    """Round robin: called again with the same channels, it looks first after the one it returned, so a channel
    that always has handles does not starve the others; a channel not ready is passed over."""
    a, b, c = (heap.channel(16) for _ in range(3))
    for link in (a, c):
        link.send_many(range(1, 4))
    assert _take_turns([a, b, c], 6) == [a, c, a, c, a, c]
    assert len(a) == len(c) == 0
    b.send_many(range(1, 3))
    c.send_many(range(1, 3))
    assert _take_turns([a, b, c], 4) == [b, c, b, c]


def test_wait_any_keeps_a_round_robin_per_thread(heap):
    """Two consumer threads, each waiting on channels of its own, calls interleaved: each keeps its own turn."""
    a, b, c, d = (heap.channel(16) for _ in range(4))
    for link in (a, b, c, d):
        link.send_many(range(1, 4))
    turns = threading.Barrier(2, timeout=60)
    theirs: list = []

    def other_thread():
        for _ in range(4):
            turns.wait()  # this thread's turn: after ours
            theirs.extend(_take_turns([a, b], 1))
            turns.wait()

    thread = threading.Thread(target=other_thread)
    thread.start()
    ours: list = []
    for _ in range(4):
        ours.extend(_take_turns([c, d], 1))
        turns.wait()
        turns.wait()
    thread.join(60)
    assert ours == [c, d, c, d]
    assert theirs == [a, b, a, b]


def _in_thread(call):
    """Run ``call`` in a thread; a function that joins it (60 s) and returns (what it returned or raised, its tid)."""
    box: list = []

    def run() -> None:
        box.append(threading.get_native_id())
        try:
            box.append(call())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box.append(exc)

    thread = threading.Thread(target=run, daemon=True)  # a wait that never ends must not keep pytest alive
    thread.start()

    def result():
        thread.join(60)
        assert not thread.is_alive(), "the call is still waiting"
        return box[1], box[0]

    return result


@pytest.mark.parametrize("side", ["recv", "send"])
def test_a_side_waiting_on_a_peer_killed_with_sigkill_is_told(daemon, heap, side):
    """A receiver blocked with no timeout on an empty channel whose sender's process is SIGKILLed (or a sender on
    a full one whose receiver's is) gets ChannelPeerGone naming the dead thread, instead of waiting forever, while
    the dead process is still an unreaped zombie of this one; the channel stays open, and other threads take
    both sides over."""
    channel = heap.channel(16)
    (proc,), queue = start_spawned(workers.channel_claim_then_hang,
                                   [(daemon.address, channel.handle, "send" if side == "recv" else "recv")])
    peer_ready = threading.Event()
    got: list = []

    def our_side():
        """One thread for all of this side's calls: one receiver (sender) per channel."""
        if side == "recv":
            got.extend(channel.recv_many(16, timeout=60))  # what it sent comes first
            return channel.recv()
        channel.send(9)  # for the peer to receive: then it holds the receiver's claim
        assert peer_ready.wait(60)
        channel.send_many(range(16))  # full
        return channel.send(16)

    try:
        result = _in_thread(our_side)
        pid, tid = queue.get(timeout=60)
        peer_ready.set()
        _until_asleep(channel, "receiver" if side == "recv" else "sender")
        os.kill(proc.pid, signal.SIGKILL)  # and not reaped: a zombie until the join below
        exc, ours = result()
        zombie = _state_letter(proc.pid)
        if side == "recv":
            assert slitter.Channel.wait_any([channel], timeout=5) is channel  # ready: its recv says why
    finally:
        peer_ready.set()
        proc.kill()
        proc.join(60)
    assert zombie == "Z", "the test meant to see the peer's process as a zombie"
    assert isinstance(exc, slitter.ChannelPeerGone), exc
    assert isinstance(exc, slitter.ChannelClosed)  # a loop that ends on ChannelClosed ends here too
    assert (exc.pid, exc.thread, exc.channel, exc.sent) == (pid, tid, channel.handle, 0)
    assert f"thread {tid} of process {pid}" in str(exc) and f"{channel.handle:#x}" in str(exc)
    assert not channel.closed
    _gone(ours)
    if side == "recv":
        assert got == [1, 2, 3]
        channel.send(4)  # this thread takes the dead sender's side, then our exited thread's
        assert channel.recv(timeout=10) == 4
    else:
        assert list(channel.recv_many(16, timeout=0)) == list(range(16))  # the dead receiver's side
        channel.send(16)  # our exited thread's
        assert channel.recv(timeout=0) == 16


def _state_letter(pid: int) -> str:
    """The process's state in /proc (R, S, Z, ...)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _new_process_with_pid(pid: int) -> subprocess.Popen | None:
    """A sleeping process given ``pid`` (the kernel's next pid set just below it), or None when another process
    on the host took it first 200 times.  Skips the test where ns_last_pid cannot be written (CAP_SYS_ADMIN)."""
    for _ in range(200):
        try:
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(pid - 1))
        except OSError as e:
            pytest.skip(f"cannot choose the next pid here ({e}): PID reuse cannot be staged")
        proc = subprocess.Popen(["sleep", "120"])
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    return None


def test_a_peer_whose_pid_a_new_process_reuses_is_still_gone(daemon, heap):
    """The sender's process is SIGKILLed and reaped, and a new process gets its pid: the claim's token carries
    the process's start time, so the receiver still gets ChannelPeerGone instead of waiting on a stranger, and
    the dead sender's side passes to the next thread that sends."""
    channel = heap.channel(16)
    (proc,), queue = start_spawned(workers.channel_claim_then_hang, [(daemon.address, channel.handle, "send")])
    try:
        pid, tid = queue.get(timeout=60)
    finally:
        proc.kill()
        proc.join(60)
    stranger = _new_process_with_pid(pid)
    assert stranger is not None, f"could not stage a new process with pid {pid}"
    try:
        assert list(channel.recv_many(16, timeout=10)) == [1, 2, 3]
        with pytest.raises(slitter.ChannelPeerGone) as exc:
            channel.recv(timeout=30)  # asked after PROBE_AFTER_NS of sleep; not a stranger's
        assert (exc.value.pid, exc.value.thread) == (pid, tid)
        assert stranger.poll() is None, "the new process with that pid is alive throughout"
        channel.send(4)  # this thread takes the gone sender's side: its pid's new owner is not it
        assert channel.recv(timeout=10) == 4
    finally:
        stranger.kill()
        stranger.wait()


def test_a_sender_thread_that_exits_in_a_live_process_is_not_a_gone_peer(heap):
    """Its process may send again from another thread (a pool's threads take turns): the receiver times out,
    is not told the peer is gone, and the next thread's sends arrive."""
    channel, other = heap.channel(16), heap.channel(16)
    tids: list[int] = []
    sender = threading.Thread(target=lambda: (tids.append(threading.get_native_id()), channel.send_many([5, 6])))
    sender.start()
    sender.join()
    _gone(tids[0])
    assert list(channel.recv_many(16, timeout=10)) == [5, 6]
    with pytest.raises(slitter.ChannelTimeout):
        channel.recv(timeout=0)
    with pytest.raises(slitter.ChannelTimeout):
        channel.recv(timeout=0.1)  # past the spin, into the sleep and its probe
    with pytest.raises(slitter.ChannelTimeout):
        slitter.Channel.wait_any([other, channel], timeout=0.1)
    _in_thread(lambda: channel.send(7))()  # the next thread of the pool
    assert channel.recv(timeout=10) == 7
