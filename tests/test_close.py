"""Closing a heap while other threads still use it: they get a clear error, and nothing is corrupted.

``Heap.close`` stops every thread's fast path before the daemon reclaims the
rack, waits for slow paths and fast-path hooks under way before it unmaps
anything, and from its first step makes every call on the heap raise
SlitterError ("... is closed").
"""

from __future__ import annotations

import pytest
from conftest import run_spawned

import slitter
import workers
from slitter._native import lib
from slitter.protocol import Op


def test_the_fast_path_is_stopped_before_the_daemon_reclaims_the_rack(daemon):
    heap = slitter.connect(daemon.address)
    cls = heap.register_class("close-order", size=64)
    cls.release(cls.allocate())  # this thread is bound, with objects in its magazine
    transport = heap._transport
    call = transport.call
    at_detach = []

    def watched(op, **args):
        if op is Op.DETACH:
            # What another thread's fast path would get while the daemon frees the rack's objects.
            at_detach.append(lib.slitter_allocate(heap._client, cls.id))
        return call(op, **args)

    transport.call = watched
    heap.close()
    assert at_detach == [0], "the fast path still handed out objects while the daemon reclaimed them"
    with slitter.connect(daemon.address) as other:
        figures = other.stats()["classes"]["close-order"]
    assert figures["live"] == 0 and workers.balanced(figures), figures


def test_close_waits_for_a_thread_inside_a_fast_path_hook(daemon):
    procs, (seen,) = run_spawned(workers.close_during_hook, [(daemon.address,)])
    assert procs[0].exitcode == 0
    assert seen["epoch"] == 0, "close had not stopped the fast path"
    assert seen["close_waited"], "close unmapped the rack while a thread's native frame was using it"
    # The allocation under way when close began (the last of "held") completed; the next call was refused.
    assert seen["after"].endswith("is closed"), seen["after"]
    figures = seen["figures"]
    assert workers.balanced(figures) and figures["live"] == seen["held"], figures


def test_close_waits_for_a_slow_path_under_way(daemon):
    procs, (seen,) = run_spawned(workers.close_during_slow_path, [(daemon.address,)])
    assert procs[0].exitcode == 0
    assert seen["close_waited"], "close unmapped the heap while a thread's refill was under way"
    assert seen["after"].endswith("is closed"), seen["after"]  # the refill came back to a closed heap
    figures = seen["figures"]
    assert workers.balanced(figures) and figures["live"] == 0 and figures["cached"] == 0, figures


def test_closing_under_busy_threads_gives_each_the_closed_error_and_corrupts_nothing(daemon):
    rounds = 25
    procs, (ends,) = run_spawned(workers.close_under_load, [(daemon.address, rounds)], timeout=240)
    assert procs[0].exitcode == 0, "the process died: something touched an unmapped rack"
    assert ends == {"closed": 3 * rounds}, ends
    with slitter.connect(daemon.address) as heap:
        for name in ("load-64", "load-4k"):
            figures = heap.stats()["classes"][name]
            assert workers.balanced(figures), (name, figures)
            assert figures["cached"] == 0, (name, figures)  # every rack went back


def test_every_call_on_a_closed_heap_raises_the_closed_error(daemon):
    heap = slitter.connect(daemon.address)
    cls = heap.register_class("closed-calls", size=64)
    h = cls.allocate()
    batch = cls.allocate_many(10)
    heap.close()
    calls = {"allocate": cls.allocate, "release": lambda: cls.release(h), "allocate_many": lambda: cls.allocate_many(5),
             "release_many": lambda: cls.release_many(batch), "release_many(list)": lambda: cls.release_many(list(batch)),
             "check": lambda: cls.check(batch), "views": lambda: cls.views(batch), "view": lambda: heap.view(h),
             "arena": lambda: heap.arena, "stats": heap.stats, "audit": heap.audit,
             "register_class": lambda: heap.register_class("closed-calls", size=64)}
    for what, call in calls.items():
        with pytest.raises(slitter.SlitterError, match="is closed"):
            call()
    heap.close()  # idempotent


def test_close_from_a_signal_handler_during_the_same_threads_refill(daemon):
    """close() cannot wait for its own thread: it returns, the refill ends with 'closed', then the heap detaches."""
    procs, (seen,) = run_spawned(workers.close_from_signal_handler_in_slow_path, [(daemon.address,)], timeout=60)
    assert procs[0].exitcode == 0
    assert seen["closed_in_handler"], "close() did not return inside the handler"
    assert seen["after"].endswith("is closed"), seen["after"]
    assert not seen["attached"], "the heap never detached"
    figures = seen["classes"]["close-signal"]
    assert workers.balanced(figures) and figures["cached"] == 0 and figures["live"] == 0, figures


@pytest.mark.parametrize("finish", ["call", "close"])
def test_close_from_inside_a_hook_detaches_at_the_next_call_or_close(daemon, finish):
    procs, (seen,) = run_spawned(workers.close_from_inside_a_hook, [(daemon.address, finish)], timeout=60)
    assert procs[0].exitcode == 0
    assert seen["closed"] and seen["pending"], seen
    assert seen["before_next_call"], "detached while the hooked native frame still used the rack"
    if finish == "call":
        assert seen["after"].endswith("is closed"), seen["after"]
    assert not seen["attached"], f"the next {finish} did not finish the close"
    figures = seen["classes"]["close-in-hook"]
    assert workers.balanced(figures) and figures["cached"] == 0 and figures["live"] == seen["held"], figures


def test_a_child_forked_while_a_thread_is_in_a_hook_can_close(daemon):
    procs, (seen,) = run_spawned(workers.fork_while_a_thread_is_in_a_hook, [(daemon.address,)], timeout=90)
    assert procs[0].exitcode == 0
    assert seen["child_status"] == 0, "the child's close() hung (it waited for the parent's hooked thread)"


def test_a_bind_that_loses_the_race_with_close_says_closed(daemon):
    import threading

    heap = slitter.connect(daemon.address)
    cls = heap.register_class("close-bind", size=64)
    ensure = heap._ensure_attached
    closer = threading.Thread(target=heap.close)

    def closed_meanwhile():
        ensure()
        closer.start()  # another thread closes between the check and the native bind
        workers._await_epoch_zero(heap)

    heap._ensure_attached = closed_meanwhile
    with pytest.raises(slitter.SlitterError, match="is closed"):
        heap._bind(cls)
    closer.join(30)
    assert not closer.is_alive()


def test_allocate_many_cut_short_by_close_hands_over_what_it_allocated(daemon):
    """The objects allocate_many got before another thread closed the heap are live: the error carries them."""
    import threading

    heap = slitter.connect(daemon.address)
    cls = heap.register_class("close-many", size=64)
    cap = heap._classes_table[cls.id].mag_capacity
    closer = threading.Thread(target=heap.close)

    def close_meanwhile():  # the refill after the first magazine: another thread closes the heap
        closer.start()
        workers._await_epoch_zero(heap)

    cls.release(cls.allocate())  # bound, with a magazine and a spare: allocate_many needs one more refill
    heap._send_ahead = lambda *args, **kwargs: None  # and no prefetch fills the spare again meanwhile
    workers._on_refill(heap._transport, "call", close_meanwhile)
    with pytest.raises(slitter.SlitterError, match="is closed") as caught:
        cls.allocate_many(4 * cap)
    closer.join(30)
    got = caught.value.handles
    assert len(got) >= cap and 0 not in got and len(set(got)) == len(got)
    with slitter.connect(daemon.address) as other:
        figures = other.stats()["classes"]["close-many"]
        assert figures["live"] == len(got) and workers.balanced(figures), figures  # exactly those are live
        other_cls = other.register_class("close-many", size=64)
        other_cls.release_many(got)  # a handle is valid in every heap: they can still go back
        assert other.stats()["classes"]["close-many"]["live"] == 0


def test_a_release_that_went_through_is_not_reported_failed_on_a_heap_closed_meanwhile(daemon):
    """NEED_FLUSH means the native call released the objects: a close before the flush must not raise."""
    from slitter import _fastpath

    heap = slitter.connect(daemon.address)
    cls = heap.register_class("close-flush", size=64)
    h, batch = cls.allocate(), cls.allocate_many(3)
    heap.close()  # as another thread could, between the native release and its flush
    heap._release_slow(cls, h, _fastpath.NEED_FLUSH)
    heap._batch_released(cls, batch, _fastpath.NEED_FLUSH)
    with pytest.raises(slitter.SlitterError, match="is closed"):
        heap._release_slow(cls, h, _fastpath.NEED_SLOW)  # not released yet: that one must say so


def test_a_chunked_release_many_cut_short_by_close_says_how_many_went_back(daemon):
    import threading

    heap = slitter.connect(daemon.address)
    try:
        cls = heap.register_class("close-chunks", size=64)
        # More magazines than the shelf takes of one class, whatever size this thread's grew to;
        # a list: the general path, in chunks.
        handles = list(cls.allocate_many((lib.SLITTER_SHELF_PER_CLASS + 8) * lib.SLITTER_MAG_CAP))
        heap._send_ahead = lambda *args, **kwargs: None  # no flush ahead: past the shelf, each chunk waits for one
        closer = threading.Thread(target=heap.close)
        call = heap._transport.call

        def close_meanwhile(op, **args):
            if op is Op.FLUSH and not heap._closed:
                closer.start()
                workers._await_epoch_zero(heap)
            return call(op, **args)

        heap._transport.call = close_meanwhile
        with pytest.raises(slitter.SlitterError, match="is closed") as caught:
            cls.release_many(handles)
        closer.join(30)
    finally:
        heap.close()
    released = caught.value.released
    assert 0 < released < len(handles)
    with slitter.connect(daemon.address) as other:
        figures = other.stats()["classes"]["close-chunks"]
        assert figures["live"] == len(handles) - released and workers.balanced(figures), (released, figures)
        other.register_class("close-chunks", size=64).release_many(handles[released:])  # exactly the rest


def test_a_close_while_another_is_under_way_returns_only_once_the_heap_is_detached(daemon):
    """Closers that overlap a close still waiting for a slow path all return detached, not before."""
    procs, (seen,) = run_spawned(workers.concurrent_closes, [(daemon.address, 4)], timeout=90)
    assert procs[0].exitcode == 0 and not seen["hung"], seen
    assert seen["attached"] == [False] * 4, "a close() returned before the heap was detached"
    assert seen["after"].endswith("is closed"), seen["after"]


def test_a_reattach_in_a_forked_child_racing_close_leaves_nothing_open(daemon):
    """A forked child's first call re-attaches while another thread closes: the closed heap never re-attaches."""
    procs, (results,) = run_spawned(workers.reattach_racing_close_in_forked_child, [(daemon.address, 5)],
                                    timeout=180)
    assert procs[0].exitcode == 0
    for result in results:
        assert result["status"] == 0, f"the child died (wait status {result['status']:#x})"
        seen = result["seen"]
        assert not seen["attached_closed"], "the child re-attached a heap another thread had closed"
        assert seen["first"].endswith("is closed") and seen["second"].endswith("is closed"), seen
        assert seen["epoch"] == 0 and seen["left_open"] == [] and not seen["attached"], seen
        assert not seen["hung"], seen


@pytest.mark.parametrize("where", ["refill", "hook", "close"])
def test_a_second_close_from_a_signal_handler_does_not_wait_for_the_close_it_interrupted(daemon, where):
    """The handler runs inside the refill or the hook another thread's close waits for, or inside that close."""
    procs, (seen,) = run_spawned(workers.second_close_from_signal_handler, [(daemon.address, where)], timeout=90)
    assert seen["handler_returned"], "the handler's close() waited for a close that waited for it"
    assert procs[0].exitcode == 0 and not seen["attached"], seen


def test_a_child_forked_while_a_close_waits_can_close(daemon):
    procs, (seen,) = run_spawned(workers.fork_while_a_close_waits, [(daemon.address,)], timeout=90)
    assert procs[0].exitcode == 0
    assert seen["child_status"] == 0, "the child's close() hung (it waited for the parent's close)"
    assert not seen["attached"], seen


@pytest.mark.parametrize("how", ["allocate", "allocate_many", "slow path"])
def test_a_fork_inside_a_hook_leaves_the_child_a_rack_of_its_own(daemon, how):
    """A child forked inside the prefetch hook, on the hooked thread, does not come back to the parent's rack."""
    procs, (seen,) = run_spawned(workers.fork_inside_a_hook, [(daemon.address, how)], timeout=90)
    assert procs[0].exitcode == 0 and seen["forked"], seen
    assert seen["child_status"] == 0, f"the child failed (wait status {seen['child_status']:#x})"
    child = seen["child"]
    assert child["attached"] and len(child["got"]) == len(seen["parent_got"]), seen
    assert not set(child["got"]) & set(seen["parent_got"]), "the child handed out what the parent's call took"
    figures = seen["figures"]
    assert not seen["attached"] and figures["live"] == 0 and workers.balanced(figures), seen


def test_a_second_close_finishes_a_close_deferred_in_a_hook(daemon):
    """The second close() comes while the hooked thread's close is still deciding to defer."""
    procs, (seen,) = run_spawned(workers.close_overlapping_a_deferred_close, [(daemon.address,)], timeout=120)
    assert procs[0].exitcode == 0 and seen["overlapped"], seen
    assert seen["second_returned"], "the second close() waited for a deferred close nobody was finishing"
    assert not seen["attached"], seen


def test_a_close_interrupted_in_its_detach_is_finished_by_the_next(daemon):
    """Ctrl-C during the detach leaves the close pending: the next close() sends the detach, and returns detached."""
    heap = slitter.connect(daemon.address, name="interrupted")
    cls = heap.register_class("close-interrupted", size=64)
    cls.release(cls.allocate())
    transport = heap._transport
    call, interrupted = transport.call, []

    def interrupted_once(op, **args):
        if op is Op.DETACH and not interrupted:
            interrupted.append(op)
            raise KeyboardInterrupt
        return call(op, **args)

    transport.call = interrupted_once
    with pytest.raises(KeyboardInterrupt):
        heap.close()
    assert workers._daemon_view(daemon.address, "interrupted")["attached"]
    heap.close()
    assert not workers._daemon_view(daemon.address, "interrupted")["attached"], "the second close() did not detach"


def test_a_close_from_a_hook_nested_in_its_own_heaps_hook_is_deferred(daemon):
    """Heap one's close comes from heap two's hook, itself inside heap one's hook on the same thread."""
    procs, (seen,) = run_spawned(workers.close_from_a_nested_hook, [(daemon.address,)], timeout=90)
    assert seen["close_returned"], "close() waited for the hook of its own heap further out on its thread"
    assert procs[0].exitcode == 0, seen
    assert seen["attached_after_hook"] and seen["next_call"].endswith("is closed") and not seen["attached"], seen
    figures = seen["figures"]
    assert figures["live"] == 0 and workers.balanced(figures), figures
