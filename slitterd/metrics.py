"""Prometheus exposition: ``slitterd --metrics 127.0.0.1:PORT`` serves ``/metrics``.

The ``Server`` loop is single-threaded and owns the ``Instance``;
prometheus-client answers scrapes from its own HTTP thread.  The two never
share mutable state: the loop calls ``Metrics.refresh()`` on every poll tick,
which at most every ``REFRESH_SECONDS`` reads ``instance.class_stats()``,
``instance_stats()`` and ``client_stats()`` into a new frozen ``Snapshot``
and swaps one reference; the ``SnapshotCollector`` turns whichever snapshot
is current into metric families at scrape time.  A scrape is therefore at
most ``REFRESH_SECONDS`` plus one poll tick (200 ms) plus the time to serve
one batch of requests old, about 0.7 s on a quiet daemon;
``slitter_metrics_snapshot_age_seconds`` says exactly how old.

Nothing here may stop the daemon: a failing refresh is logged and the last
snapshot kept; a failing scrape is logged and answered with what could be
built.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from slitter._native import lib

log = logging.getLogger("slitterd")

#: The loop rebuilds the snapshot at most this often (seconds).
REFRESH_SECONDS = 0.5


@dataclass(frozen=True)
class Snapshot:
    """Figures read by the loop thread at one instant; never mutated once published."""

    #: time.monotonic() when it was taken.
    taken: float
    instance: Mapping[str, Any]
    classes: Mapping[str, Mapping[str, Any]]
    clients: tuple[Mapping[str, Any], ...]
    max_clients: int = 0


class SnapshotCollector(Collector):
    """Builds the ``slitter_*`` families from the current ``Snapshot`` (HTTP thread)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # families depend on the snapshot; describing them would mean collecting

    def collect(self) -> Iterator[Metric]:
        snap = self.metrics.snapshot
        if snap is None:
            return
        try:
            yield from families(snap, self.metrics.instance_name, time.monotonic() - snap.taken)
        except Exception:  # a scrape must never take the exporter down
            log.exception("metrics: building the exposition failed")


def _version() -> str:
    try:
        return metadata.version("slitter")
    except metadata.PackageNotFoundError:
        return "unknown"


#: Read once: the installed distribution does not change under a running daemon.
VERSION = _version()


def families(snap: Snapshot, instance_name: str, age: float) -> Iterator[Metric]:
    """All metric families of one snapshot, in Prometheus naming conventions."""
    info = GaugeMetricFamily("slitter_info", "Instance name and slitter version (always 1)",
                             labels=["instance_name", "version"])
    info.add_metric([instance_name, VERSION], 1)
    yield info
    yield GaugeMetricFamily("slitter_metrics_snapshot_age_seconds",
                            "Seconds since the figures of this scrape were read from the daemon", value=age)

    objects = GaugeMetricFamily("slitter_class_objects", "Objects of a class by state: live (allocated), "
                                "cached (in client magazines), free (in the depot)", labels=["class", "state"])
    carved = GaugeMetricFamily("slitter_class_carved_objects",
                               "Objects carved for a class (live + cached + free when quiet)", labels=["class"])
    size = GaugeMetricFamily("slitter_class_object_size_bytes", "Object size of a class", labels=["class"])
    stride = GaugeMetricFamily("slitter_class_stride_bytes", "Bytes between objects of a class", labels=["class"])
    runs = GaugeMetricFamily("slitter_class_runs", "Runs of spans carved for a class", labels=["class"])
    reserved = GaugeMetricFamily("slitter_class_reserved_bytes", "Arena bytes held by a class's runs",
                                 labels=["class"])
    cap = GaugeMetricFamily("slitter_class_cap_objects", "The most objects a class may carve (classes with a cap)",
                            labels=["class"])
    allocs = CounterMetricFamily("slitter_class_allocations", "Objects of a class allocated", labels=["class"])
    releases = CounterMetricFamily("slitter_class_releases", "Objects of a class released", labels=["class"])
    refills = CounterMetricFamily("slitter_class_refills", "Magazine refills served for a class", labels=["class"])
    flushes = CounterMetricFamily("slitter_class_flushes", "Magazine flushes audited for a class", labels=["class"])
    shelved = GaugeMetricFamily("slitter_class_shelved_objects",
                                "Objects of a class in full magazines on the shelf (part of cached)", labels=["class"])
    puts = CounterMetricFamily("slitter_class_shelf_puts", "Full magazines of a class put on the shelf by clients",
                               labels=["class"])
    takes = CounterMetricFamily("slitter_class_shelf_takes", "Magazines of a class taken off the shelf by clients",
                                labels=["class"])
    errors = CounterMetricFamily("slitter_release_errors", "Refused releases of a class by kind",
                                 labels=["class", "kind"])
    for name, c in sorted(snap.classes.items()):
        for state in ("live", "cached", "free"):
            objects.add_metric([name, state], c[state])
        carved.add_metric([name], c["carved"])
        size.add_metric([name], c["size"])
        stride.add_metric([name], c["stride"])
        runs.add_metric([name], c["runs"])
        reserved.add_metric([name], c["reserved_bytes"])
        if c.get("cap"):
            cap.add_metric([name], c["cap"])
        allocs.add_metric([name], c["allocations"])
        releases.add_metric([name], c["releases"])
        refills.add_metric([name], c["refills"])
        flushes.add_metric([name], c["flushes"])
        shelved.add_metric([name], c.get("shelved", 0))
        puts.add_metric([name], c.get("shelf_puts", 0))
        takes.add_metric([name], c.get("shelf_takes", 0))
        for kind, count in sorted(c["errors"].items()):
            errors.add_metric([name, kind], count)
    yield from (objects, carved, size, stride, runs, reserved, cap, allocs, releases, refills, flushes, shelved, puts,
                takes, errors)

    inst = snap.instance
    arena = GaugeMetricFamily("slitter_arena_bytes", "Arena bytes: size (virtual, sparse), reserved (carved into "
                              "runs), committed (shared memory allocated)", labels=["state"])
    arena.add_metric(["size"], inst["arena_bytes"])
    arena.add_metric(["reserved"], inst["spans_used"] * lib.SLITTER_SPAN_SIZE)
    arena.add_metric(["committed"], inst["committed_bytes"])
    yield arena
    yield GaugeMetricFamily("slitter_clients", "Clients attached", value=inst["clients"])
    yield GaugeMetricFamily("slitter_max_clients", "Clients that can attach at once (racks)", value=snap.max_clients)

    departed = GaugeMetricFamily("slitter_departed_client_live_objects",
                                 "Objects still live that a client allocated before it left (last 100 clients)",
                                 labels=["pid", "name", "class"])
    for d in inst.get("departed", ()):
        for name, live in sorted(d["live"].items()):
            departed.add_metric([str(d["pid"]), d["name"] or "", name], live)
    yield departed

    client_live = GaugeMetricFamily("slitter_client_live_objects", "Live objects allocated by one attached client",
                                    labels=["client", "pid", "name", "class"])
    client_cached = GaugeMetricFamily("slitter_client_cached_objects", "Objects cached in one client's magazines",
                                      labels=["client", "pid", "name", "class"])
    for c in snap.clients:
        for name, f in sorted(c["classes"].items()):
            labels = [str(c["id"]), str(c["pid"]), c["name"] or "", name]
            client_live.add_metric(labels, f["live"])
            client_cached.add_metric(labels, f["cached"])
    yield client_live
    yield client_cached


class Metrics:
    """The exporter: snapshot refreshed by the loop, HTTP server in its own thread."""

    def __init__(self, instance: Any, max_clients: int = 0) -> None:
        self.instance = instance
        self.instance_name: str = instance.name
        self.max_clients = max_clients
        self.snapshot: Snapshot | None = None  # replaced whole, never mutated: the only shared reference
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(self))
        self.httpd: Any = None
        self._failed_at: float | None = None

    def refresh(self, now: float | None = None, *, force: bool = False) -> None:
        """Called by the loop on every tick; rebuilds the snapshot when it is due.  Never raises."""
        now = time.monotonic() if now is None else now
        if not force and self.snapshot is not None and now - self.snapshot.taken < REFRESH_SECONDS:
            return
        try:
            inst = self.instance
            self.snapshot = Snapshot(now, inst.instance_stats(), inst.class_stats(), tuple(inst.client_stats()),
                                     self.max_clients)
            self._failed_at = None
        except Exception:
            if self._failed_at is None or now - self._failed_at > 60:  # log a persistent failure once a minute
                log.exception("metrics: reading the figures failed; serving the previous snapshot")
                self._failed_at = now

    def start(self, host: str, port: int) -> tuple[str, int]:
        """Serve ``/metrics`` on host:port (port 0 picks one); returns the bound address.

        Raises:
            OSError: the address cannot be bound.
        """
        self.refresh(force=True)
        result = start_http_server(port, addr=host, registry=self.registry)
        if isinstance(result, tuple):  # prometheus-client >= 0.17 returns (server, thread)
            self.httpd = result[0]
            bound = self.httpd.server_address
            return str(bound[0]), int(bound[1])
        return host, port

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None
