"""Scaling benchmark for slitter: fast-path and refill costs as the live set grows (a benchmark, not a test).

One private daemon (``slitter.spawn_daemon(arena_size="8G")``) and two 64 B
classes. In the big class, ``allocate_many`` grows the live set through 1k,
10k, 100k, 1M and 10M objects (``--quick`` stops at 1M), and every object
stays live. The reference class keeps 1,000 live objects throughout. At each
level these are measured:

- **Python pair**: ``cls.release(cls.allocate())`` in a loop, as in
  ``fastpath.py``. The floor is two empty cffi calls per iteration.
- **C pair**: ``lib.slitter_bench_pairs`` (allocate + release from C).
- **Churn pair**: release a random live object, then allocate one in its
  place (``release(live[j]); live[j] = allocate()``, with random j
  pregenerated). Unlike the plain pair, which the LIFO magazine serves with
  the same object every time, this touches the span entries and live-map
  bytes of the whole live set, so it shows cache and TLB effects. Its floor
  runs the same loop with two empty cffi calls in place of release and
  allocate (``h = live[j]; noop(); noop(); live[j] = h``). At 10M, the
  loop's own random reads and writes of the 80 MB ``live`` array miss the
  caches too.
- **Refill**: as in ``fastpath.py``, ``mag_capacity × 20`` single
  allocations, each timed. The calls during which ``heap.messages_sent``
  moved sent a REFILL, and the table gives their p50. The first pass carves
  fresh objects. Then every handle is released (the releases that sent a
  FLUSH are timed), and a second pass refills from the depot.
- **Memory**, from ``heap.stats()``: the class's ``reserved_bytes`` and
  ``runs``, and the instance's ``committed_bytes`` (both segments, as
  ``st_blocks``). The committed figure is a delta from the instance before
  the big class existed, set against the live data (live × 64 B).

After the last level, everything but the first 1,000 objects is released
and the 1k level is measured again ("1k after"). The live set is the same as
at the start, but the depot now holds millions of free objects.

Each level runs R repetitions. In each repetition, the floor, the big class
and the reference class run in alternating blocks. The table gives medians.
The target ratio, cost@10M ÷ cost@1k ≤ 1.3, is given two ways:

- **sequential**: the median at 10M ÷ the median at 1k. The levels run one
  after another, minutes apart, so the machine's drift goes into this ratio.
- **paired**: the median over repetitions of (big class at 10M) ÷
  (reference class at 1k, same blocks). This cancels the drift. It would
  also cancel any slowdown that hit both classes alike, so the two are
  reported together.

Timed loops run with the cyclic GC disabled.

Run it:

    cd bench && ../.venv/bin/python scaling.py            # about a minute here
    cd bench && ../.venv/bin/python scaling.py --quick    # up to 1M objects, about 15 s
    cd bench && ../.venv/bin/python scaling.py --json     # the full result as JSON on stdout

It writes bench/results/scaling.json (scaling-quick.json with ``--quick``).
It needs about 1 GB free in /dev/shm.
"""

from __future__ import annotations

import json
import random
import sys
import time
from array import array
from pathlib import Path
from typing import Any

import slitter
from benchlib import (c_pairs, cli, fmt_bytes, loop_py_pairs, loop_two_noops, machine, machine_line, medians_ranges,
                      pct, refill_passes, timed, warm)
from slitter._native import lib

perf_ns = time.perf_counter_ns
RESULTS = Path(__file__).resolve().parent / "results"
SIZE = 64
GROW_CHUNK = 1 << 16
REFILLS = 20
BLOCKS = 3
TARGET = 1.3
REFERENCE_LIVE = 1_000  # live objects of the reference class

SIZES = {
    #          levels                                                  reps  py-iters  c-pairs    churn
    "default": ((1_000, 10_000, 100_000, 1_000_000, 10_000_000),       9,    200_000,  2_000_000, 200_000),
    "quick":   ((1_000, 10_000, 100_000, 1_000_000),                   5,    100_000,  1_000_000, 100_000),
}


def loop_churn(cls: slitter.Class, live: array, idx: list[int]) -> float:
    allocate, release = cls.allocate, cls.release
    t0 = perf_ns()
    for j in idx:
        release(live[j])
        live[j] = allocate()
    return (perf_ns() - t0) / len(idx)


def loop_churn_floor(live: array, idx: list[int]) -> float:
    """The churn loop's own random reads and writes of ``live``, with two empty cffi calls."""
    noop = lib.slitter_noop  # the call cost release and allocate pay (GIL kept)
    t0 = perf_ns()
    for j in idx:
        h = live[j]
        noop()
        noop()
        live[j] = h
    return (perf_ns() - t0) / len(idx)


def refills(heap: slitter.Heap, cls: slitter.Class) -> dict[str, list[int]]:
    """The refill passes of fastpath.py (``benchlib.refill_passes``): ns of the calls that sent a message."""
    samples, _messages = refill_passes(heap, cls, heap._classes_table[cls.id].mag_capacity * REFILLS)
    return {k: samples[k] for k in ("refill_carve", "refill_depot", "flush")}


def measure(heap: slitter.Heap, big: slitter.Class, live: array, ref: slitter.Class, ref_live: array, reps: int,
            py_n: int, c_n: int, churn_n: int, label: str, progress) -> dict[str, Any]:
    """Medians over repetitions; ``vs_ref_*``: medians of the per-repetition ratios big ÷ reference class."""
    rng = random.Random(len(live))
    step = churn_n // BLOCKS
    idx = [rng.randrange(len(live)) for _ in range(step * BLOCKS)]
    ridx = [rng.randrange(len(ref_live)) for _ in range(step * BLOCKS)]
    per_rep = []
    slow: dict[str, list[int]] = {"refill_carve": [], "refill_depot": [], "flush": []}
    m0 = heap.messages_sent
    for rep in range(reps):
        progress(f"{label}: repetition {rep + 1}/{reps}")
        acc: dict[str, float] = dict.fromkeys(("floor_ns", "py_pair_ns", "ref_py_pair_ns", "c_pair_ns", "ref_c_pair_ns",
                                               "churn_floor_ns", "churn_ns", "ref_churn_floor_ns", "ref_churn_ns"), 0.0)
        for b in range(BLOCKS):
            part, rpart = idx[b * step:(b + 1) * step], ridx[b * step:(b + 1) * step]
            acc["floor_ns"] += timed(loop_two_noops, py_n // BLOCKS)
            acc["py_pair_ns"] += timed(loop_py_pairs, big, py_n // BLOCKS)
            acc["ref_py_pair_ns"] += timed(loop_py_pairs, ref, py_n // BLOCKS)
            acc["c_pair_ns"] += c_pairs(heap, big, c_n // BLOCKS)
            acc["ref_c_pair_ns"] += c_pairs(heap, ref, c_n // BLOCKS)
            acc["churn_floor_ns"] += timed(loop_churn_floor, live, part)
            acc["churn_ns"] += timed(loop_churn, big, live, part)
            acc["ref_churn_floor_ns"] += timed(loop_churn_floor, ref_live, rpart)
            acc["ref_churn_ns"] += timed(loop_churn, ref, ref_live, rpart)
        r = {k: v / BLOCKS for k, v in acc.items()}
        r["py_ratio"] = r["py_pair_ns"] / r["floor_ns"]
        r["churn_slitter_ns"] = r["churn_ns"] - r["churn_floor_ns"]
        r["ref_churn_slitter_ns"] = r["ref_churn_ns"] - r["ref_churn_floor_ns"]
        for k in ("py_pair_ns", "c_pair_ns", "churn_ns", "churn_floor_ns", "churn_slitter_ns"):
            r[f"vs_ref_{k}"] = r[k] / r[f"ref_{k}"]
        per_rep.append(r)
    fast_messages = heap.messages_sent - m0
    for _ in range(max(1, reps // 3)):
        for k, v in timed(refills, heap, big).items():
            slow[k] += v
    out, ranges = medians_ranges(per_rep)
    out["ranges"] = ranges
    out["fast_loop_messages"] = fast_messages  # pairs and churn alike: expected 0
    for k, v in slow.items():
        out[f"{k}_p50_us"] = pct(v, 50) / 1e3
        out[f"{k}_p99_us"] = pct(v, 99) / 1e3
        out[f"{k}_samples"] = len(v)
    return out


def memory(heap: slitter.Heap, cls: slitter.Class, empty_committed: int, live: int) -> dict[str, Any]:
    st = heap.stats()
    c = st["classes"][cls.name]
    committed = st["instance"]["committed_bytes"]
    data = live * SIZE
    return {"live": live, "stats_live": c["live"], "carved": c["carved"], "runs": c["runs"],
            "reserved_bytes": c["reserved_bytes"], "committed_bytes": committed,
            "committed_delta": committed - empty_committed, "data_bytes": data,
            "reserved_per_data": c["reserved_bytes"] / data if data else None,
            "committed_delta_per_data": (committed - empty_committed) / data if data else None}


def run(size: str, progress) -> dict[str, Any]:
    levels, reps, py_n, c_n, churn_n = SIZES[size]
    result: dict[str, Any] = {
        "machine": machine(), "size": size,
        "parameters": {"levels": list(levels), "repetitions": reps, "python_iterations": py_n, "c_pairs": c_n,
                       "churn_pairs": churn_n, "object_size": SIZE, "refills_per_pass": REFILLS},
        "levels": []}
    with slitter.spawn_daemon(arena_size="8G") as address, slitter.connect(address) as heap:
        ref = heap.register_class(f"scaling-reference-{SIZE}", SIZE)
        ref_live = ref.allocate_many(REFERENCE_LIVE)
        ref.release(ref.allocate())
        empty_committed = heap.stats()["instance"]["committed_bytes"]  # the baseline holds the reference class
        cls = heap.register_class(f"scaling-{SIZE}", SIZE)
        result["mag_capacity"] = heap._classes_table[cls.id].mag_capacity
        for c in (cls, ref):
            warm(heap, c, py_n, c_n)
        live = array("Q")

        def level_row(label: str, extra: dict[str, Any]) -> dict[str, Any]:
            return {"level": len(live), "label": label, **extra,
                    **measure(heap, cls, live, ref, ref_live, reps, py_n, c_n, churn_n, f"{label} live", progress),
                    "memory": memory(heap, cls, empty_committed, len(live))}

        for level in levels:
            progress(f"growing the live set to {short(level)}")
            t0, m0, before = perf_ns(), heap.messages_sent, len(live)
            while len(live) < level:
                live.extend(cls.allocate_many(min(GROW_CHUNK, level - len(live))))
            result["levels"].append(level_row(short(level), {
                "grow_ns_per_object": (perf_ns() - t0) / (level - before), "grow_messages": heap.messages_sent - m0}))
        progress(f"releasing all but {levels[0]:,}")
        t0, released = perf_ns(), len(live) - levels[0]
        for start in range(levels[0], len(live), GROW_CHUNK):
            cls.release_many(live[start:start + GROW_CHUNK])
        release_ns = (perf_ns() - t0) / max(1, released)
        del live[levels[0]:]
        result["levels"].append(level_row(f"{short(levels[0])} after", {"release_ns_per_object": release_ns}))
        cls.release_many(live)
        ref.release_many(ref_live)
        result["memory_all_released"] = memory(heap, cls, empty_committed, 0)

    first, last = result["levels"][0], result["levels"][-2]
    keys = ("py_pair_ns", "c_pair_ns", "churn_ns", "churn_floor_ns", "churn_slitter_ns")
    result["ratio_levels"] = [first["label"], last["label"]]
    result["ratios_sequential"] = {k: last[k] / first[k] for k in (*keys, "py_ratio", "refill_carve_p50_us",
                                                                   "refill_depot_p50_us", "flush_p50_us")}
    result["ratios_paired"] = {k: last[f"vs_ref_{k}"] for k in keys}
    result["targets"] = {
        f"{how} {k}": {"target": TARGET, "value": ratios[k], "met": ratios[k] <= TARGET}
        for how, ratios in (("sequential", result["ratios_sequential"]), ("paired", result["ratios_paired"]))
        for k in ("py_pair_ns", "c_pair_ns", "churn_ns")}
    return result


def short(n: int) -> str:
    """1,000 -> "1k", 10,000,000 -> "10M"."""
    for div, unit in ((1_000_000, "M"), (1_000, "k")):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return f"{n:,}"


def print_tables(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(130, Console().width))
    p = result["parameters"]
    t = Table(title=f"Cost as the live set grows ({SIZE} B class, magazine {result['mag_capacity']}): "
              f"medians of {p['repetitions']} repetitions", title_justify="left",
              caption="refill / flush: p50 of the single calls that sent the message; "
              f"÷ ref: big class ÷ a {REFERENCE_LIVE:,}-object reference class in the same blocks",
              caption_justify="left")
    for col in ("live objects", "Python pair", "÷ floor", "÷ ref", "C pair", "÷ ref", "churn pair", "churn floor",
                "÷ ref", "refill carve", "refill depot", "flush", "grow / obj"):
        t.add_column(col, justify="right")
    for row in result["levels"]:
        grow = f"{row['grow_ns_per_object']:.0f} ns" if "grow_ns_per_object" in row else \
            f"rel. {row['release_ns_per_object']:.0f} ns"
        t.add_row(row["label"], f"{row['py_pair_ns']:.1f} ns", f"{row['py_ratio']:.2f}",
                  f"{row['vs_ref_py_pair_ns']:.2f}", f"{row['c_pair_ns']:.2f} ns", f"{row['vs_ref_c_pair_ns']:.2f}",
                  f"{row['churn_ns']:.0f} ns", f"{row['churn_floor_ns']:.0f} ns",
                  f"{row['vs_ref_churn_slitter_ns']:.2f}", f"{row['refill_carve_p50_us']:.0f} µs",
                  f"{row['refill_depot_p50_us']:.0f} µs", f"{row['flush_p50_us']:.0f} µs", grow)
    console.print(t)

    seq, paired, tg = result["ratios_sequential"], result["ratios_paired"], result["targets"]
    a, b = result["ratio_levels"]
    t = Table(title=f"Ratio cost@{b} ÷ cost@{a}", title_justify="left",
              caption=f"sequential: ratio of the medians at the two levels; paired: median of the per-repetition "
              f"ratios to the {REFERENCE_LIVE:,}-object reference class at {b}", caption_justify="left")
    for col in ("measurement", "sequential", f"<= {TARGET}", "paired", f"<= {TARGET} "):
        t.add_column(col, justify="right" if col in ("sequential", "paired") else "left")
    names = {"py_pair_ns": "Python pair", "c_pair_ns": "C pair", "churn_ns": "churn pair (random live object)",
             "churn_floor_ns": "  churn floor (the loop's own array access)",
             "churn_slitter_ns": "  churn − churn floor (slitter's share)",
             "py_ratio": "Python pair ÷ floor", "refill_carve_p50_us": "refill (carve), p50",
             "refill_depot_p50_us": "refill (depot), p50", "flush_p50_us": "flush, p50"}

    def verdict(key: str) -> str:
        if key not in tg:
            return ""
        return "[green]met[/green]" if tg[key]["met"] else "[red]NOT met[/red]"

    for k, label in names.items():
        t.add_row(label, f"{seq[k]:.2f}", verdict(f"sequential {k}"),
                  f"{paired[k]:.2f}" if k in paired else "", verdict(f"paired {k}"))
    console.print(t)

    t = Table(title="Memory of the class (heap.stats())", title_justify="left",
              caption="committed: both segments (st_blocks), delta from the instance before the class existed "
              f"(it held only the {REFERENCE_LIVE:,}-object reference class)", caption_justify="left")
    for col in ("live objects", "data (live × 64 B)", "runs", "reserved_bytes", "reserved ÷ data", "committed Δ",
                "committed Δ ÷ data"):
        t.add_column(col, justify="right")
    rows = [(row["label"], row["memory"]) for row in result["levels"]]
    rows.append(("0 (all released)", result["memory_all_released"]))
    for label, m in rows:
        live = m["live"]
        t.add_row(label, fmt_bytes(live * SIZE), f"{m['runs']:,}", fmt_bytes(m["reserved_bytes"]),
                  f"{m['reserved_per_data']:.3f}" if live else "", fmt_bytes(m["committed_delta"]),
                  f"{m['committed_delta_per_data']:.3f}" if live else "")
    console.print(t)
    print(machine_line(result["machine"]))


def main(argv: list[str] | None = None) -> int:
    def save(result: dict, quick: bool) -> str:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"scaling{'-quick' if quick else ''}.json").write_text(json.dumps(result, indent=1) + "\n")
        return f"; results in {RESULTS}"

    return cli(__doc__, run, print_tables, "up to 1M live objects, fewer repetitions", argv, save)


if __name__ == "__main__":
    sys.exit(main())
