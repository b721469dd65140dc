"""``slitterd``: start (or recover) an instance and serve it in the foreground.

The lifecycle: read the configuration (``config``), create the segments
(``arena``) or recover an earlier daemon's (``Instance.recover``), register
the predeclared classes, bind the socket (``server``),
start the Prometheus exporter (``metrics``) if asked, tell systemd READY=1
(``notify``), serve until SIGTERM/SIGINT, then STOPPING=1 and clean up.
SIGHUP re-reads the config file and registers the classes it newly declares.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import sys
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from slitter import address, errors

from slitterd import config
from slitterd.arena import Arena, LayoutError, remove_segments
from slitterd.instance import ClassSpec, Instance
from slitterd.notify import Notifier
from slitterd.server import Server

if TYPE_CHECKING:
    from slitterd.metrics import Metrics

log = logging.getLogger("slitterd")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def open_arena(cfg: config.Config) -> tuple[Arena, bool]:
    """Create the instance's segments, or reopen them to recover (True).

    Refuses segments of another layout version or with a damaged header, and
    segments a live daemon serves.
    """
    meta_path, _ = address.segment_paths(cfg.name)
    if meta_path.exists():
        try:
            arena = Arena.open(cfg.name)
        except LayoutError as exc:
            raise SystemExit(f"slitterd: instance '{cfg.name}': {exc}; refusing to guess") from None
        pid = arena.header.daemon_pid
        if pid != os.getpid() and _pid_alive(pid):
            arena.close()
            raise SystemExit(f"slitterd: instance '{cfg.name}' is served by pid {pid}")
        if arena.header.max_racks < cfg.max_clients:
            log.warning("instance '%s' was made for %d clients; --max-clients %d is capped to it",
                        cfg.name, arena.header.max_racks, cfg.max_clients)
        return arena, True
    return Arena.create(cfg.name, cfg.arena_size, cfg.max_clients), False


def apply_access(cfg: config.Config, arena: Arena, sock: Path) -> None:
    """Give the socket and both segments the configured mode and group."""
    gid = config.group_id(cfg.socket_group) if cfg.socket_group else -1
    for fd in (arena.meta_fd, arena.data_fd):
        os.fchmod(fd, cfg.socket_mode & 0o660)
        if gid != -1:
            os.fchown(fd, -1, gid)
    os.chmod(sock, cfg.socket_mode & 0o770)
    if gid != -1:
        os.chown(sock, -1, gid)


def _make_socket_dir(cfg: config.Config, sock: Path) -> None:
    if sock.parent.is_dir():
        return  # e.g. systemd's RuntimeDirectory=: its mode is the unit's business
    sock.parent.mkdir(mode=0o750 if cfg.socket_group else 0o700, parents=True, exist_ok=True)
    if cfg.socket_group:
        os.chown(sock.parent, -1, config.group_id(cfg.socket_group))


def register_declared(instance: Instance, classes: tuple[config.ClassConfig, ...], why: str) -> int:
    """Register the config file's classes and apply their caps; returns how many were new.

    A conflict is logged, not fatal.  A declared ``cap`` replaces the class's
    cap (also one a client set); a class declared without one keeps its cap.
    """
    new = 0
    for c in classes:
        known = c.name in instance.specs
        try:
            class_id = instance.register_class(ClassSpec(c.name, c.size, c.zero_init))
        except errors.SlitterError as exc:
            log.error("%s: declared class '%s' not registered: %s", why, c.name, exc)
            continue
        new += not known
        if c.cap is not None and instance.arena.classes[class_id].cap != c.cap:
            instance.set_cap(class_id, c.cap)
            log.info("%s: class '%s' capped at %d objects", why, c.name, c.cap)
    return new


class Reloader:
    """SIGHUP: re-read the config file and register its new classes, from the loop's tick."""

    #: Options that a reload applies; the others need a restart.
    LIVE = frozenset({"classes", "log_level", "shelf_idle"})

    def __init__(self, invocation: config.Invocation, cfg: config.Config, instance: Instance,
                 notifier: Notifier, metrics: Metrics | None) -> None:
        self.invocation, self.cfg, self.instance = invocation, cfg, instance
        self.notifier, self.metrics = notifier, metrics
        self.requested = False

    def request(self, *_args: object) -> None:
        self.requested = True  # signal handler: the work happens in tick()

    def tick(self, _now: float) -> None:
        if not self.requested:
            return
        self.requested = False
        self.notifier.reloading()
        try:
            self.reload()
        finally:
            self.notifier.ready(f"serving instance '{self.cfg.name}' (reloaded)")

    def reload(self) -> None:
        if not self.cfg.config_file:
            log.info("SIGHUP: no config file to re-read")
            return
        try:
            new = config.build(self.invocation)
        except config.ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            return
        added = register_declared(self.instance, new.classes, "reload")
        stale = [f.name for f in fields(config.Config)
                 if f.name not in self.LIVE and getattr(new, f.name) != getattr(self.cfg, f.name)]
        if stale:
            log.warning("reload: %s changed; that takes a restart", ", ".join(stale))
        logging.getLogger().setLevel(new.log_level)
        self.instance.shelf.idle_seconds = new.shelf_idle
        if self.metrics is not None:
            self.metrics.refresh(force=True)
        self.cfg = new
        log.info("reloaded %s: %d classes declared, %d new", new.config_file, len(new.classes), added)


def _start_metrics(cfg: config.Config, instance: Instance) -> Metrics:
    from slitterd.metrics import Metrics  # prometheus-client is loaded only when asked for

    metrics = Metrics(instance, instance.racks.max_clients)
    host, port = metrics.start(*cfg.metrics)  # type: ignore[misc]
    shown = f"[{host}]" if ":" in host else host
    log.info("metrics on http://%s:%d/metrics", shown, port)
    with contextlib.suppress(ValueError):
        if not ipaddress.ip_address(host).is_loopback:
            log.warning("metrics exposed beyond this host on %s:%d", host, port)
    return metrics


def main(argv: list[str] | None = None) -> int:
    try:
        invocation, cfg = config.load(argv)
    except config.ConfigError as exc:
        print(f"slitterd: {exc}", file=sys.stderr)
        return 2
    if invocation.check_only:
        print(f"{cfg.config_file}: ok: {config.summary(cfg)}")
        return 0
    logging.basicConfig(level=cfg.log_level, stream=sys.stderr,
                        format="%(asctime)s slitterd[%(process)d] %(levelname)s %(message)s")
    early_hup: list[int] = []
    signal.signal(signal.SIGHUP, lambda *_: early_hup.append(1))  # at once: SIGHUP's default would kill us
    notifier = Notifier()
    if cfg.config_file:
        log.info("configuration from %s", cfg.config_file)
    sock = Path(cfg.socket)
    _make_socket_dir(cfg, sock)
    try:
        arena, recovered = open_arena(cfg)
    except FileExistsError:
        log.error("instance '%s' was created by another daemon at the same moment", cfg.name)
        return 1
    instance = Instance(cfg.name, arena, cfg.max_clients)
    instance.default_policy = cfg.error_policy
    instance.shelf.idle_seconds = cfg.shelf_idle
    if recovered:
        found = instance.recover()
        log.info("recovered instance '%s' (start %d): %d classes, %d runs, %d live objects, %d free, "
                 "%d clients adopted, %d gone", cfg.name, arena.header.generation, found["classes"],
                 found["runs"], found["live"], found["free"], found["adopted"], found["retired"])
    register_declared(instance, cfg.classes, "start")
    server = metrics = None
    what = cfg.socket
    try:
        server = Server(instance, address.endpoint(cfg.socket), cfg.max_message_bytes)
        apply_access(cfg, arena, sock)
        if cfg.metrics is not None:
            what = "metrics address {}:{}".format(*cfg.metrics)
            metrics = _start_metrics(cfg, instance)
    except Exception as exc:
        log.error("cannot serve on %s: %s", what, exc)
        if server is not None:
            server.close()
            sock.unlink(missing_ok=True)
        arena.close()
        if not recovered:
            remove_segments(cfg.name)  # created just now and never served: a retry must find them gone
        return 1
    reloader = Reloader(invocation, cfg, instance, notifier, metrics)
    reloader.requested = bool(early_hup)
    signal.signal(signal.SIGHUP, reloader.request)
    server.poll_ms = notifier.poll_ms(server.poll_ms)
    server.tick_hooks += [notifier.tick, reloader.tick, instance.shelf.sweep]
    if metrics is not None:
        server.tick_hooks.append(metrics.refresh)
    log.info("instance '%s' serving on %s (arena %d bytes, %s)", cfg.name, cfg.socket, cfg.arena_size,
             "ephemeral" if cfg.ephemeral else "persistent")
    try:
        server.serve(on_ready=lambda: notifier.ready(f"serving instance '{cfg.name}' on {cfg.socket}"))
    finally:
        notifier.stopping(f"stopping instance '{cfg.name}'")
        if metrics is not None:
            metrics.stop()
        for client in list(instance.racks.clients.values()):
            if client.pidfd is not None:
                os.close(client.pidfd)
                client.pidfd = None
        server.close()
        sock.unlink(missing_ok=True)
        arena.close()
        if cfg.ephemeral:
            remove_segments(cfg.name)
        log.info("instance '%s' stopped%s", cfg.name, "; segments removed" if cfg.ephemeral else "")
        notifier.close()
    return 0
