"""Process targets for the multi-process tests (spawned children import them by name)."""

from __future__ import annotations

from array import array

import slitter

# The kinds of refused release that counted_mix makes and counts (test_counters checks them).
KINDS = ("class_mismatch", "interior_pointer", "foreign_address", "double_free")


def release_in_child(address, handle, queue):
    with slitter.connect(address) as heap:
        order = heap.register_class("order", size=64)
        try:
            order.release(handle)
            queue.put("released")
        except slitter.DoubleFree as exc:
            queue.put(f"DoubleFree: {exc}")


def release_all(address, handles, queue):
    ok = refused = 0
    with slitter.connect(address) as heap:
        cls = heap.register_class("race", size=32)
        for h in handles:
            try:
                cls.release(h)
                ok += 1
            except slitter.DoubleFree:
                refused += 1
    queue.put((ok, refused))


def writer(address, queue):
    with slitter.connect(address, name="writer") as heap:
        cls = heap.register_class("msg", size=128)
        for i in range(2000):
            h = cls.allocate()
            heap.view(h)[:] = (i.to_bytes(4, "little") * 32)
            queue.put(h)
        queue.put(None)


def churn(address, seed, keep, queue):
    import random

    rng = random.Random(seed)
    with slitter.connect(address, name=f"churn{seed}") as heap:
        classes = [heap.register_class("small", size=40), heap.register_class("big", size=5000)]
        live = []
        for _ in range(20000):
            if live and rng.random() < 0.48:
                cls, h = live.pop(rng.randrange(len(live)))
                cls.release(h)
            else:
                cls = rng.choice(classes)
                live.append((cls, cls.allocate()))
        kept = live[:keep]
        for cls, h in live[keep:]:
            cls.release(h)
        queue.put([(cls.name, h) for cls, h in kept])


def counted_mix(address, seed, queue):
    """A random mix of good and bad calls on two classes, counting what it did."""
    import random

    rng = random.Random(seed)
    mine = {name: {"allocations": 0, "releases": 0, **{k: 0 for k in KINDS}} for name in ("a", "b")}
    with slitter.connect(address, name=f"mix{seed}", policy="log") as heap:
        classes = {"a": heap.register_class("a", size=24), "b": heap.register_class("b", size=3000)}
        live = []
        freed = []
        for _ in range(8000):
            r = rng.random()
            name = rng.choice("ab")
            cls = classes[name]
            if r < 0.5 or not live:
                live.append((name, cls.allocate()))
                mine[name]["allocations"] += 1
            elif r < 0.95:
                owner, h = live.pop(rng.randrange(len(live)))
                classes[owner].release(h)
                mine[owner]["releases"] += 1
                freed.append((owner, h))
            else:
                owner, h = live[rng.randrange(len(live))]
                kind = rng.choice(KINDS)
                if kind == "class_mismatch":
                    classes["b" if owner == "a" else "a"].release(h)
                    mine["b" if owner == "a" else "a"][kind] += 1
                elif kind == "interior_pointer":
                    classes[owner].release(h + 8)
                    mine[owner][kind] += 1
                elif kind == "foreign_address":
                    classes[owner].release(rng.choice([8, 1 << 45, 1 << 70, -1]))
                    mine[owner][kind] += 1
                elif freed:
                    dead_owner, dead = freed[-1]
                    if all(dead != x for _, x in live):  # still free: a true double free
                        classes[dead_owner].release(dead)
                        mine[dead_owner][kind] += 1
        held = [(n, h) for n, h in live]
        sent = dict(heap._transport.sent)
    queue.put((mine, held, sent))


def balanced(figures: dict) -> bool:
    """A class's figures add up: every carved object is live, cached or free."""
    return figures["carved"] == figures["live"] + figures["cached"] + figures["free"]


def stamp(handle: int, size: int) -> bytes:
    """The content a load worker writes into an object: derived from its handle."""
    return (handle.to_bytes(8, "little") * (size // 8 + 1))[:size]


def step(heap, classes, held, rng, p_release: float) -> int:
    """One random operation of a load worker on ``held`` [(class, handle)]: release a held object
    (with probability ``p_release``), checking its stamp first, or allocate and stamp a new one.
    Returns 1 if the released object's content was wrong, else 0."""
    bad = 0
    if held and rng.random() < p_release:
        cls, h = held.pop(rng.randrange(len(held)))
        bad += bytes(heap.view(h)) != stamp(h, cls.size)
        cls.release(h)
    else:
        cls = rng.choice(classes)
        h = cls.allocate()
        heap.view(h)[:] = stamp(h, cls.size)
        held.append((cls, h))
    return bad


def verify(heap, held, release: bool = False) -> int:
    """How many of the ``held`` [(class, handle)] objects lack their stamp; each released after
    its check if ``release``."""
    bad = 0
    for cls, h in held:
        bad += bytes(heap.view(h)) != stamp(h, cls.size)
        if release:
            cls.release(h)
    return bad


def load_until(address, seed, stop_path, queue):
    """Allocate, write, verify and release until ``stop_path`` exists; report what is held.

    Rides out daemon restarts: the fast path needs no daemon, the slow path
    waits for it to come back.
    """
    import os
    import random

    rng = random.Random(seed)
    held = []
    bad = 0
    ops = 0
    with slitter.connect(address, name=f"load{seed}", timeout=30) as heap:
        classes = [heap.register_class("small", size=48), heap.register_class("large", size=2000)]
        while not os.path.exists(stop_path):
            for _ in range(500):
                ops += 1
                bad += step(heap, classes, held, rng, 0.49)
        bad += verify(heap, held)
        keep = held[: len(held) // 2]
        for cls, h in held[len(held) // 2:]:
            cls.release(h)
    queue.put({"seed": seed, "ops": ops, "bad": bad, "held": [(cls.name, h) for cls, h in keep]})


def model_stamp(handle: int, serial: int, size: int) -> bytes:
    """The content the model test writes into an object: its handle and a serial of the write."""
    return ((handle.to_bytes(8, "little") + serial.to_bytes(8, "little")) * (size // 16 + 1))[:size]


def model_client(address, conn):
    """One client of the stateful model test: executes commands from ``conn`` until "stop".

    Each command is a tuple; each answer is ("ok", value) or ("error", exception class name)
    (a batch release answers ("ok", [per-handle "ok" or exception class name])).
    """
    import os

    heap = slitter.connect(address, name=f"model{os.getpid()}", timeout=20)
    classes = {"a": heap.register_class("a", size=40), "b": heap.register_class("b", size=3000)}
    conn.send(("ready", os.getpid()))
    while True:
        try:
            op, *args = conn.recv()
        except EOFError:
            break
        if op == "stop":
            heap.close()
            conn.send(("ok", None))
            break
        try:
            if op in ("allocate", "allocate_many"):  # (class, n, first serial): n handles, each stamped
                name, n, serial = args
                cls = classes[name]
                handles = list(cls.allocate_many(n)) if op == "allocate_many" else [cls.allocate() for _ in range(n)]
                for i, h in enumerate(handles):
                    heap.view(h)[:] = model_stamp(h, serial + i, cls.size)
                result = handles
            elif op in ("release_many", "check"):  # (class, handles): "ok", or (error, its handle, released)
                name, handles = args
                batch = array("Q", handles) if all(0 <= h < 1 << 64 for h in handles) else handles
                try:
                    getattr(classes[name], op)(batch)
                    result = "ok"
                except slitter.ReleaseError as exc:
                    result = (type(exc).__name__, exc.handle, getattr(exc, "released", None))
            elif op == "release":  # ([(class, handle), ...]): each result on its own
                result = []
                for name, h in args[0]:
                    try:
                        classes[name].release(h)
                        result.append("ok")
                    except slitter.SlitterError as exc:
                        result.append(type(exc).__name__)
            elif op == "view":
                result = bytes(heap.view(args[0]))
            elif op == "write":
                handle, data = args
                heap.view(handle)[:] = data
                result = None
            else:
                raise ValueError(f"unknown command {op!r}")
            conn.send(("ok", result))
        except slitter.SlitterError as exc:
            conn.send(("error", type(exc).__name__))


def death_encode(class_index: int, handle: int) -> int:
    """A held handle as the client-death record stores it: class index + 1 in the top byte."""
    return (class_index + 1) << 56 | handle


def death_decode(value: int) -> tuple[int, int]:
    """(class index, handle) of a record entry; the index is -1 for an empty entry."""
    return (value >> 56) - 1, value & ((1 << 56) - 1)


BATCH_VICTIM_MAX = 3000  # the most objects batch_victim holds at once


def batch_victim(address, seed, ready):
    """Allocate and release random batches of class "batches" until killed; one in five releases is refused first.

    The refused ``release_many`` names its first handle twice: all or none,
    so it changes nothing, after marking and unmarking the bytes before the
    repeat.
    """
    import random

    rng = random.Random(seed)
    heap = slitter.connect(address, name="batch victim")
    cls = heap.register_class("batches", size=64)
    ready.put("looping")
    while True:
        handles = cls.allocate_many(BATCH_VICTIM_MAX if rng.random() < 0.5 else rng.randint(1, BATCH_VICTIM_MAX))
        if rng.random() < 0.2:
            try:
                cls.release_many(handles + handles[:1])
            except slitter.DoubleFree:
                pass
            else:
                raise AssertionError("a batch naming an object twice was released")
        cls.release_many(handles)


def death_loop(address, seed, record_path, slots, sizes):
    """Allocate, stamp, verify and release at random on ``sizes`` until SIGKILLed.

    Everything the process holds is in the shared file ``record_path``, an
    array of uint64: [0] 1 once attached, [1] operations done, [2] the
    operation under way (0 none, 1 allocate, 2 release), [3] its encoded
    handle (only the class for an allocate), [4] objects whose content was
    wrong, [5] the entry an allocate under way fills, [6..7] unused, then
    ``slots`` entries of encoded held handles (0: empty).  An allocate is
    recorded in the same statement as the call (its object is stamped
    after, while [2] still says 1); a release is recorded (entry cleared)
    before it starts.  So at any instant the held set is the recorded set,
    plus at most the one object of the operation under way.
    """
    import mmap
    import random

    rng = random.Random(seed)
    with open(record_path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 8 * (8 + slots))
    rec = memoryview(mm).cast("Q")
    heap = slitter.connect(address, name=f"victim{seed}", timeout=10)
    classes = [heap.register_class(f"death{size}", size=size) for size in sizes]
    view = heap.view
    free = list(range(slots - 1, -1, -1))
    held = []  # (slot, class index, handle)
    ops = 0
    rec[0] = 1
    while True:
        bias = rng.choice((0.25, 0.5, 0.75))  # shrink, steady or grow for a batch
        for _ in range(rng.randint(1, 600)):
            ops += 1
            if held and (rng.random() > bias or not free):
                i = rng.randrange(len(held))
                held[i], held[-1] = held[-1], held[i]
                slot, ci, h = held.pop()
                cls = classes[ci]
                if bytes(view(h)) != stamp(h, cls.size):
                    rec[4] += 1
                rec[3] = death_encode(ci, h)
                rec[2] = 2
                rec[8 + slot] = 0
                cls.release(h)
                rec[2] = 0
                free.append(slot)
            else:
                ci = 0 if rng.random() < 0.6 else 1
                cls = classes[ci]
                tag = death_encode(ci, 0)
                slot = free.pop()
                rec[5] = slot
                rec[3] = tag
                rec[2] = 1
                rec[8 + slot] = tag | cls.allocate()
                h = rec[8 + slot] ^ tag
                view(h)[:] = stamp(h, cls.size)
                rec[2] = 0
                held.append((slot, ci, h))
        rec[1] = ops


def death_bystander(address, seed, sizes, conn):
    """A client that survives: a burst of random work on ``conn``'s "burst", then idle.

    Answers "burst" with ("idle", held count) and "stop" with ("done", objects
    whose content was wrong) after verifying, releasing and detaching.
    """
    import random

    rng = random.Random(seed)
    heap = slitter.connect(address, name="bystander", timeout=10)
    classes = [heap.register_class(f"death{size}", size=size) for size in sizes]
    held = []
    bad = 0
    while True:
        command = conn.recv()
        if command == "stop":
            break
        for _ in range(rng.randint(100, 3000)):
            bad += step(heap, classes, held, rng, 0.5)
        conn.send(("idle", len(held)))
    bad += verify(heap, held, release=True)
    heap.close()
    conn.send(("done", bad))


def checks_per_class_key(address, queue):
    """Every release check for the first class keys of a process and for keys past 256.

    A class key is 16 bits (SLITTER_KEY_BITS); this fresh process makes
    classes before and after using up 256 keys, so keys of one byte and of
    two go through ``Class.allocate``/``release`` (slitter._entry) and the
    batch calls alike.
    """
    from slitter._native import lib

    def outcome(call):
        try:
            call()
            return "ok"
        except slitter.SlitterError as exc:
            return type(exc).__name__

    results = {}
    with slitter.connect(address) as heap:
        early = heap.register_class("order", size=64), heap.register_class("trade", size=1000)
        for _ in range(256):  # past the keys of one byte
            lib.slitter_key_new(heap._client, early[0].id)
        late = heap.register_class("late-order", size=64), heap.register_class("late-trade", size=1000)
        for label, (order, trade) in (("early", early), ("late", late)):
            h, t = order.allocate(), trade.allocate()
            results[label] = {
                "key": order._key,
                "mismatch": outcome(lambda: order.release(t)),
                "interior": outcome(lambda: trade.release(t + 8)),
                "foreign": [outcome(lambda b=b: order.release(b)) for b in (0, 1 << 48, (1 << 64) - 1, 1 << 70, -16)],
                "release": outcome(lambda: order.release(h)),
                "double free": outcome(lambda: order.release(h)),
                "many": outcome(lambda: [order.release(x) for x in [order.allocate() for _ in range(2000)]]),
                "batch": outcome(lambda: order.release_many(order.check(order.allocate_many(64)))),
                "batch mismatch": outcome(lambda: order.check(array("Q", [t]))),
                "batch double free": outcome(lambda: order.release_many(array("Q", [h]))),
                "cleanup": outcome(lambda: trade.release(t)),
            }
    queue.put(results)


def arena_writer(address, count, queue, done):
    """Allocate ``count`` objects, stamp each through Heap.arena, and pass the handles on."""
    with slitter.connect(address, name="arena-writer") as heap:
        cls = heap.register_class("shared", size=48)
        handles = cls.allocate_many(count)
        arena = heap.arena
        for i, h in enumerate(handles):
            arena[h:h + 48] = i.to_bytes(8, "little") * 6
        queue.put(list(handles))
        done.get(timeout=120)  # stay attached until the reader is done


def shelf_consumer(address, size, conn, queue):
    """Release what the producer sends (checking each stamp); report the flushes this process sent."""
    bad = 0
    with slitter.connect(address, name="consumer") as heap:
        cls = heap.register_class("shelf-stream", size=size)
        while True:
            raw = conn.recv_bytes()
            if not raw:
                break
            handles = array("Q")
            handles.frombytes(raw)
            cls.check(handles)
            bad += verify(heap, [(cls, h) for h in handles])
            cls.release_many(handles)
            conn.send_bytes(b"ok")
        queue.put({"bad": bad, "flushes": heap._transport.sent["flush"], "refills": heap._transport.sent["refill"]})


def shelf_of(heap):
    """The client's mapping of the shelf, as a struct slitter_shelf."""
    from slitter._native import ffi

    return ffi.cast("struct slitter_shelf *", heap._shelf.ptr)


def slots_in_state(heap, state: int) -> list[int]:
    """The indexes of the shelf slots whose state word is ``state``."""
    from slitterd.shelf import slot_states

    return [i for i, seen in enumerate(slot_states(shelf_of(heap))) if seen == state]


def shelve_one(heap, cls) -> int:
    """Release two magazines' worth: the first refills our allocation magazine, the second goes on the shelf.

    Returns the magazine capacity.
    """
    cap = heap._classes_table[cls.id].mag_capacity
    cls.release_many(cls.allocate_many(2 * cap))
    return cap


def shelf_holder_dies(address, size, queue):
    """Put a magazine on the shelf, claim it back as a taker would, and die holding it."""
    import os
    import signal

    from slitter._native import lib
    from slitterd.shelf import shelf_state

    heap = slitter.connect(address, name="holder")
    cls = heap.register_class("shelf-held", size=size)
    shelve_one(heap, cls)
    shelf = shelf_of(heap)
    (index,) = slots_in_state(heap, shelf_state(lib.SLITTER_SHELF_FULL, cls.id))
    rack_index = heap._client.cache_tag - lib.SLITTER_TAG_BASE
    shelf.slots[index].state = shelf_state(lib.SLITTER_SHELF_BUSY, rack_index)
    queue.put((index, shelf.slots[index].count))
    queue.close()
    queue.join_thread()  # the item is in the pipe before we die
    os.kill(os.getpid(), signal.SIGKILL)


def shelf_and_wait(address, size, queue):
    """Put a magazine on the shelf, say how many handles, then wait to be killed."""
    import time

    heap = slitter.connect(address, name="shelver")
    cls = heap.register_class("shelf-restart", size=size)
    queue.put(shelve_one(heap, cls))
    time.sleep(600)


def _await_epoch_zero(heap, seconds: float = 30) -> int:
    """Wait (at most ``seconds``) for a closing heap to stop its fast path; its native epoch."""
    import time

    deadline = time.monotonic() + seconds
    while heap._client.epoch != 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    return int(heap._client.epoch)


def _allocate_outcome(cls) -> str:
    """"allocated", or the message of the SlitterError one more allocate raised."""
    try:
        cls.allocate()
        return "allocated"
    except slitter.SlitterError as exc:
        return str(exc)


def _on_refill(owner, attr: str, action) -> None:
    """Wrap ``owner.attr`` (``transport.call`` or ``heap._send_ahead``): ``action()`` runs before each REFILL."""
    from slitter.protocol import Op

    original = getattr(owner, attr)

    def wrapped(op, *args, **kwargs):
        if op is Op.REFILL:
            action()
        return original(op, *args, **kwargs)

    setattr(owner, attr, wrapped)


def _held_at_refill(owner, attr: str):
    """``_on_refill`` with an action that sets ``inside`` and waits for ``go``; returns (inside, go)."""
    import threading

    inside, go = threading.Event(), threading.Event()

    def hold():
        inside.set()
        go.wait(60)

    _on_refill(owner, attr, hold)
    return inside, go


def _close_while_held(heap, inside, go, worker) -> dict:
    """Start ``worker``; once ``inside`` is set, close the heap from another thread and see whether it waits.

    Returns {"epoch": the native epoch once close began, "close_waited": still closing 0.5 s on}.
    """
    import threading

    worker.start()
    assert inside.wait(60), "the worker never got inside"
    closer = threading.Thread(target=heap.close)
    closer.start()
    seen = {"epoch": _await_epoch_zero(heap)}  # the fast path is stopped at once
    closer.join(0.5)
    seen["close_waited"] = closer.is_alive()  # but close waits for the thread inside
    go.set()
    worker.join(60)
    closer.join(60)
    return seen


def close_during_hook(address, queue):
    """Close the heap while another thread is inside the fast path's prefetch hook; report what each saw.

    Runs in its own process: were the rack unmapped under the hooked thread,
    the process would die of SIGSEGV rather than take the test run with it.
    """
    import threading

    heap = slitter.connect(address, name="closer")
    cls = heap.register_class("close-hook", size=64)
    cap = heap._classes_table[cls.id].mag_capacity
    inside, go = _held_at_refill(heap, "_send_ahead")  # the prefetch hook blocks
    seen = {}

    def allocate_on():
        seen["held"] = len([cls.allocate() for _ in range(cap + 1)])  # the last one's hook blocks
        seen["after"] = _allocate_outcome(cls)

    seen.update(_close_while_held(heap, inside, go, threading.Thread(target=allocate_on)))
    seen["figures"] = _daemon_view(address, "closer")["classes"]["close-hook"]
    queue.put(seen)


def close_under_load(address, rounds, queue):
    """Open a heap, let three threads hammer it, close it at a random moment; ``rounds`` times.

    Reports how each thread ended: the closed heap's SlitterError, or anything else.
    """
    import collections
    import random
    import threading
    import time

    ends = collections.Counter()
    for round_ in range(rounds):
        heap = slitter.connect(address, name="closed-under-load")
        classes = [heap.register_class("load-64", size=64), heap.register_class("load-4k", size=4096)]

        def work(seed):
            rng = random.Random(seed)
            held = []
            try:
                while True:
                    cls = classes[seed % 2]
                    op = rng.random()
                    if op < 0.3:
                        h = cls.allocate()
                        heap.view(h)[:8] = b"slitter!"
                        held.append(h)
                    elif op < 0.5 and held:
                        cls.release(held.pop())
                    elif op < 0.7:
                        held.extend(cls.allocate_many(rng.randrange(1, 300)))
                    elif held:
                        k = rng.randrange(len(held) + 1)
                        batch, held[:k] = held[:k], []
                        cls.check(batch)
                        cls.release_many(batch if rng.random() < 0.5 else array("Q", batch))
            except slitter.SlitterError as exc:
                ends["closed" if str(exc).endswith("is closed") else f"SlitterError: {exc}"] += 1
            except Exception as exc:  # noqa: BLE001 - what the test must never see
                ends[f"{type(exc).__name__}: {exc}"] += 1

        threads = [threading.Thread(target=work, args=(round_ * 3 + i,)) for i in range(3)]
        for t in threads:
            t.start()
        time.sleep(random.Random(round_).uniform(0, 0.03))
        heap.close()
        for t in threads:
            t.join(60)
    queue.put(dict(ends))


def close_during_slow_path(address, queue):
    """Close the heap while another thread's refill waits for the daemon; report what each saw."""
    import threading

    heap = slitter.connect(address, name="closer")
    cls = heap.register_class("close-slow", size=64)
    inside, go = _held_at_refill(heap._transport, "call")  # a refill that takes its time
    seen = {}

    def allocate():
        seen["after"] = _allocate_outcome(cls)  # unbound: the slow path refills

    seen.update(_close_while_held(heap, inside, go, threading.Thread(target=allocate)))
    seen["figures"] = _daemon_view(address, "closer")["classes"]["close-slow"]
    queue.put(seen)


def _daemon_view(address, name) -> dict:
    """The daemon's view: {"attached": is a client called ``name`` attached, "classes": the class figures}."""
    with slitter.connect(address) as other:
        stats = other.stats()
    return {"attached": any(c["name"] == name for c in stats["clients"]), "classes": stats["classes"]}


def close_from_signal_handler_in_slow_path(address, queue):
    """A SIGUSR1 handler closes the heap while the same thread's refill is under way.

    close() cannot wait for its own thread: it must return, the refill's
    slow path must end with the closed error, and the heap detach then.
    """
    import os
    import signal

    heap = slitter.connect(address, name="signalled")
    cls = heap.register_class("close-signal", size=64)
    seen = {"closed_in_handler": False}

    def handler(signum, frame):
        heap.close()
        seen["closed_in_handler"] = True

    signal.signal(signal.SIGUSR1, handler)
    # The handler runs before the next bytecode, in the refill's slow path.
    _on_refill(heap._transport, "call", lambda: os.kill(os.getpid(), signal.SIGUSR1))
    seen["after"] = _allocate_outcome(cls)
    seen.update(_daemon_view(address, "signalled"))
    queue.put(seen)


def close_from_inside_a_hook(address, finish, queue):
    """close() runs inside the prefetch hook, on the hooked thread; then ``finish``: "call" the heap, or "close" it.

    Either must finish the close that had to wait for the hooked native frame.
    """
    heap = slitter.connect(address, name="hooked")
    cls = heap.register_class("close-in-hook", size=64)
    cap = heap._classes_table[cls.id].mag_capacity
    _on_refill(heap, "_send_ahead", heap.close)  # as a signal handler could
    held = [cls.allocate() for _ in range(cap + 1)]  # the last one takes the spare: the hook closes
    seen = {"held": len(held), "closed": heap._closed, "pending": heap._close_pending}
    seen["before_next_call"] = _daemon_view(address, "hooked")["attached"]
    if finish == "call":
        seen["after"] = _allocate_outcome(cls)
    else:
        heap.close()  # as leaving a `with` block does
    seen.update(_daemon_view(address, "hooked"))
    queue.put(seen)


def fork_while_a_thread_is_in_a_hook(address, queue):
    """Fork while another thread is inside the prefetch hook; the child's close() must return."""
    import threading

    heap = slitter.connect(address, name="forker")
    cls = heap.register_class("close-fork", size=64)
    cap = heap._classes_table[cls.id].mag_capacity
    inside, go = _held_at_refill(heap, "_send_ahead")  # the prefetch hook blocks
    worker = threading.Thread(target=lambda: [cls.allocate() for _ in range(cap + 1)])
    worker.start()
    assert inside.wait(60), "the prefetch hook never ran"
    status = _close_in_child(heap)  # the hooked thread is the parent's
    go.set()
    worker.join(60)
    heap.close()
    queue.put({"child_status": status})


def _child_status(pid: int, seconds: float) -> int:
    """The wait status of child ``pid``; killed (SIGKILL) if it has not ended within ``seconds``."""
    import os
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.005)
    os.kill(pid, 9)
    return os.waitpid(pid, 0)[1]


def _close_in_child(heap, seconds: float = 30) -> int:
    """Fork a child that closes ``heap`` and exits 0 once close() returned; its wait status (SIGKILL if hung)."""
    import os

    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            heap.close()
            code = 0
        finally:
            os._exit(code)
    return _child_status(pid, seconds)


def concurrent_closes(address, closers, queue):
    """``closers`` threads close the heap while the first close still waits for a thread's refill.

    Each closer asks the daemon, as soon as its close() has returned,
    whether the heap is still attached.  The refill goes on only once every
    later closer has returned or is blocked waiting, so they all overlap
    the first close.
    """
    import threading
    import time

    heap = slitter.connect(address, name="closed-twice")
    cls = heap.register_class("close-twice", size=64)
    inside, go = _held_at_refill(heap._transport, "call")
    seen = {"attached": []}

    def allocate():
        seen["after"] = _allocate_outcome(cls)  # unbound: the slow path refills

    def close():
        heap.close()
        seen["attached"].append(_daemon_view(address, "closed-twice")["attached"])

    worker = threading.Thread(target=allocate)
    worker.start()
    assert inside.wait(60), "the worker never got inside"
    threads = [threading.Thread(target=close)]
    threads[0].start()
    _await_epoch_zero(heap)  # the first close is under way: it waits for the worker
    threads += [threading.Thread(target=close) for _ in range(closers - 1)]
    for t in threads[1:]:
        t.start()
    deadline = time.monotonic() + 30
    while not all(_blocked_closing(t) for t in threads[1:]) and time.monotonic() < deadline:
        time.sleep(0.001)
    go.set()
    for t in [worker, *threads]:
        t.join(60)
    seen["hung"] = sum(t.is_alive() for t in [worker, *threads])
    queue.put(seen)


def reattach_racing_close_in_forked_child(address, rounds, queue):
    """Fork ``rounds`` children; in each, one thread's first call re-attaches while another closes the heap.

    The re-attaching thread is held between its unlocked look at
    ``closed`` and taking the heap's lock until the close has begun, so
    every round lands in that window.  Then it calls the heap again, after
    close() returned: over a rack that close unmapped, were the native
    client open again.  Reports each child's wait status and what it saw.
    """
    import json
    import os

    heap = slitter.connect(address, name="forked-race")
    cls = heap.register_class("fork-race", size=64)
    cls.release(cls.allocate())  # bound, with cached objects: the child's rack is its own
    results = []
    for _ in range(rounds):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            code = 1
            try:
                seen = _reattach_racing_close(address, heap, cls)
                os.write(write_end, json.dumps(seen).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write_end)
        status = _child_status(pid, 60)
        with os.fdopen(read_end, "rb") as reader:
            report = reader.read()
        results.append({"status": status, "seen": json.loads(report) if report else None})
    heap.close()
    queue.put(results)


def _reattach_racing_close(address, heap, cls) -> dict:
    """In a forked child: see reattach_racing_close_in_forked_child."""
    import os
    import threading
    import time

    at_lock, closed = threading.Event(), threading.Event()
    seen = {"attached_closed": False}
    lock = heap._lock  # the child's own (_after_fork_in_child)

    class Gate:
        """The heap's lock; the re-attaching thread's first take of it waits until close has begun."""

        def __enter__(self):
            if threading.current_thread() is reattacher and not at_lock.is_set():
                at_lock.set()
                deadline = time.monotonic() + 30
                while not heap._closed and time.monotonic() < deadline:
                    time.sleep(0.0005)
            return lock.__enter__()

        def __exit__(self, *exc):
            return lock.__exit__(*exc)

    attach = heap._attach

    def watched_attach():
        seen["attached_closed"] |= heap._closed
        attach()

    heap._lock, heap._attach = Gate(), watched_attach

    def reattach():
        seen["first"] = _allocate_outcome(cls)  # epoch 0 after the fork: the slow path re-attaches
        closed.wait(60)
        seen["second"] = _allocate_outcome(cls)  # the fast path: must not use an unmapped rack

    reattacher = threading.Thread(target=reattach)
    reattacher.start()
    at_lock.wait(60)
    heap.close()
    seen["epoch"] = int(heap._client.epoch)
    seen["left_open"] = [what for what, still in (("transport", heap._transport is not None),
                                                   ("rack", heap._rack.ptr is not None),
                                                   ("tables", heap._tables.ptr is not None)) if still]
    with slitter.connect(address) as other:
        seen["attached"] = any(c["pid"] == os.getpid() and c["name"] == heap.name for c in other.stats()["clients"])
    closed.set()
    reattacher.join(60)
    seen["hung"] = reattacher.is_alive()
    return seen


def second_close_from_signal_handler(address, where, queue):
    """A SIGUSR1 handler on the main thread closes the heap again while a close waits for the main thread.

    ``where`` the handler runs: "refill", in the main thread's refill that
    another thread's close waits for; "hook", in the main thread's prefetch
    hook, likewise; "close", in the main thread's own close, which waits
    for another thread's refill.  The handler's close() must return at
    once: waiting for that close to finish would wait for itself.
    """
    import os
    import signal
    import threading

    heap = slitter.connect(address, name="closed-in-handler")
    cls = heap.register_class("close-handler", size=64)
    inside, handled = threading.Event(), threading.Event()

    def handler(signum, frame):
        heap.close()
        handled.set()

    def at_refill():  # in the refill (or hook) the first close waits for
        inside.set()
        if where != "close":
            threading.Thread(target=heap.close).start()
        _await_epoch_zero(heap)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
        handled.wait(60)

    def watchdog():  # a handler that waits forever must fail the test, not hang it
        if not handled.wait(30):
            queue.put({"handler_returned": False})
            queue.close()
            queue.join_thread()
            os._exit(1)

    signal.signal(signal.SIGUSR1, handler)
    threading.Thread(target=watchdog, daemon=True).start()
    if where == "hook":
        _on_refill(heap, "_send_ahead", at_refill)
        cap = heap._classes_table[cls.id].mag_capacity
        [cls.allocate() for _ in range(cap + 1)]  # the last one takes the spare: the hook runs
    else:
        _on_refill(heap._transport, "call", at_refill)
        if where == "refill":
            _allocate_outcome(cls)  # unbound: the slow path refills
        else:
            threading.Thread(target=_allocate_outcome, args=(cls,)).start()
            assert inside.wait(60), "the worker never got inside"
    heap.close()  # from outside the heap: returns detached
    queue.put({"handler_returned": True, **_daemon_view(address, "closed-in-handler")})


def fork_while_a_close_waits(address, queue):
    """Fork while another thread's close waits for a refill; the child's close() must return."""
    import threading

    heap = slitter.connect(address, name="fork-closing")
    cls = heap.register_class("close-fork-waiting", size=64)
    inside, go = _held_at_refill(heap._transport, "call")
    worker = threading.Thread(target=_allocate_outcome, args=(cls,))
    worker.start()
    assert inside.wait(60), "the worker never got inside"
    closer = threading.Thread(target=heap.close)
    closer.start()
    _await_epoch_zero(heap)
    status = _close_in_child(heap)  # the close under way is the parent's
    go.set()
    worker.join(60)
    closer.join(60)
    queue.put({"child_status": status, **_daemon_view(address, "fork-closing")})


def fork_inside_a_hook(address, how, queue):
    """Fork on the hooked thread itself, inside the prefetch hook, as a signal handler there would.

    ``how`` the hook is reached: "allocate" (the fast path takes the spare),
    "allocate_many" (a batch takes it after two objects), or "slow path"
    (this thread last used another heap, so allocate goes through
    ``_allocate_slow``, whose native call takes it).  The child comes back
    from the hook into its copy of that native frame, whose rack is the
    parent's and unmapped in the child: it must touch none of it and hand
    out nothing the parent's call took before the fork, and its allocation
    must go on in a rack of its own.  Reports the child's wait status, what
    it got, and the daemon's figures once parent and child are done.
    """
    import json
    import os

    heap = slitter.connect(address, name="fork-in-hook")
    cls = heap.register_class("fork-in-hook", size=64)
    cap = heap._classes_table[cls.id].mag_capacity
    held = [cls.allocate() for _ in range(cap - 2 if how == "allocate_many" else cap)]  # the spare is full
    other = None
    if how == "slow path":
        other = slitter.connect(address, name="fork-in-hook-other")
        other_cls = other.register_class("fork-in-hook-other", size=64)
        other_cls.release(other_cls.allocate())  # this thread's last heap is the other one
    forked: list[int] = []

    def fork_once():
        if not forked:
            forked.append(os.fork())

    _on_refill(heap, "_send_ahead", fork_once)
    read_end, write_end = os.pipe()
    got = list(cls.allocate_many(5)) if how == "allocate_many" else [cls.allocate()]
    if forked == [0]:  # the child
        code = 1
        try:
            report = {"got": got, "attached": heap._client.epoch != 0}
            cls.release_many(got)  # the child's own: the parent's are the parent's to release
            cls.release_many(cls.allocate_many(cap + 1))
            heap.close()
            os.write(write_end, json.dumps(report).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    status = _child_status(forked[0], 60) if forked else None
    with os.fdopen(read_end, "rb") as reader:
        child = json.loads(reader.read() or b"null")
    cls.release_many(held + got)
    heap.close()
    if other is not None:
        other.close()
    view = _daemon_view(address, "fork-in-hook")
    queue.put({"forked": bool(forked), "child_status": status, "child": child, "parent_got": got,
               "attached": view["attached"], "figures": view["classes"]["fork-in-hook"]})


def _blocked_closing(thread) -> bool:
    """Whether ``thread`` has ended, or waits inside a close: on an Event, or for threads to leave the heap."""
    import sys
    import threading

    frame = sys._current_frames().get(thread.ident)
    if frame is None:
        return True
    while frame is not None:
        if frame.f_code is threading.Condition.wait.__code__ or frame.f_code.co_name == "_detach_and_unmap":
            return True
        frame = frame.f_back
    return False


def close_overlapping_a_deferred_close(address, queue):
    """A second close() lands just as a close from inside the prefetch hook (so deferred) leaves its locked part.

    The second closer must finish the deferred close once the hooked thread
    has left the hook, not wait for a close that nobody is running.
    """
    import threading
    import time

    heap = slitter.connect(address, name="close-overlap")
    cls = heap.register_class("close-overlap", size=64)
    cap = heap._classes_table[cls.id].mag_capacity
    lock, armed = heap._lock, []
    second = threading.Thread(target=heap.close, daemon=True)

    class Gate:
        """The heap's lock; the hooked close's first release of it starts the second closer, and lets it block."""

        def __enter__(self):
            return lock.__enter__()

        def __exit__(self, *exc):
            released = lock.__exit__(*exc)
            if armed == [True] and threading.current_thread() is threading.main_thread():
                armed.append(True)
                second.start()
                deadline = time.monotonic() + 30
                while not _blocked_closing(second) and time.monotonic() < deadline:
                    time.sleep(0.001)
            return released

    heap._lock = Gate()

    def close_in_hook():
        armed.append(True)
        heap.close()

    _on_refill(heap, "_send_ahead", close_in_hook)
    [cls.allocate() for _ in range(cap + 1)]  # the last one takes the spare: the hook closes the heap
    second.join(30)
    queue.put({"overlapped": len(armed) == 2, "second_returned": not second.is_alive(),
               **_daemon_view(address, "close-overlap")})


def close_from_a_nested_hook(address, queue):
    """In heap one's prefetch hook, this thread takes heap two's spare, and two's hook closes heap one.

    One's native frame is still in its hook, further out on this very
    thread: the close must see that (it is deferred) rather than wait for
    its own thread, and the next call on heap one finishes it.
    """
    import os
    import threading

    one = slitter.connect(address, name="nested-one")
    two = slitter.connect(address, name="nested-two")
    cls_one = one.register_class("nested-one", size=64)
    cls_two = two.register_class("nested-two", size=64)
    held_two = [cls_two.allocate() for _ in range(two._classes_table[cls_two.id].mag_capacity)]
    held_one = [cls_one.allocate() for _ in range(one._classes_table[cls_one.id].mag_capacity)]  # the last heap
    seen: dict = {}
    closed = threading.Event()

    def watchdog():  # a close that waits for its own thread must fail the test, not hang it
        if not closed.wait(30):
            queue.put({"close_returned": False})
            queue.close()
            queue.join_thread()
            os._exit(1)

    def in_one_hook():
        if "inner" not in seen:
            seen["inner"] = cls_two.allocate()  # two's slow path, whose native call takes two's spare

    def in_two_hook():
        if not closed.is_set():
            one.close()
            closed.set()

    threading.Thread(target=watchdog, daemon=True).start()
    _on_refill(one, "_send_ahead", in_one_hook)
    _on_refill(two, "_send_ahead", in_two_hook)
    held_one.append(cls_one.allocate())  # the fast path takes one's spare: one's hook runs
    seen["close_returned"] = closed.is_set()
    seen["attached_after_hook"] = _daemon_view(address, "nested-one")["attached"]
    seen["next_call"] = _allocate_outcome(cls_one)  # finishes the deferred close
    seen["attached"] = _daemon_view(address, "nested-one")["attached"]
    two.register_class("nested-one", size=64).release_many(held_one)
    cls_two.release_many([*held_two, seen.pop("inner")])
    two.close()
    seen["figures"] = _daemon_view(address, "nested-two")["classes"]["nested-one"]
    queue.put(seen)


def killed_between_byte_and_count(address, op, changed, queue):
    """Leave this client's rack as a SIGKILL between an operation's live byte and its count would, then die.

    ``op`` and ``changed``: see ``leave_in_the_window``.  Reports how many
    objects it holds live, then SIGKILLs itself.
    """
    import os
    import signal

    heap = slitter.connect(address, name="window")
    queue.put(leave_in_the_window(heap, op, changed))
    queue.close()
    queue.join_thread()
    os.kill(os.getpid(), signal.SIGKILL)


def _cached_by_another_thread(heap, cls) -> int:
    """A handle another thread of this client leaves in its allocation magazine."""
    import threading

    from slitter._native import lib

    found = []

    def cache() -> None:
        cls.release(cls.allocate())
        tc = heap._client.rack.threads[lib.slitter_bind(heap._client, cls.id)].classes[cls.id]
        found.append(tc.alloc[tc.alloc_count - 1])

    thread = threading.Thread(target=cache)
    thread.start()
    thread.join()
    return found[0]


WINDOW_BATCH = 20  # the batch a kill interrupts in leave_in_the_window
WINDOW_DONE = 12  # how many of its objects' bytes had changed, when they had


def leave_in_the_window(heap, op: str, changed: bool) -> int:
    """Set the rack up as a kill between ``op``'s live byte and its count would leave it; objects held live.

    ``op`` "allocate", "release", "allocate_many", "release_many" or
    "release_many split" (the batch's slots in both magazines);
    ``changed``: the kill came after the byte change (so the operation
    happened and must be counted; for a batch, after WINDOW_DONE of
    WINDOW_BATCH objects), else before it.  The fast path itself does the
    operation, then the steps after the kill point are undone: the count
    goes back with the counting bit set, and released handles go back out
    of the magazine into the slots they were pushed to.
    """
    from slitter._native import lib

    cls = heap.register_class("window", size=64)
    held = [cls.allocate() for _ in range(10 + WINDOW_BATCH)]
    cls.release(cls.allocate())  # the magazine has objects and room
    tc = heap._client.rack.threads[lib.slitter_bind(heap._client, cls.id)].classes[cls.id]
    counters, counting = tc.counters, lib.SLITTER_COUNTING
    done = WINDOW_DONE if changed else 0
    if op == "allocate_many":
        cls.release_many(cls.allocate_many(WINDOW_BATCH))  # the magazine's top WINDOW_BATCH are the chunk
        top = tc.alloc_count
        held += cls.allocate_many(done)  # the loop takes from the top: these, then the rest
        tc.alloc_count, tc.pending = top - WINDOW_BATCH, WINDOW_BATCH  # the chunk popped first
        counters.allocations = (counters.allocations - done) | counting
        return len(held)
    if op.startswith("release_many"):
        batch, held = held[-WINDOW_BATCH:], held[:-WINDOW_BATCH]
        start, release_start = tc.alloc_count, tc.release_count
        cls.release_many(batch[:done])
        held += batch[done:]  # their bytes had not changed: still live
        # Every handle in its slot before the first byte changed; and in the
        # last two slots, as after a kill in the middle of a refused batch,
        # objects this rack caches, in this thread's magazine and in
        # another thread's: tagged, but not by this batch.  "split": the
        # allocation magazine had room for 8, the rest went to the release one.
        slots = batch[:-2] + [tc.alloc[0], _cached_by_another_thread(heap, cls)]
        into_alloc = 8 if op == "release_many split" else WINDOW_BATCH
        for i, h in enumerate(slots[:into_alloc]):
            tc.alloc[start + i] = h
        for i, h in enumerate(slots[into_alloc:]):
            tc.release[release_start + i] = h
        tc.alloc_count, tc.release_count = start, release_start
        tc.pending = into_alloc | (WINDOW_BATCH - into_alloc) << lib.SLITTER_PENDING_SHIFT
        counters.releases = (counters.releases - done) | counting
        return len(held)
    if op == "allocate" and changed:
        held.append(cls.allocate())  # popped, LIVE
        counters.allocations = (counters.allocations - 1) | counting
    elif op == "allocate":
        tc.alloc_count -= 1  # popped; its byte is still the rack's tag
        counters.allocations |= counting
    elif changed:
        before = tc.alloc_count
        cls.release(held.pop())  # tagged, pushed, counted
        tc.alloc_count = before  # not pushed: the handle stays in its slot
        counters.releases = (counters.releases - 1) | counting
    else:
        tc.alloc[tc.alloc_count] = held[-1]  # in its slot; its byte is still LIVE
        counters.releases |= counting
    return len(held)


# -- channels (test_channels.py) ----------------------------------------------

CHANNEL_ITEM = 64  # the objects the channel tests pass: 64 B, the sequence number in the first 8 bytes


def channel_sender(address, handle, count, seed, queue):
    """Allocate ``count`` objects, stamp each with its sequence number, send them in random-sized batches, close."""
    import random

    rng = random.Random(seed)
    with slitter.connect(address, name="sender") as heap:
        cls = heap.register_class("item", size=CHANNEL_ITEM)
        channel = heap.open_channel(handle)
        seq = 0
        while seq < count:
            batch = cls.allocate_many(min(count - seq, rng.choice((1, 7, 64, 300, 1000))))
            for view in cls.views(batch):
                view[:8] = seq.to_bytes(8, "little")
                seq += 1
            channel.send_many(batch)
        channel.close()
        queue.put(("sent", seq))


def channel_receiver(address, handle, limit, queue):
    """Receive until the channel is closed: check, read and release each object; (count, sequence numbers in order)."""
    with slitter.connect(address, name="receiver") as heap:
        cls = heap.register_class("item", size=CHANNEL_ITEM)
        channel = heap.open_channel(handle)
        got = in_order = 0
        while True:
            try:
                batch = channel.recv_many(limit)
            except slitter.ChannelClosed:
                break
            for view in cls.views(batch):  # every handle checked first: a live object of the class
                in_order += int.from_bytes(view[:8], "little") == got
                got += 1
            cls.release_many(batch)
        queue.put(("received", got, in_order))


def channel_waits(address, handle, side, queue):
    """Block on the channel with no timeout (``side``: "recv" on an empty one, "send" past a full one); what ended it."""
    with slitter.connect(address) as heap:
        channel = heap.open_channel(handle)
        queue.put("waiting")
        try:
            if side == "recv":
                channel.recv()
            else:
                channel.send_many(range(1, channel.capacity + 2))  # one more than it holds
            queue.put("returned")
        except slitter.ChannelClosed as exc:
            queue.put(f"ChannelClosed: {exc}")


def channel_claims(address, handle, queue):
    """Try to send and receive on a channel that another process has claimed both ways."""
    out = []
    with slitter.connect(address) as heap:
        channel = heap.open_channel(handle)
        for name, call in (("send", lambda: channel.send(8)), ("recv", lambda: channel.recv(timeout=0))):
            try:
                call()
                out.append(f"{name}: accepted")
            except slitter.ChannelInUse as exc:
                out.append(f"{name}: {exc}")
    queue.put(out)


def channel_fan_in(address, handles, queue):
    """One receiver of several senders' channels: wait_any, then take; (count, per-channel in order, closed seen)."""
    with slitter.connect(address, name="fan-in") as heap:
        links = [heap.open_channel(h) for h in handles]
        expected = {link.handle: 0 for link in links}
        got = in_order = 0
        open_links = list(links)
        while open_links:
            link = slitter.Channel.wait_any(open_links, timeout=60)
            try:
                batch = link.recv_many(1000, timeout=0)
            except slitter.ChannelClosed:
                open_links.remove(link)
                continue
            for value in batch:
                in_order += value == expected[link.handle]
                expected[link.handle] += 1
            got += len(batch)
        queue.put((got, in_order))


def channel_counter(address, handle, count, queue):
    """Send 0 .. count-1 (plain integers) in batches of 50, then close."""
    with slitter.connect(address) as heap:
        link = heap.open_channel(handle)
        for first in range(0, count, 50):
            link.send_many(range(first, min(first + 50, count)))
        link.close()
        queue.put("sent")


def channel_claim_then_hang(address, handle, side, queue):
    """Take one side of a channel ("send": send 1, 2, 3; "recv": receive one handle), report (pid, tid), then hang."""
    import os
    import threading
    import time

    heap = slitter.connect(address, name="claim-then-hang")
    channel = heap.open_channel(handle)
    if side == "send":
        channel.send_many([1, 2, 3])
    else:
        channel.recv(timeout=60)
    queue.put((os.getpid(), threading.get_native_id()))
    time.sleep(600)


def channel_send_then_hang(address, handle, count, queue):
    """Allocate and send ``count`` stamped objects, keep a few more cached, report, then wait to be killed."""
    import time

    heap = slitter.connect(address, name="doomed-sender")
    cls = heap.register_class("item", size=CHANNEL_ITEM)
    channel = heap.open_channel(handle)
    batch = cls.allocate_many(count)
    for seq, view in enumerate(cls.views(batch)):
        view[:8] = seq.to_bytes(8, "little")
    channel.send_many(batch)
    cls.release_many(cls.allocate_many(100))  # objects in its magazines: the daemon takes those back
    queue.put(("sent", count))
    time.sleep(600)
