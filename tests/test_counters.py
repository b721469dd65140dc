"""Per-class counters are exact: the daemon's sums equal what the clients themselves counted."""

from __future__ import annotations

from conftest import run_spawned

import slitter
import workers
from workers import KINDS


def test_counters_match_the_clients_own_counts(daemon, heap):
    procs, results = run_spawned(workers.counted_mix, [(daemon.address, seed) for seed in range(3)],
                                 timeout=120, join_timeout=60)
    for p in procs:
        assert p.exitcode == 0
    stats = heap.stats()["classes"]
    held = {"a": 0, "b": 0}
    refills = flushes = 0
    for name in ("a", "b"):
        expected = {key: sum(r[0][name][key] for r in results) for key in ("allocations", "releases", *KINDS)}
        got = stats[name]
        assert got["allocations"] == expected["allocations"]
        assert got["releases"] == expected["releases"]
        for kind in KINDS:
            assert got["errors"][kind] == expected[kind], (name, kind)
        assert got["errors"]["corrupt"] == 0
        assert any(expected[k] for k in KINDS), "the mix made no bad releases"
    for mine, live, sent in results:
        for name, _ in live:
            held[name] += 1
        refills += sent.get("refill", 0)
        flushes += sent.get("flush", 0)
    for name in ("a", "b"):
        c = stats[name]
        assert c["live"] == held[name]
        assert c["cached"] == 0  # every client left
        assert c["carved"] == c["live"] + c["cached"] + c["free"]
    assert stats["a"]["refills"] + stats["b"]["refills"] == refills
    assert stats["a"]["flushes"] + stats["b"]["flushes"] == flushes
    entries, since = [], 0
    while page := heap.audit(since=since, limit=1000)["entries"]:
        entries += page
        since = page[-1][0]
    assert len(entries) == sum(sum(r[0][n][k] for k in KINDS) for r in results for n in ("a", "b"))
    assert heap.audit()["dropped"] == 0
