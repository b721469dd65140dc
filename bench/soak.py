"""Soak test for slitter: N workers for M minutes, with clients and the daemon SIGKILLed.

What one run does (issue 5 item 7):

1. Starts a NON-ephemeral slitterd by hand (``python -m slitterd --name
   soak-<pid> --socket <tmpdir>/s.sock --arena-size 8G``), so a SIGKILLed
   daemon started again with the same name recovers the instance.
2. Starts ``--workers`` processes.  Each does a random mix on three classes
   (24 B; 200 B zero_init; 4000 B): allocate and stamp (the content is
   derived from the handle), verify, release (after verifying), and pass
   objects to the other workers through single-writer mailboxes in shared
   memory, verifying what it receives.  Clients connect with timeout=30, so
   their slow path waits out daemon restarts.
3. Meanwhile it SIGKILLs a random worker every few seconds, measures how
   long the daemon takes to drop the dead client (its pidfd), and starts a
   replacement; and a few times SIGKILLs the daemon and starts it again
   (sometimes killing a worker while the daemon is down), checking that
   every live worker's rack was adopted and the dead one's was not.
   With ``--cyclers K``, K more clients stay in steady state on warm
   magazines (allocate, write a mark, release), so they never need the
   daemon and keep running while it is down and while it recovers.
4. At the end: stops the workers (each verifies and releases everything it
   holds), then releases what the killed workers left (every handle they
   recorded or had in a mailbox; one whose release is refused as a double
   free was no longer live), and checks on a fresh connection, per class,
   carved == live + cached + free, cached == 0 and live == 0.

SIGKILL can land between ``allocate()`` returning and the worker recording
the handle (the same Python statement, but a few bytecodes): that object is
live, and no one will ever know its handle (the application lost it, not
the allocator).  Workers mark the allocation under way, so the soak knows
how many kills could have done that per class; live objects left over
after the clean-up are reported as "lost in flight" and pass only while
they are within that bound.

Every worker keeps its state in one shared file (layout below) so a SIGKILL
at any instant leaves it readable.  The run prints a summary (ops/s, kills,
restarts, reclaim latencies, invariant results) and exits non-zero on any
failure.  The daemon and its /dev/shm segments are always removed; the
temporary directory (daemon log, worker tracebacks) is kept on failure.

Run it:

    .venv/bin/python bench/soak.py --workers 4 --minutes 2
    .venv/bin/python bench/soak.py --minutes 0.25 --seed 7      # a quick one
    .venv/bin/python bench/soak.py --minutes 1 --cyclers 1 --daemon-restarts 8
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import slitter
from slitter import address as _address

CLASSES = (("soak_small", 24, False), ("soak_zeroed", 200, True), ("soak_large", 4000, False))
WEIGHTS = (0.55, 0.3, 0.15)

# One shared file: a block per worker slot, then the mailboxes.
# Worker block: HEADER words, then HELD encoded handles (0: empty).
HEADER = 16
HELD = 4096
H_STATE, H_OPS, H_PENDING, H_PENDING_ENC, H_BAD, H_SENT, H_RECEIVED, H_PID, H_STOP, H_DONE, H_FILL = range(11)
PENDING_ALLOCATE, PENDING_RELEASE = 1, 2
# Mailbox (src, dst): CELLS words.  Only src writes a non-zero value into an
# empty cell, only dst empties a full one: each cell has one writer per state.
CELLS = 16
REACT_S = 1.0


def encode(class_index: int, handle: int) -> int:
    return (class_index + 1) << 56 | handle


def decode(value: int) -> tuple[int, int]:
    return (value >> 56) - 1, value & ((1 << 56) - 1)


def stamp(handle: int, size: int) -> bytes:
    return (handle.to_bytes(8, "little") * (size // 8 + 1))[:size]


def file_words(workers: int, cyclers: int) -> int:
    return workers * (HEADER + HELD) + workers * workers * CELLS + cyclers * HEADER


def block(words: memoryview, slot: int) -> memoryview:
    start = slot * (HEADER + HELD)
    return words[start:start + HEADER + HELD]


def mailbox(words: memoryview, workers: int, src: int, dst: int) -> memoryview:
    start = workers * (HEADER + HELD) + (src * workers + dst) * CELLS
    return words[start:start + CELLS]


def cycler_block(words: memoryview, workers: int, index: int) -> memoryview:
    start = workers * (HEADER + HELD) + workers * workers * CELLS + index * HEADER
    return words[start:start + HEADER]


def open_words(path: str) -> tuple[mmap.mmap, memoryview]:
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), os.fstat(f.fileno()).st_size)
    return mm, memoryview(mm).cast("Q")


def register_classes(heap: slitter.Heap) -> tuple[list[slitter.Class], list[int]]:
    """The soak's classes (CLASSES, in order) on ``heap``, and their sizes."""
    classes = [heap.register_class(name, size=size, zero_init=zero) for name, size, zero in CLASSES]
    return classes, [size for _, size, _ in CLASSES]


def run_logged(errdir: str, tag: str, fn, *args) -> None:
    """``fn(*args)`` in a child process; on any exception, its traceback in ``errdir/tag-PID.err``, exit 1."""
    try:
        fn(*args)
    except BaseException:
        Path(errdir, f"{tag}-{os.getpid()}.err").write_text(traceback.format_exc())
        sys.exit(1)


# -- the worker ----------------------------------------------------------------


def worker(address: str, slot: int, workers: int, seed: int, path: str, errdir: str) -> None:
    """One soak client: random work until its stop word is set (or SIGKILL)."""
    run_logged(errdir, f"worker{slot}", _work, address, slot, workers, seed, path)


def _work(address: str, slot: int, workers: int, seed: int, path: str) -> None:
    rng = random.Random(seed)
    _mm, words = open_words(path)
    rec = block(words, slot)
    held_words = rec[HEADER:]
    inboxes = [mailbox(words, workers, src, slot) for src in range(workers) if src != slot]
    outboxes = [mailbox(words, workers, slot, dst) for dst in range(workers) if dst != slot]
    heap = slitter.connect(address, name=f"soak{slot}", timeout=30)
    classes, sizes = register_classes(heap)
    view = heap.view
    free = list(range(HELD - 1, -1, -1))
    held: list[tuple[int, int, int]] = []  # (held word, class index, handle)
    ops = 0

    def take(value: int) -> None:
        ci, h = decode(value)
        if bytes(view(h)) != stamp(h, sizes[ci]):
            rec[H_BAD] += 1
        s = free.pop()
        held_words[s] = value
        held.append((s, ci, h))

    def receive() -> None:
        for box in inboxes:
            for k in range(CELLS):
                value = box[k]
                if value and free:
                    take(value)  # recorded first, then the cell emptied: never in neither
                    box[k] = 0
                    rec[H_RECEIVED] += 1

    def pick() -> tuple[int, int, int]:
        i = rng.randrange(len(held))
        held[i], held[-1] = held[-1], held[i]
        return held.pop()

    rec[H_STATE] = 1
    while not rec[H_STOP]:
        bias = rng.choice((0.3, 0.5, 0.5, 0.7))  # shrinking, steady or growing for a batch
        for _ in range(rng.randint(50, 1000)):
            ops += 1
            r = rng.random()
            if r < bias and free:
                ci = rng.choices(range(len(CLASSES)), WEIGHTS)[0]
                tag = encode(ci, 0)
                s = free.pop()
                rec[H_FILL] = s
                rec[H_PENDING_ENC] = tag
                rec[H_PENDING] = PENDING_ALLOCATE
                held_words[s] = tag | classes[ci].allocate()  # recorded in the statement that allocates
                h = held_words[s] ^ tag
                if classes[ci].zero_init and bytes(view(h)) != bytes(sizes[ci]):
                    rec[H_BAD] += 1
                view(h)[:] = stamp(h, sizes[ci])
                rec[H_PENDING] = 0
                held.append((s, ci, h))
            elif not held:
                continue
            elif r < 0.9:
                s, ci, h = pick()
                if bytes(view(h)) != stamp(h, sizes[ci]):
                    rec[H_BAD] += 1
                rec[H_PENDING_ENC] = held_words[s]
                rec[H_PENDING] = PENDING_RELEASE
                held_words[s] = 0
                classes[ci].release(h)
                rec[H_PENDING] = 0
                free.append(s)
            elif r < 0.95:
                s, ci, h = held[rng.randrange(len(held))]
                if bytes(view(h)) != stamp(h, sizes[ci]):
                    rec[H_BAD] += 1
            elif outboxes:
                box = rng.choice(outboxes)
                empty = [k for k in range(CELLS) if not box[k]]
                if empty:
                    s, ci, h = pick()
                    box[empty[0]] = held_words[s]  # in the mailbox first, then out of the record
                    held_words[s] = 0
                    free.append(s)
                    rec[H_SENT] += 1
        receive()
        rec[H_OPS] = ops
    # Stopping: take in what was sent, verify everything held, release it, detach.
    receive()
    for s, ci, h in held:
        if bytes(view(h)) != stamp(h, sizes[ci]):
            rec[H_BAD] += 1
        held_words[s] = 0
        classes[ci].release(h)
    held.clear()
    rec[H_OPS] = ops
    heap.close()
    rec[H_DONE] = 1


def cycler(address: str, index: int, workers: int, path: str, errdir: str) -> None:
    """A client in steady state: allocate, write, release on warm magazines, never a slow path.

    It keeps running on its magazines while the daemon is down and while a
    restarted daemon recovers.  The object it cycles gets a mark unlike any
    stamp, so a worker that is handed the same object at the same time sees
    its stamp overwritten.
    """
    run_logged(errdir, f"cycler{index}", _cycle, address, index, workers, path)


def _cycle(address: str, index: int, workers: int, path: str) -> None:
    _mm, words = open_words(path)
    rec = cycler_block(words, workers, index)
    heap = slitter.connect(address, name=f"cycler{index}", timeout=30)
    classes, sizes = register_classes(heap)
    marks = [b"\xa5" * size for size in sizes]
    view = heap.view
    keep = []
    for ci, cls in enumerate(classes):
        for _ in range(4):
            h = cls.allocate()
            view(h)[:] = stamp(h, sizes[ci])
            keep.append((ci, h))
    pairs = list(enumerate(classes))
    ops = 0
    rec[H_STATE] = 1
    while not rec[H_STOP]:
        for _ in range(1000):
            for ci, cls in pairs:
                h = cls.allocate()
                view(h)[:] = marks[ci]
                cls.release(h)
        ops += 2000 * len(pairs)
        rec[H_OPS] = ops
    for ci, h in keep:
        if bytes(view(h)) != stamp(h, sizes[ci]):
            rec[H_BAD] += 1
        classes[ci].release(h)
    heap.close()
    rec[H_DONE] = 1


# -- the driver ----------------------------------------------------------------


class Daemon:
    """A hand-started, persistent slitterd."""

    def __init__(self, tmp: Path, name: str, arena_size: str) -> None:
        self.name = name
        self.address = str(tmp / "s.sock")
        self.log = tmp / "slitterd.log"
        self.tmp = tmp
        self.arena_size = arena_size
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        """Start and wait until it answers; returns the seconds that took."""
        started = time.monotonic()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "slitterd", "--name", self.name, "--socket", self.address,
                 "--arena-size", self.arena_size],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=self.tmp)
        while time.monotonic() - started < 60:
            if self.proc.poll() is not None:
                tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-8:])
                raise RuntimeError(f"slitterd exited with {self.proc.returncode} ({self.log}):\n{tail}")
            if os.path.exists(self.address):
                try:
                    slitter.connect(self.address, timeout=0.5).close()
                    return time.monotonic() - started
                except slitter.DaemonUnavailable:
                    pass
            time.sleep(0.02)
        raise RuntimeError(f"slitterd did not answer within 60 s; see {self.log}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def cleanup(self) -> list[Path]:
        self.kill()
        left = [p for p in _address.segment_paths(self.name) if p.exists()]
        for p in left:
            p.unlink(missing_ok=True)
        return left


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.n = args.workers
        self.rng = random.Random(args.seed)
        self.tmp = Path(tempfile.mkdtemp(prefix="slitter-soak-"))
        self.daemon = Daemon(self.tmp, f"soak-{os.getpid()}", args.arena_size)
        self.path = str(self.tmp / "soak.words")
        with open(self.path, "wb") as f:
            f.truncate(8 * file_words(self.n, args.cyclers))
        self.mm, self.words = open_words(self.path)
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: list[multiprocessing.Process | None] = [None] * self.n
        self.cyclers: list[multiprocessing.Process] = []
        self.started_workers = 0
        self.heap: slitter.Heap | None = None
        # Results
        self.failures: list[str] = []
        self.ops_done = 0
        self.cycled = 0
        self.ended = False
        self.load_s = 0.0
        self.sent = self.received = 0
        self.kills = self.kills_while_down = 0
        self.restarts: list[float] = []
        self.latencies: list[float] = []
        self.orphans: set[int] = set()  # encoded handles killed workers may have left live
        self.mid_allocate = [0] * len(CLASSES)  # kills inside an allocate, before its handle was recorded
        self.unstamped: set[int] = set()  # recorded orphans whose stamp a kill interrupted
        self.probed_live = self.probed_stale = 0
        self.stale = [0] * len(CLASSES)  # the driver's refused probes: its only expected errors
        self.bad = 0
        self.final: dict[str, dict] = {}
        self.lost = [0] * len(CLASSES)
        self.refused: list = []  # audit entries refusing objects of flushed or reclaimed magazines

    def fail(self, message: str) -> None:
        self.failures.append(message)
        print(f"FAIL: {message}", flush=True)

    def log(self, message: str) -> None:
        if not self.args.quiet:
            print(f"[{time.monotonic() - self.t0:7.1f}s] {message}", flush=True)

    # -- workers

    def start_worker(self, slot: int) -> None:
        rec = block(self.words, slot)
        rec[:] = memoryview(bytes(8 * (HEADER + HELD))).cast("Q")
        p = self.ctx.Process(target=worker, args=(self.daemon.address, slot, self.n,
                                                 self.rng.randrange(2**32), self.path, str(self.tmp)),
                             daemon=True)
        p.start()
        rec[H_PID] = p.pid
        self.procs[slot] = p
        self.started_workers += 1
        self.await_start(rec, p, f"worker {slot}")

    def start_cycler(self, index: int) -> None:
        rec = cycler_block(self.words, self.n, index)
        p = self.ctx.Process(target=cycler, args=(self.daemon.address, index, self.n, self.path, str(self.tmp)),
                             daemon=True)
        p.start()
        rec[H_PID] = p.pid
        self.cyclers.append(p)
        self.await_start(rec, p, f"cycler {index}")

    def await_start(self, rec: memoryview, p: multiprocessing.Process, what: str) -> None:
        """Wait (up to 60 s) until the client sets its state word; a failure if it dies or times out first."""
        deadline = time.monotonic() + 60
        while rec[H_STATE] != 1:
            if not p.is_alive() or time.monotonic() > deadline:
                self.fail(f"{what} (pid {p.pid}) did not start: exit code {p.exitcode}")
                return
            time.sleep(0.01)

    def harvest(self, slot: int, killed: bool) -> None:
        """Account for what a worker did, and what it may have left live if it was killed."""
        rec = block(self.words, slot)
        self.ops_done += rec[H_OPS]
        self.sent += rec[H_SENT]
        self.received += rec[H_RECEIVED]
        self.bad += rec[H_BAD]
        if rec[H_BAD]:
            self.fail(f"worker {slot} (pid {rec[H_PID]}) saw {rec[H_BAD]} objects with wrong content")
        if not killed:
            return
        self.orphans.update(v for v in rec[HEADER:] if v)
        if rec[H_PENDING] == PENDING_RELEASE:
            self.orphans.add(rec[H_PENDING_ENC])
        elif rec[H_PENDING] == PENDING_ALLOCATE:
            filled = rec[HEADER + rec[H_FILL]]
            if filled:
                self.unstamped.add(filled)  # recorded, killed while stamping it
            else:
                self.mid_allocate[decode(rec[H_PENDING_ENC])[0]] += 1

    def check_exits(self) -> None:
        for slot, p in enumerate(self.procs):
            if p is not None and not p.is_alive() and p.exitcode != -signal.SIGKILL:
                self.fail(f"worker {slot} (pid {p.pid}) exited with {p.exitcode} by itself")
                self.harvest(slot, killed=True)
                self.start_worker(slot)

    def attached_pids(self) -> set[int]:
        return {c["pid"] for c in self.heap.stats()["clients"]}

    def kill_worker(self) -> None:
        slot = self.rng.randrange(self.n)
        p = self.procs[slot]
        since = time.monotonic()
        os.kill(p.pid, signal.SIGKILL)
        while True:
            latency = time.monotonic() - since
            if p.pid not in self.attached_pids():
                break
            if latency > 10:
                self.fail(f"killed worker pid {p.pid} still attached after {latency:.1f} s")
                break
            time.sleep(0.02)
        p.join(10)
        self.kills += 1
        self.latencies.append(latency)
        if latency >= REACT_S:
            self.fail(f"the daemon took {latency:.3f} s to notice the death of pid {p.pid}")
        self.harvest(slot, killed=True)
        self.log(f"killed worker {slot} (pid {p.pid}); reclaimed after {latency * 1000:.0f} ms")
        self.start_worker(slot)

    def restart_daemon(self) -> None:
        victim = self.rng.randrange(self.n) if self.rng.random() < 0.5 else None
        since = time.monotonic()
        self.daemon.kill()
        killed_pid = None
        if victim is not None:  # dies while nobody watches its pidfd
            p = self.procs[victim]
            killed_pid = p.pid
            os.kill(p.pid, signal.SIGKILL)
            p.join(10)
            self.kills += 1
            self.kills_while_down += 1
            self.harvest(victim, killed=True)
        time.sleep(self.rng.uniform(0.05, 1.0))  # clients run on their magazines, or wait
        self.daemon.start()
        down = time.monotonic() - since
        self.restarts.append(down)
        attached = self.attached_pids()
        alive = {p.pid for p in [*self.procs, *self.cyclers] if p is not None and p.is_alive()}
        if not alive <= attached:
            self.fail(f"after the restart, live workers {sorted(alive - attached)} were not adopted")
        if killed_pid is not None and killed_pid in attached:
            self.fail(f"after the restart, dead worker pid {killed_pid} was adopted")
        self.log(f"restarted slitterd after {down:.2f} s down"
                 + (f", worker {victim} (pid {killed_pid}) killed meanwhile" if victim is not None else ""))
        if victim is not None:
            self.start_worker(victim)

    # -- the run

    def run(self) -> int:
        self.t0 = time.monotonic()
        args = self.args
        try:
            self.daemon.start()
            self.heap = slitter.connect(self.daemon.address, name="soak-driver", timeout=30)
            for slot in range(self.n):
                self.start_worker(slot)
            for index in range(args.cyclers):
                self.start_cycler(index)
            self.log(f"{self.n} workers on {self.daemon.name} ({self.tmp})")
            self.main_phase(args.minutes * 60)
            self.end_phase()
        except Exception:
            self.fail("the driver crashed:\n" + traceback.format_exc())
        finally:
            for p in [*self.procs, *self.cyclers]:
                if p is not None and p.is_alive():
                    p.kill()
                    p.join(10)
            if not self.ended:  # count what the workers did before the driver gave up
                for slot in range(self.n):
                    rec = block(self.words, slot)
                    self.ops_done += rec[H_OPS]
                    self.sent += rec[H_SENT]
                    self.received += rec[H_RECEIVED]
                for index in range(len(self.cyclers)):
                    self.cycled += cycler_block(self.words, self.n, index)[H_OPS]
            if self.heap is not None:
                if self.daemon.proc is None or self.daemon.proc.poll() is not None:
                    self.heap._transport.patient = False  # the daemon is gone: do not wait 30 s
                    self.heap._transport.timeout_ms = 500
                self.heap.close()
            left = self.daemon.cleanup()
            if any(p.exists() for p in _address.segment_paths(self.daemon.name)):
                self.fail(f"could not remove the segments {left}")
        elapsed = time.monotonic() - self.t0
        self.summary(elapsed)
        for err in sorted(self.tmp.glob("*.err")):
            self.fail(f"{err.name}:\n{err.read_text()}")
        with contextlib.suppress(BufferError):  # slices of it may still be referenced
            self.words.release()
            self.mm.close()
        if self.failures:
            print(f"FAILED ({len(self.failures)}); logs kept in {self.tmp}")
            return 1
        shutil.rmtree(self.tmp, ignore_errors=True)
        print("PASSED")
        return 0

    def main_phase(self, seconds: float) -> None:
        self.load_started = time.monotonic()
        end = self.load_started + seconds
        restarts = self.args.daemon_restarts
        restart_at = sorted(self.load_started + self.rng.uniform(0.15, 0.85) * seconds for _ in range(restarts))
        next_kill = time.monotonic() + self.rng.expovariate(1 / self.args.kill_every)
        while (now := time.monotonic()) < end:
            self.check_exits()
            if restart_at and now >= restart_at[0]:
                restart_at.pop(0)
                self.restart_daemon()
            elif now >= next_kill:
                self.kill_worker()
                next_kill = time.monotonic() + self.rng.expovariate(1 / self.args.kill_every)
            time.sleep(0.05)
            self.load_s = time.monotonic() - self.load_started
        self.check_exits()

    def end_phase(self) -> None:
        self.log("stopping the workers")
        for slot in range(self.n):
            block(self.words, slot)[H_STOP] = 1
        for index in range(len(self.cyclers)):
            cycler_block(self.words, self.n, index)[H_STOP] = 1
        for slot, p in enumerate(self.procs):
            p.join(120)
            if p.exitcode != 0 or not block(self.words, slot)[H_DONE]:
                self.fail(f"worker {slot} (pid {p.pid}) did not stop cleanly: exit code {p.exitcode}")
                self.harvest(slot, killed=True)
            else:
                self.harvest(slot, killed=False)
        for index, p in enumerate(self.cyclers):
            p.join(120)
            rec = cycler_block(self.words, self.n, index)
            self.cycled += rec[H_OPS]
            if p.exitcode != 0 or not rec[H_DONE]:
                self.fail(f"cycler {index} (pid {p.pid}) did not stop cleanly: exit code {p.exitcode}")
            if rec[H_BAD]:
                self.bad += rec[H_BAD]
                self.fail(f"cycler {index} (pid {p.pid}): {rec[H_BAD]} of its kept objects changed")
        self.ended = True
        # What nobody holds any more: killed workers' records and the mailboxes.
        for src in range(self.n):
            for dst in range(self.n):
                self.orphans.update(v for v in mailbox(self.words, self.n, src, dst) if v)
        classes, _sizes = register_classes(self.heap)
        for value in sorted(self.orphans):
            ci, h = decode(value)
            content = bytes(self.heap.view(h))
            try:
                classes[ci].release(h)
            except slitter.DoubleFree:
                self.probed_stale += 1  # released (and maybe reused and released again) since
                self.stale[ci] += 1
                continue
            self.probed_live += 1
            if value not in self.unstamped and content != stamp(h, classes[ci].size):
                self.bad += 1
                self.fail(f"orphan {h:#x} of {classes[ci].name} has the wrong content")
        self.heap.close()
        self.heap = slitter.connect(self.daemon.address, name="soak-check", timeout=30)
        stats = self.heap.stats()
        for ci, (name, _, _) in enumerate(CLASSES):
            c = stats["classes"][name]
            self.final[name] = c
            if c["carved"] != c["live"] + c["cached"] + c["free"]:
                self.fail(f"{name}: carved {c['carved']} != live {c['live']} + cached {c['cached']} + free {c['free']}")
            if c["cached"] != 0:
                self.fail(f"{name}: {c['cached']} objects still cached with no client left")
            expected = {kind: (self.stale[ci] if kind == "double_free" else 0) for kind in c["errors"]}
            if c["errors"] != expected:
                self.fail(f"{name}: error counters {c['errors']}; expected {expected} (the clean-up's probes)")
            self.lost[ci] = c["live"]
            if not 0 <= c["live"] <= self.mid_allocate[ci]:
                self.fail(f"{name}: {c['live']} objects live after the clean-up; at most "
                          f"{self.mid_allocate[ci]} could be lost in flight (kills during an allocate)")
        self.refused = [e for e in self.heap.audit(limit=1000)["entries"] if e[6] in ("flush", "reclaim")]
        if self.refused:
            self.fail(f"the daemon's audit refused objects of flushed or reclaimed magazines: {self.refused[:5]}")
        if [c["pid"] for c in stats["clients"]] != [os.getpid()]:
            self.fail(f"clients still attached: {stats['clients']}")

    def summary(self, elapsed: float) -> None:
        a = self.args
        log = self.daemon.log.read_text(errors="replace") if self.daemon.log.exists() else ""
        recovered = [line.split(" INFO ", 1)[1] for line in log.splitlines() if "recovered instance" in line]
        reconciled = [line.split(" WARNING ", 1)[1] for line in log.splitlines() if "reconciled" in line]
        lat = sorted(self.latencies)
        print()
        print(f"slitter soak: {a.workers} workers, {a.cyclers} cyclers, {a.minutes:g} min, seed {a.seed}, "
              f"arena {a.arena_size}")
        print(f"  elapsed          {elapsed:.1f} s")
        print(f"  operations       {self.ops_done:,} ({self.ops_done / max(self.load_s, 1e-9):,.0f} ops/s "
              f"over all workers, {self.load_s:.0f} s of load)")
        if a.cyclers:
            print(f"  cyclers          {a.cyclers} ({self.cycled:,} steady-state operations)")
        print(f"  hand-offs        {self.sent:,} sent, {self.received:,} received")
        print(f"  workers started  {self.started_workers} ({self.kills} SIGKILLed, "
              f"{self.kills_while_down} of them while the daemon was down)")
        if lat:
            print(f"  reclaim latency  max {lat[-1] * 1000:.0f} ms, median {lat[len(lat) // 2] * 1000:.0f} ms "
                  f"over {len(lat)} kills (limit {REACT_S * 1000:.0f} ms)")
        if self.restarts:
            print(f"  daemon restarts  {len(self.restarts)} (SIGKILL to answering again: "
                  + ", ".join(f"{d:.2f}" for d in self.restarts) + " s)")
        for line in recovered:
            print(f"    {line}")
        if reconciled:
            print(f"  reconciled       {len(reconciled)} counter/live-map disagreements at recovery:")
            for line in reconciled:
                print(f"    {line}")
        print(f"  orphans          {self.probed_live} still live and released at the end, "
              f"{self.probed_stale} stale records (double free refused)")
        for ci, (name, size, _) in enumerate(CLASSES):
            c = self.final.get(name)
            if c is None:
                continue
            ok = c["carved"] == c["live"] + c["cached"] + c["free"] and c["cached"] == 0
            print(f"  {name:12} {size:5} B  carved {c['carved']:>8,} = live {c['live']} + cached {c['cached']} "
                  f"+ free {c['free']:,}: {'ok' if ok else 'BROKEN'}; allocations {c['allocations']:,}; "
                  f"lost in flight {self.lost[ci]} (kills mid-allocate {self.mid_allocate[ci]}); "
                  f"errors {sum(c['errors'].values())}")
        print(f"  content errors   {self.bad}")
        print(f"  audit refusals   {len(self.refused)} (flush/reclaim)")
        print(f"  result           {'FAIL' if self.failures else 'PASS'} ({len(self.failures)} failures)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    parser.add_argument("--minutes", type=float, default=1.0, help="minutes of load (default 1; fractions ok)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock)")
    parser.add_argument("--kill-every", type=float, default=4.0,
                        help="mean seconds between worker SIGKILLs (default 4)")
    parser.add_argument("--daemon-restarts", type=int, default=None,
                        help="daemon SIGKILL+restarts during the run (default: 2 per minute, at least 1)")
    parser.add_argument("--cyclers", type=int, default=0,
                        help="extra clients in steady state (allocate/release on warm magazines, never a "
                             "slow path), so some clients run while a restarted daemon recovers (default 0)")
    parser.add_argument("--arena-size", default="8G", help="the daemon's --arena-size (default 8G)")
    parser.add_argument("--quiet", action="store_true", help="only the summary")
    args = parser.parse_args(argv)
    if args.workers < 2:
        parser.error("--workers must be at least 2")
    if args.seed is None:
        args.seed = time.time_ns() % 2**32
    if args.daemon_restarts is None:
        args.daemon_restarts = max(1, round(2 * args.minutes))
    soak = Soak(args)

    def interrupted(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    return soak.run()


if __name__ == "__main__":
    sys.exit(main())
