"""``slitterctl``: ask a running slitterd for its figures and print them.

Each subcommand is one protocol request and one formatter.  With no daemon
at the address it prints one line naming the address and exits 1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from slitter import address, errors
from slitter._transport import Transport
from slitter.protocol import Op

STAT_COLUMNS = ("size", "carved", "live", "cached", "shelved", "free", "allocations", "releases", "refills",
                "flushes")


def stats_table(stats: dict[str, Any], title: str | None = None) -> Table:
    """The per-class stats as a rich table, one row per class."""
    table = Table(title=title)
    table.add_column("class", style="bold")
    for col in (*STAT_COLUMNS, "errors"):
        table.add_column(col, justify="right")
    for name, c in sorted(stats["classes"].items()):
        errs = ", ".join(f"{k}={v}" for k, v in c["errors"].items() if v) or "0"
        table.add_row(name, *(f"{c[col]:,}" for col in STAT_COLUMNS), errs)
    return table


def clients_table(stats: dict[str, Any]) -> Table:
    table = Table(title="clients")
    for col in ("id", "pid", "name", "class", "live", "cached"):
        table.add_column(col, justify="right" if col not in ("name", "class") else "left")
    for c in stats["clients"]:
        rows = sorted(c["classes"].items()) or [("-", {"live": 0, "cached": 0})]
        for cls, f in rows:
            table.add_row(str(c["id"]), str(c["pid"]), c["name"] or "-", cls, f"{f['live']:,}", f"{f['cached']:,}")
    return table


def classes_table(stats: dict[str, Any]) -> Table:
    table = Table(title="classes")
    for col in ("class", "id", "size", "stride", "zero_init", "runs", "reserved_bytes"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, c in sorted(stats["classes"].items(), key=lambda kv: kv[1]["id"]):
        table.add_row(name, str(c["id"]), f"{c['size']:,}", f"{c['stride']:,}", str(c["zero_init"]),
                      str(c["runs"]), f"{c['reserved_bytes']:,}")
    return table


def audit_table(reply: dict[str, Any]) -> Table:
    table = Table(title="audit log")
    for col in ("seq", "time", "pid", "class", "handle", "kind", "source"):
        table.add_column(col, justify="right" if col in ("seq", "pid") else "left")
    for seq, when, pid, cls, handle, kind, source in reply["entries"]:
        table.add_row(str(seq), _stamp(when), str(pid), cls, f"{handle:#x}", kind, source)
    return table


def _stamp(when: float) -> str:
    return datetime.datetime.fromtimestamp(when).isoformat(sep=" ", timespec="milliseconds")


def follow_audit(transport: Transport, console: Console, as_json: bool, interval: float = 0.5) -> int:
    """Print audit entries as they arrive, like `tail -f`, until interrupted."""
    since = 0
    try:
        while True:
            reply = transport.call(Op.AUDIT, since=since, limit=1000)
            for seq, when, pid, cls, handle, kind, source in reply["entries"]:
                if as_json:
                    print(json.dumps({"seq": seq, "time": when, "pid": pid, "class": cls, "handle": handle,
                                      "kind": kind, "source": source}), flush=True)
                else:
                    print(f"{_stamp(when)} #{seq} pid {pid} class '{cls}' handle {handle:#x} {kind} ({source})",
                          flush=True)
                since = seq
            if not reply["entries"]:
                time.sleep(interval)
    except KeyboardInterrupt:
        return 0


def top(transport: Transport, console: Console, interval: float, count: int | None) -> int:
    """Refresh the stats table in place, like top(1), until interrupted (or ``count`` frames)."""
    from rich.console import Group
    from rich.live import Live

    def frame() -> Group:
        stats = transport.call(Op.STATS)
        inst = stats["instance"]
        title = (f"slitter instance '{inst['name']}' - {inst['clients']} clients, {inst['runs']} runs, "
                 f"{inst['committed_bytes']:,} bytes committed - {time.strftime('%H:%M:%S')}")
        return Group(stats_table(stats, title=title), clients_table(stats))

    shown = 0
    try:
        with Live(frame(), console=console, auto_refresh=False, transient=False) as live:
            shown = 1
            while count is None or shown < count:
                time.sleep(interval)
                live.update(frame(), refresh=True)
                shown += 1
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="slitterctl", description="Query a running slitterd.")
    p.add_argument("--socket", default=None, help="daemon socket (default: $SLITTER_ADDRESS or the default socket)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for a reply")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("stats", help="per-class figures")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("classes", help="registered classes and their runs")
    sub.add_parser("clients", help="attached clients: pid, name, live and cached per class")
    sub.add_parser("ping", help="is the daemon there; protocol version and ops")
    t = sub.add_parser("top", help="the stats table, refreshed live")
    t.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    t.add_argument("--count", type=int, default=None, help="stop after this many refreshes")
    a = sub.add_parser("audit", help="refused releases and audit findings, with counters")
    a.add_argument("--json", action="store_true", help="machine-readable output")
    a.add_argument("--follow", "-f", action="store_true", help="keep printing new entries")
    ns = p.parse_args(argv)
    where = address.socket_path(ns.socket or address.default_address())
    transport = Transport(where, ns.timeout)
    try:
        if ns.command == "ping":
            reply = transport.call(Op.PING)
            print(f"slitterd pid {reply['pid']} instance '{reply['instance']}' protocol v{reply['version']} "
                  f"ops: {', '.join(reply['ops'])}")
            return 0
        if ns.command == "top":
            return top(transport, Console(), ns.interval, ns.count)
        if ns.command == "audit":
            if ns.follow:
                return follow_audit(transport, Console(), ns.json)
            reply = transport.call(Op.AUDIT, since=0, limit=1000)
            if ns.json:
                print(json.dumps({k: reply[k] for k in ("entries", "next", "counters", "dropped")}, indent=2))
            else:
                console = Console()
                console.print(audit_table(reply))
                totals = {name: {k: v for k, v in errs.items() if v} for name, errs in reply["counters"].items()}
                console.print(f"counters: {json.dumps({n: e for n, e in totals.items() if e}) or '{}'}; "
                              f"dropped from the log: {reply['dropped']}")
            return 0
        stats = transport.call(Op.STATS)
    except errors.DaemonUnavailable as exc:
        print(f"slitterctl: {exc}", file=sys.stderr)
        return 1
    except errors.SlitterError as exc:
        print(f"slitterctl: {exc}", file=sys.stderr)
        return 2
    finally:
        transport.close()
    console = Console()
    if ns.command == "stats":
        if ns.json:
            print(json.dumps({k: stats[k] for k in ("instance", "classes", "clients")}, indent=2))
        else:
            console.print(stats_table(stats, title=f"slitter instance '{stats['instance']['name']}'"))
    elif ns.command == "classes":
        console.print(classes_table(stats))
    elif ns.command == "clients":
        console.print(clients_table(stats))
    return 0

