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
