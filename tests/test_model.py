"""A stateful model test: several client processes against one slitterd, checked after every step.

Hypothesis drives real client processes (allocate, release, every kind of
bad release, allocate_many, release_many and check of good and bad
batches, view, write, SIGKILL a client, SIGKILL and restart the daemon)
and compares what slitter does and reports with a simple model: the live
objects (handle -> class and the serial of its content) and the freed ones.
After every step the daemon's figures must agree with the model and every
live object must still hold what was last written into it.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections import Counter

from conftest import DaemonProcess
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

import slitter
import workers

SIZES = {"a": 40, "b": 3000}
OTHER = {"a": "b", "b": "a"}
NCLIENTS = 3
# NULL, the guard span before the first run, a span no class owns, beyond the arena, not a u64, negative
FOREIGN = (0, 8, 12345, 1 << 45, (1 << 48) - 16, 1 << 70, -1)
REPLY_TIMEOUT = 60  # a command may wait out a daemon restart in the client's slow path
SETTLE = 3.0  # a killed client's rack is reclaimed through its pidfd within about a second

CTX = multiprocessing.get_context("spawn")


class Client:
    """A worker process with its own ``slitter.connect``; commands go over a pipe."""

    def __init__(self, addr: str) -> None:
        self.conn, child = CTX.Pipe()
        self.proc = CTX.Process(target=workers.model_client, args=(addr, child), daemon=True)
        self.proc.start()
        child.close()
        self.pid = None

    def wait_ready(self) -> Client:
        status, self.pid = self._recv()
        assert status == "ready"
        return self

    def _recv(self):
        if not self.conn.poll(REPLY_TIMEOUT):
            raise AssertionError(f"client {self.proc.pid} did not answer within {REPLY_TIMEOUT} s")
        return self.conn.recv()

    def call(self, *cmd):
        self.conn.send(cmd)
        return self._recv()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(20)
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(("stop",))
            if self.conn.poll(10):
                self.conn.recv()
            self.proc.join(10)
        except (OSError, EOFError):
            pass
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)
        self.conn.close()


class SlitterModel(RuleBasedStateMachine):
    tmp_factory = None  # set by the test: pytest's tmp_path_factory

    def __init__(self) -> None:
        super().__init__()
        tmp = self.tmp_factory.mktemp("model", numbered=True)
        name = f"m{os.getpid()}-{time.monotonic_ns() % 10**9}"
        self.daemon = DaemonProcess(tmp, name)
        self.heap = None
        self.clients: list[Client] = []
        try:
            self.daemon.start()
            self.clients = [Client(self.daemon.address) for _ in range(NCLIENTS)]
            for c in self.clients:
                c.wait_ready()
            self.heap = slitter.connect(self.daemon.address, name="model-test", timeout=REPLY_TIMEOUT)
        except BaseException:
            self.teardown()
            raise
        self.live: dict[int, tuple[str, int]] = {}  # handle -> (class, serial of its content)
        self.freed: dict[int, str] = {}  # released and not handed out since: handle -> class
        self.serial = 1
        self.allocations = Counter()
        self.releases = Counter()
        self.errors = {c: Counter() for c in SIZES}
        self.restarts = 0

    def teardown(self) -> None:
        for c in self.clients:
            c.stop()
        if self.heap is not None:
            if self.daemon.proc is None or self.daemon.proc.poll() is not None:
                self.heap._transport.patient = False
            self.heap.close()
        self.daemon.cleanup()  # kills it and unlinks its segments

    # -- helpers -----------------------------------------------------------

    def expected(self, handle: int) -> bytes:
        cls, serial = self.live[handle]
        return workers.model_stamp(handle, serial, SIZES[cls])

    def pick_live(self, data) -> int:
        return data.draw(st.sampled_from(sorted(self.live)), label="handle")

    def release(self, i: int, pairs: list[tuple[str, int]]) -> list[str]:
        status, results = self.clients[i].call("release", pairs)
        assert status == "ok", results
        assert len(results) == len(pairs)
        return results

    # -- rules -------------------------------------------------------------

    @initialize(counts=st.lists(st.integers(0, 300), min_size=2 * NCLIENTS, max_size=2 * NCLIENTS))
    def populate(self, counts):
        """Every client starts with some objects of each class, so that every rule has work."""
        for k, n in enumerate(counts):
            if n:
                self.allocate(k // 2, sorted(SIZES)[k % 2], n)

    @rule(i=st.integers(0, NCLIENTS - 1), cls=st.sampled_from(sorted(SIZES)),
          n=st.one_of(st.just(1), st.integers(1, 300)), batch=st.booleans())
    def allocate(self, i, cls, n, batch=False):
        """n objects, one allocate() each or one allocate_many(n)."""
        status, handles = self.clients[i].call("allocate_many" if batch else "allocate", cls, n, self.serial)
        assert status == "ok", f"allocate {n} of '{cls}' in client {i}: {handles}"
        assert len(handles) == n and len(set(handles)) == n, "one object handed out twice in one batch"
        for k, h in enumerate(handles):
            assert h not in self.live, f"{h:#x} handed out while live ({self.live[h]})"
            self.live[h] = (cls, self.serial + k)
            self.freed.pop(h, None)
        self.serial += n
        self.allocations[cls] += n

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, NCLIENTS - 1), data=st.data())
    def release_some(self, i, data):
        """Objects are global: any client releases any live object, of any class."""
        pool = sorted(self.live)
        k = data.draw(st.one_of(st.just(1), st.integers(1, min(len(pool), 600))), label="count")
        chosen = data.draw(st.lists(st.sampled_from(pool), min_size=k, max_size=k, unique=True), label="handles")
        pairs = [(self.live[h][0], h) for h in chosen]
        results = self.release(i, pairs)
        for (cls, h), r in zip(pairs, results):
            assert r == "ok", f"release of live {h:#x} as '{cls}' in client {i}: {r}"
            del self.live[h]
            self.freed[h] = cls
            self.releases[cls] += 1

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, NCLIENTS - 1), data=st.data(), op=st.sampled_from(["release_many", "check"]))
    def batch_of_one_class(self, i, data, op):
        """release_many or check of live objects of one class, from any client; with one bad
        handle anywhere in it, that handle's error, and none of the batch released."""
        cls = data.draw(st.sampled_from(sorted({c for c, _ in self.live.values()})), label="class")
        pool = sorted(h for h, (c, _) in self.live.items() if c == cls)
        k = data.draw(st.integers(1, min(len(pool), 600)), label="count")
        chosen = data.draw(st.lists(st.sampled_from(pool), min_size=k, max_size=k, unique=True), label="handles")
        kinds = ["foreign_address", "interior_pointer"]
        if any(c == cls for c in self.freed.values()):
            kinds.append("double_free")
        kind = data.draw(st.one_of(st.none(), st.sampled_from(kinds)), label="bad kind")  # None: all good
        batch = list(chosen)
        if kind is not None:
            if kind == "foreign_address":
                bad, expect = data.draw(st.sampled_from(FOREIGN), label="foreign"), "ForeignAddress"
            elif kind == "interior_pointer":
                bad, expect = chosen[0] + data.draw(st.integers(1, SIZES[cls] - 1), label="delta"), "InteriorPointer"
            else:
                bad = data.draw(st.sampled_from(sorted(h for h, c in self.freed.items() if c == cls)), label="freed")
                expect = "DoubleFree"
            batch.insert(data.draw(st.integers(0, k), label="at"), bad)
        status, result = self.clients[i].call(op, cls, batch)
        assert status == "ok", result
        if kind is None:
            assert result == "ok", f"{op} of {k} live objects of '{cls}' in client {i}: {result}"
            if op == "release_many":
                for h in chosen:
                    del self.live[h]
                    self.freed[h] = cls
                self.releases[cls] += k
            return
        name, handle, released = result if result != "ok" else (None, None, None)
        assert (name, handle) == (expect, bad), f"{op} with a bad {kind} handle {bad:#x} in client {i}: {result}"
        if op == "release_many":
            assert released == 0, f"{op}: {released} released before the refusal"
            self.errors[cls][kind] += 1  # check() reports and counts nothing

    @rule(i=st.integers(0, NCLIENTS - 1), data=st.data())
    def bad_release(self, i, data):
        """Every kind of refused release, from any client: the error named, and nothing changed."""
        kinds = ["foreign_address"]
        if self.live:
            kinds += ["class_mismatch", "interior_pointer"]
        if self.freed:
            kinds.append("double_free")
        kind = data.draw(st.sampled_from(kinds), label="kind")
        if kind == "foreign_address":
            cls = data.draw(st.sampled_from(sorted(SIZES)), label="class")
            call, expect = (cls, data.draw(st.sampled_from(FOREIGN), label="foreign")), "ForeignAddress"
        elif kind == "class_mismatch":
            h = self.pick_live(data)
            cls = OTHER[self.live[h][0]]  # the error counts against the class it was released as
            call, expect = (cls, h), "ClassMismatch"
        elif kind == "interior_pointer":
            h = self.pick_live(data)
            cls = self.live[h][0]
            delta = data.draw(st.one_of(st.just(8), st.integers(1, SIZES[cls] - 1)), label="delta")
            call, expect = (cls, h + delta), "InteriorPointer"
        else:
            # Only a handle that is free now: one freed and handed out again is in self.live.
            h = data.draw(st.sampled_from(sorted(self.freed)), label="freed handle")
            assert h not in self.live
            cls = self.freed[h]
            call, expect = (cls, h), "DoubleFree"
        assert self.release(i, [call]) == [expect], f"{kind}: release of {call[1]:#x} as '{cls}' in client {i}"
        self.errors[cls][kind] += 1

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, NCLIENTS - 1), data=st.data())
    def view(self, i, data):
        """Any client sees a live object's content; views of a non-object are refused."""
        h = self.pick_live(data)
        status, content = self.clients[i].call("view", h)
        assert status == "ok", content
        assert content == self.expected(h), f"client {i} sees other content in {h:#x}"
        assert self.clients[i].call("view", h + 8) == ("error", "InteriorPointer")
        bad = data.draw(st.sampled_from(FOREIGN[:5]), label="foreign")
        assert self.clients[i].call("view", bad) == ("error", "ForeignAddress")

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, NCLIENTS - 1), data=st.data())
    def write(self, i, data):
        """Rewrite a live object from any client; every process sees the new content."""
        h = self.pick_live(data)
        cls = self.live[h][0]
        status, err = self.clients[i].call("write", h, workers.model_stamp(h, self.serial, SIZES[cls]))
        assert status == "ok", err
        self.live[h] = (cls, self.serial)
        self.serial += 1

    @rule(i=st.integers(0, NCLIENTS - 1))
    def kill_client(self, i):
        """SIGKILL: what it allocated stays live (others may release it); its cache is reclaimed."""
        self.clients[i].kill()
        self.clients[i] = Client(self.daemon.address).wait_ready()

    @precondition(lambda self: self.restarts < 2)
    @rule(dies=st.one_of(st.none(), st.integers(0, NCLIENTS - 1)))
    def restart_daemon(self, dies):
        """SIGKILL the daemon and start it again with the same name: it recovers the instance.

        The clients that still run keep their racks; one that ``dies`` while the daemon is down
        is found dead by the recovery, which takes back its cache and keeps its counters.
        """
        self.daemon.kill(signal.SIGKILL)
        if dies is not None:
            self.clients[dies].kill()
        self.daemon.start()
        if dies is not None:
            self.clients[dies] = Client(self.daemon.address).wait_ready()
        self.restarts += 1

    # -- invariants ----------------------------------------------------------

    def accounting_problems(self, stats) -> list[str]:
        problems = []
        live = Counter(c for c, _ in self.live.values())
        for cls in SIZES:
            s = stats["classes"][cls]
            if s["carved"] != s["live"] + s["cached"] + s["free"]:
                problems.append(f"'{cls}': carved {s['carved']} != live {s['live']} + cached {s['cached']} "
                                f"+ free {s['free']}")
            want = {"live": live[cls], "allocations": self.allocations[cls], "releases": self.releases[cls]}
            got = {k: s[k] for k in want}
            if got != want:
                problems.append(f"'{cls}': daemon says {got}, the model {want}")
            errors = {k: self.errors[cls][k] for k in {*s["errors"], *self.errors[cls]}}  # "corrupt": 0
            if s["errors"] != errors:
                problems.append(f"'{cls}': daemon counts errors {s['errors']}, the model {errors}")
        pids = sorted(c["pid"] for c in stats["clients"])
        want_pids = sorted([os.getpid()] + [c.pid for c in self.clients])
        if pids != want_pids:
            problems.append(f"attached pids {pids}, expected {want_pids}")
        return problems

    @invariant()
    def figures_agree_with_the_model(self):
        """carved == live + cached + free; live, allocations, releases, errors and clients as modelled.

        Polled for a while: a killed client's rack is reclaimed asynchronously.
        """
        deadline = time.monotonic() + SETTLE
        while True:
            problems = self.accounting_problems(self.heap.stats())
            if not problems or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert not problems, "\n".join(problems)

    @invariant()
    def live_objects_keep_their_content(self):
        """Seen from the test's own heap: what was last written, by whichever client (a view is µs)."""
        for h in self.live:
            assert bytes(self.heap.view(h)) == self.expected(h), f"content of live {h:#x} changed"


# Shrinking a failure restarts a daemon and its clients for every attempt: minutes, so only
# on request (SLITTER_MODEL_SHRINK=1).  Without it a failure reports the unshrunk steps.
PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target]
if os.environ.get("SLITTER_MODEL_SHRINK"):
    PHASES.append(Phase.shrink)


def test_model(tmp_path_factory):
    SlitterModel.tmp_factory = tmp_path_factory
    run_state_machine_as_test(SlitterModel, settings=settings(
        max_examples=10, stateful_step_count=25, deadline=None, database=None, phases=PHASES,
        suppress_health_check=[HealthCheck.too_slow]))
