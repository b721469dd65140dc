"""The slow path hidden: a steady stream of allocations never waits for a refill."""

from __future__ import annotations

import os
import threading
import time

import msgpack
from conftest import dealer, fork_child, settled_thread_class, thread_class

import slitter
import workers
from slitter import protocol
from slitter._native import lib
from slitter.protocol import ErrorCode, Op


def test_spare_magazine_is_prefetched_without_waiting(heap):
    cls = heap.register_class("stream", size=64)
    cap = heap._classes_table[cls.id].mag_capacity
    transport = heap._transport
    held = [cls.allocate() for _ in range(cap)]  # the first refill waits, and fills the spare too
    waited = transport.round_trips
    sent = transport.sent["refill"]
    for _ in range(5):
        held += [cls.allocate() for _ in range(cap)]  # takes the spare, asks for the next one
        time.sleep(0.05)  # the daemon fills the new spare meanwhile
    assert transport.round_trips == waited, "a refill was waited for in steady state"
    assert transport.sent["refill"] == sent + 5  # one prefetch per magazine, none waited for
    assert not transport.socket.poll(300)  # sent with reply=False: nothing comes back to read
    assert len(set(held)) == len(held)
    stats = heap.stats()["classes"]["stream"]
    assert stats["live"] == len(held)
    assert stats["cached"] == cap  # the prefetched spare
    assert stats["carved"] == stats["live"] + stats["cached"] + stats["free"]
    cls.release_many(held)


def test_prefetched_objects_are_reclaimed_with_the_client(daemon):
    with slitter.connect(daemon.address) as heap:
        cls = heap.register_class("spare", size=64)
        cls.allocate()
        assert heap.stats()["classes"]["spare"]["cached"] > 0
    with slitter.connect(daemon.address) as other:
        c = other.stats()["classes"]["spare"]
        assert c["cached"] == 0 and c["live"] == 1 and c["carved"] == c["live"] + c["free"]


def test_full_release_magazines_are_flushed_without_waiting(heap):
    cls = heap.register_class("drain", size=64)
    # More magazines than the shelf takes of one class, at the size this thread's grew to.
    handles = list(cls.allocate_many((lib.SLITTER_SHELF_PER_CLASS + 8) * lib.SLITTER_MAG_CAP))
    cap = settled_thread_class(heap, cls).capacity
    transport = heap._transport
    waited = transport.round_trips
    flushes = transport.sent["flush"]
    for i, h in enumerate(handles):
        cls.release(h)
        if i % cap == cap - 1:
            time.sleep(0.05)  # the daemon audits the outgoing magazine meanwhile
    assert transport.round_trips == waited, "a flush was waited for in steady state"
    assert transport.sent["flush"] > flushes  # flushes went out, none waited for
    time.sleep(0.1)
    stats = heap.stats()["classes"]["drain"]
    assert stats["live"] == 0 and stats["releases"] == len(handles)
    assert stats["carved"] == stats["live"] + stats["cached"] + stats["free"]
    assert stats["errors"] == dict.fromkeys(stats["errors"], 0)


def test_batch_releases_hand_full_magazines_out_without_waiting(heap):
    cls = heap.register_class("batch_out", size=64)
    cap = heap._classes_table[cls.id].mag_capacity
    handles = cls.allocate_many(4 * cap)
    transport = heap._transport
    waited = transport.round_trips
    for i in range(0, len(handles), cap):
        cls.release_many(handles[i:i + cap])
        time.sleep(0.05)  # the daemon audits the outgoing magazine meanwhile
    assert transport.round_trips == waited, "a batch release waited for a flush"
    time.sleep(0.1)
    stats = heap.stats()["classes"]["batch_out"]
    assert stats["live"] == 0 and stats["releases"] == len(handles)
    assert stats["carved"] == stats["live"] + stats["cached"] + stats["free"]


def test_requests_sent_ahead_ask_for_a_reply_from_a_daemon_without_the_feature(heap):
    """An older daemon refuses the reply field: a client whose daemon did not list "reply" in its
    attach reply sends the prefetch without it, and gets the reply, which it drops unread."""
    assert heap._ahead_flags == {"reply": False}  # this daemon lists the feature
    heap._ahead_flags = {}  # as attached to a daemon that does not
    cls = heap.register_class("older", size=64)
    cap = heap._classes_table[cls.id].mag_capacity
    transport = heap._transport
    held = [cls.allocate() for _ in range(cap)]
    waited, sent = transport.round_trips, transport.sent["refill"]
    held += [cls.allocate() for _ in range(cap)]  # takes the spare, asks for the next one
    assert transport.sent["refill"] == sent + 1 and transport.round_trips == waited
    assert transport.socket.poll(5000)  # its reply came back (and the next call drops it)
    assert heap.stats()["classes"]["older"]["cached"] == cap  # the spare was refilled
    cls.release_many(held)


def test_a_request_that_asks_for_no_reply_is_done_and_not_answered(daemon, heap):
    """REFILL and FLUSH with reply=False: the daemon does the work and answers only a refusal."""
    cls = heap.register_class("quiet", size=64)
    cls.release(cls.allocate())  # binds this thread: slot and class exist in the rack
    slot = lib.slitter_bind(heap._client, cls.id)
    args = {"client": heap._client_id, "token": heap._token, "thread": slot, "class_id": cls.id}
    with dealer(daemon.address) as sock:
        before = heap.stats()["classes"]["quiet"]
        sock.send(protocol.pack(protocol.request(Op.REFILL, 1, reply=False, **args)))
        sock.send(protocol.pack(protocol.request(Op.FLUSH, 2, reply=False, **args)))
        assert not sock.poll(300)
        after = heap.stats()["classes"]["quiet"]
        assert (after["refills"], after["flushes"]) == (before["refills"] + 1, before["flushes"] + 1)
        sock.send(protocol.pack(protocol.request(Op.REFILL, 3, reply=False, **{**args, "token": heap._token ^ 1})))
        assert sock.poll(5000), "a refused request with reply=False must still be answered"
        reply = msgpack.unpackb(sock.recv(), raw=False)
        assert (reply["id"], reply["ok"], reply["code"]) == (3, False, ErrorCode.UNKNOWN_CLIENT)
        sock.send(protocol.pack(protocol.request(Op.REFILL, 4, reply=True, **args)))
        assert sock.poll(5000) and msgpack.unpackb(sock.recv(), raw=False)["ok"] is True


def test_magazines_grow_for_a_thread_that_streams(heap):
    """Prefetches of one class close together double the thread's magazines, up to 4096 handles
    (and 4 MiB of objects); the figures stay whole and every object comes back."""
    cls = heap.register_class("grow", size=1024)
    base = heap._classes_table[cls.id].mag_capacity
    assert base == 1024  # 1 MiB of 1 KiB objects: the class's own size
    tc = thread_class(heap, cls)
    held = []
    for _ in range(12):
        held.append(cls.allocate_many(base))  # takes the spare, asks for the next one at once
        time.sleep(0.005)
    deadline = time.monotonic() + 5
    while tc.capacity < 4096 and time.monotonic() < deadline:
        held.append(cls.allocate_many(base))
        time.sleep(0.005)
    assert tc.capacity == 4096
    stats = heap.stats()["classes"]["grow"]
    assert stats["cached"] > base and stats["carved"] == stats["live"] + stats["cached"] + stats["free"]
    for batch in held:
        cls.release_many(batch)
    stats = heap.stats()["classes"]["grow"]
    assert stats["live"] == 0 and stats["carved"] == stats["cached"] + stats["free"]


def test_magazines_of_small_objects_grow_past_their_starting_size(heap):
    """64 B objects start at 4096 handles a magazine, a quarter of the layout's cap: a thread that
    streams grows them to SLITTER_MAG_CAP, so a burst of 100,000 pairs sends a message per 16384
    objects or fewer, not one per 4096."""
    cls = heap.register_class("grow-small", size=64)
    base = heap._classes_table[cls.id].mag_capacity
    assert base == 4096 and lib.SLITTER_MAG_CAP == 4 * base
    tc = thread_class(heap, cls)
    held = []
    deadline = time.monotonic() + 10
    while tc.capacity < lib.SLITTER_MAG_CAP and time.monotonic() < deadline:
        held.append(cls.allocate_many(base))  # takes the spare, asks for the next one at once
    assert tc.capacity == lib.SLITTER_MAG_CAP
    for batch in held:
        cls.release_many(batch)
    sent = heap.messages_sent
    handles = [cls.allocate() for _ in range(100_000)]
    for h in handles:
        cls.release(h)
    assert heap.messages_sent - sent < 100_000 // base, heap.messages_sent - sent
    stats = heap.stats()["classes"]["grow-small"]
    assert stats["live"] == 0 and workers.balanced(stats), stats


def test_a_thread_that_only_releases_grows_its_magazines_too(heap):
    """A consumer that releases a stream of objects it never allocated sends no prefetch: its
    flush-aheads grow its magazines, to SLITTER_MAG_CAP for 64 B objects, so a burst of 100,000
    releases then sends a message per 16384 objects, not one per 4096."""
    cls = heap.register_class("grow-releaser", size=64)
    base = heap._classes_table[cls.id].mag_capacity
    assert base == 4096 and lib.SLITTER_MAG_CAP == 4 * base
    pool = cls.allocate_many(40 * base)
    burst = cls.allocate_many(100_000)
    seen: dict[str, int] = {}

    def consumer() -> None:
        tc = thread_class(heap, cls)  # binds this thread; it never allocates
        release = cls.release
        for start in range(0, len(pool), base):
            if tc.capacity == lib.SLITTER_MAG_CAP:
                break
            for h in pool[start:start + base]:
                release(h)
        heap.stats()  # the daemon has served every flush-ahead sent so far
        seen["grown"] = tc.capacity
        sent = heap.messages_sent
        for h in burst:
            release(h)
        seen["burst_messages"] = heap.messages_sent - sent
        seen["rest"] = start
        for h in pool[start:]:
            release(h)

    worker = threading.Thread(target=consumer)
    worker.start()
    worker.join()
    assert seen["grown"] == lib.SLITTER_MAG_CAP, seen
    assert seen["burst_messages"] <= 100_000 // lib.SLITTER_MAG_CAP + 2, seen  # 24 at 4096 handles
    stats = heap.stats()["classes"]["grow-releaser"]
    assert stats["live"] == 0 and workers.balanced(stats), stats


def test_a_consumer_process_grows_its_magazines_as_a_consumer_thread_does(daemon, heap):
    """The same in another process, as a consumer usually is: it releases what this one allocated,
    reaches SLITTER_MAG_CAP, and its burst of 100,000 releases sends a message per 16384 objects."""
    cls = heap.register_class("grow-consumer", size=64)
    base = heap._classes_table[cls.id].mag_capacity
    pool = cls.allocate_many(40 * base)
    burst = cls.allocate_many(100_000)

    def consumer(send) -> None:
        with slitter.connect(daemon.address) as mine:
            theirs = mine.register_class("grow-consumer", size=64)
            tc = thread_class(mine, theirs)
            release = theirs.release
            start = 0
            while start < len(pool) and tc.capacity < lib.SLITTER_MAG_CAP:
                for h in pool[start:start + base]:
                    release(h)
                start += base
            mine.stats()  # every flush-ahead sent so far served
            grown, sent = tc.capacity, mine.messages_sent
            for h in burst:
                release(h)
            messages = mine.messages_sent - sent
            theirs.release_many(pool[start:])
            send(f"{grown} {messages}".encode())

    child = fork_child(consumer)
    grown, messages = map(int, child.report().split())
    assert os.waitstatus_to_exitcode(child.wait()) == 0
    assert grown == lib.SLITTER_MAG_CAP
    assert messages <= 100_000 // lib.SLITTER_MAG_CAP + 2, messages  # 24 with 4096-handle magazines
    stats = heap.stats()["classes"]["grow-consumer"]
    assert stats["live"] == 0 and workers.balanced(stats), stats


def test_magazines_keep_the_class_size_for_a_thread_that_allocates_slowly(heap):
    cls = heap.register_class("slow", size=1024)
    base = heap._classes_table[cls.id].mag_capacity
    tc = thread_class(heap, cls)
    held = []
    for _ in range(4):
        held.append(cls.allocate_many(base))
        time.sleep(0.5)  # prefetches far apart (the daemon grows them when closer than 50 ms)
    assert tc.capacity == base
    for batch in held:
        cls.release_many(batch)


def test_magazines_of_big_objects_grow_to_4_mib_of_them_and_no_further(heap):
    """Doubling stops at 4 MiB of objects, not at the next power of two past it."""
    cls = heap.register_class("grow-big", size=3000)
    entry = heap._classes_table[cls.id]
    base, limit = entry.mag_capacity, (4 << 20) // entry.stride
    assert base == (1 << 20) // entry.stride and base < limit < lib.SLITTER_MAG_CAP and limit % base  # 348, 1394
    tc = thread_class(heap, cls)
    held = []
    deadline = time.monotonic() + 10
    while tc.capacity < limit and time.monotonic() < deadline:
        held.append(cls.allocate_many(base))  # prefetches close together: the magazines double
        time.sleep(0.005)
    for _ in range(8):
        held.append(cls.allocate_many(base))
        time.sleep(0.005)
    assert tc.capacity == limit
    for batch in held:
        cls.release_many(batch)


def _move_to_release(tc, k: int) -> list[int]:
    """Move the last ``k`` cached handles of the allocation magazine into the release magazine."""
    n = tc.alloc_count
    moved = [tc.alloc[n - 1 - i] for i in range(k)]
    for i, h in enumerate(moved):
        tc.release[tc.release_count + i] = h
    tc.alloc_count = n - k
    tc.release_count += k
    return moved


def test_a_refill_leaves_a_magazine_that_still_holds_objects_alone(heap):
    """A refill the allocation magazine does not need (a resent or racing one) must not overwrite it."""
    cls = heap.register_class("kept", size=64)
    h = cls.allocate()  # the first refill: both magazines full, one object taken
    tc = thread_class(heap, cls)
    before = (tc.alloc_count, [tc.alloc[i] for i in range(tc.alloc_count)], tc.spare_count)
    reply = heap._call(Op.REFILL, thread=lib.slitter_bind(heap._client, cls.id), class_id=cls.id)
    assert reply["count"] == 0
    assert (tc.alloc_count, [tc.alloc[i] for i in range(tc.alloc_count)], tc.spare_count) == before
    stats = heap.stats()["classes"]["kept"]
    assert stats["carved"] == stats["live"] + stats["cached"] + stats["free"]
    cls.release(h)


def test_a_flush_of_the_outgoing_magazine_leaves_the_release_magazine_to_the_client(heap):
    """The fast path goes on releasing into its release magazine while an outgoing flush is under way."""
    cls = heap.register_class("outgoing", size=64)
    cls.release(cls.allocate())
    tc = thread_class(heap, cls)
    slot = lib.slitter_bind(heap._client, cls.id)
    moved = _move_to_release(tc, 10)
    reply = heap._call(Op.FLUSH, thread=slot, class_id=cls.id, outgoing=True)
    assert reply["accepted"] == 0 and tc.release_count == 10
    assert [tc.release[i] for i in range(10)] == moved
    assert heap._call(Op.FLUSH, thread=slot, class_id=cls.id)["accepted"] == 10  # a plain flush takes them
    assert tc.release_count == 0
