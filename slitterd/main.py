"""``slitterd``: start (or recover) an instance and serve it in the foreground."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from slitter import address

from slitterd import config
from slitterd.arena import Arena, Geometry, LayoutError, remove_segments
from slitterd.instance import Instance
from slitterd.server import Server

log = logging.getLogger("slitterd")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def open_arena(cfg: config.Config) -> Arena:
    """Create the instance's segments, refusing to share them with a live daemon."""
    meta_path, _ = address.segment_paths(cfg.name)
    if meta_path.exists():
        try:
            arena = Arena.open(cfg.name)
        except LayoutError as exc:
            raise SystemExit(f"slitterd: instance '{cfg.name}': {exc}; refusing to guess") from None
        pid = arena.header.daemon_pid
        arena.close()
        if pid != os.getpid() and _pid_alive(pid):
            raise SystemExit(f"slitterd: instance '{cfg.name}' is served by pid {pid}")
        # Recovering a crashed or stopped instance's objects is not built yet:
        # keeping the old segments would hand out objects still in use.
        raise SystemExit(f"slitterd: instance '{cfg.name}' has segments from an earlier daemon "
                         f"(pid {pid}); recovery is not supported yet: remove {meta_path} and its "
                         f".data sibling, or start with another --name")
    return Arena.create(cfg.name, cfg.arena_size, cfg.max_clients)


def main(argv: list[str] | None = None) -> int:
    cfg = config.from_args(argv)
    try:
        Geometry.for_arena(cfg.arena_size, cfg.max_clients)
    except ValueError as exc:
        print(f"slitterd: --arena-size: {exc}", file=sys.stderr)
        return 2
    if cfg.max_clients < 1:
        print("slitterd: --max-clients: must be at least 1", file=sys.stderr)
        return 2
    logging.basicConfig(level=cfg.log_level, stream=sys.stderr,
                        format="%(asctime)s slitterd[%(process)d] %(levelname)s %(message)s")
    sock = Path(cfg.socket)
    sock.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        arena = open_arena(cfg)
    except FileExistsError:
        log.error("instance '%s' was created by another daemon at the same moment", cfg.name)
        return 1
    instance = Instance(cfg.name, arena, cfg.max_clients)
    try:
        server = Server(instance, address.endpoint(cfg.socket))
    except Exception as exc:
        log.error("cannot listen on %s: %s", cfg.socket, exc)
        arena.close()
        if cfg.ephemeral:
            remove_segments(cfg.name)
        return 1
    log.info("instance '%s' serving on %s (arena %d bytes, %s)", cfg.name, cfg.socket, cfg.arena_size,
             "ephemeral" if cfg.ephemeral else "persistent")
    try:
        server.serve()
    finally:
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
    return 0
