"""Process targets for the multi-process tests (spawned children import them by name)."""

from __future__ import annotations

import slitter


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
    kinds = ("class_mismatch", "interior_pointer", "foreign_address", "double_free")
    mine = {name: {"allocations": 0, "releases": 0, **{k: 0 for k in kinds}} for name in ("a", "b")}
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
                kind = rng.choice(kinds)
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


def stamp(handle: int, size: int) -> bytes:
    """The content a load worker writes into an object: derived from its handle."""
    return (handle.to_bytes(8, "little") * (size // 8 + 1))[:size]


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
                if held and rng.random() < 0.49:
                    cls, h = held.pop(rng.randrange(len(held)))
                    if bytes(heap.view(h)) != stamp(h, cls.size):
                        bad += 1
                    cls.release(h)
                else:
                    cls = rng.choice(classes)
                    h = cls.allocate()
                    heap.view(h)[:] = stamp(h, cls.size)
                    held.append((cls, h))
        for cls, h in held:
            if bytes(heap.view(h)) != stamp(h, cls.size):
                bad += 1
        keep = held[: len(held) // 2]
        for cls, h in held[len(held) // 2:]:
            cls.release(h)
    queue.put({"seed": seed, "ops": ops, "bad": bad, "held": [(cls.name, h) for cls, h in keep]})
