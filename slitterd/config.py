"""slitterd's options, defined once: name, type, default, environment variable, help.

The table feeds the command line (and, later, the config file and
doc/operations.md), so a knob is never declared twice.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, fields

from slitter import address

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'64G', '512MiB', '1048576' -> bytes."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 64G, 512M, 1048576)")
    return int(m.group(1)) << (10 * " KMGT".index(m.group(2).upper() or " "))


@dataclass(frozen=True)
class Option:
    name: str
    kind: type
    default: object
    help: str


OPTIONS = (
    Option("name", str, address.DEFAULT_INSTANCE, "instance name; names the shared segments"),
    Option("socket", str, None, "socket path (default: runtime dir / NAME.sock)"),
    Option("arena_size", parse_size, "64G", "virtual size of the data segment (sparse)"),
    Option("max_clients", int, 64, "clients attached at once (one rack each)"),
    Option("ephemeral", bool, False, "remove the segments on exit"),
    Option("log_level", str, "INFO", "DEBUG, INFO, WARNING or ERROR"),
)


@dataclass(frozen=True)
class Config:
    """The frozen configuration of one daemon."""

    name: str
    socket: str
    arena_size: int
    max_clients: int
    ephemeral: bool
    log_level: str


def env_var(option: Option) -> str:
    return "SLITTERD_" + option.name.upper()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slitterd", description="Serve a slitter shared-memory slab allocator instance.")
    for opt in OPTIONS:
        flag = "--" + opt.name.replace("_", "-")
        default = os.environ.get(env_var(opt), opt.default)
        if opt.kind is bool:
            p.add_argument(flag, action="store_true", default=str(default).lower() in {"1", "true", "yes"},
                           help=f"{opt.help} (${env_var(opt)})")
        else:
            p.add_argument(flag, default=default, metavar=opt.name.upper(), help=f"{opt.help} (${env_var(opt)})")
    return p


def from_args(argv: list[str] | None = None) -> Config:
    """Parse the command line; errors exit with a message naming the option."""
    p = parser()
    ns = p.parse_args(argv)
    values = {}
    for opt in OPTIONS:
        raw = getattr(ns, opt.name)
        try:
            values[opt.name] = raw if raw is None or opt.kind is bool else opt.kind(raw)
        except ValueError as exc:
            p.error(f"--{opt.name.replace('_', '-')}: {exc}")
    try:
        address.check_instance_name(values["name"])
    except ValueError as exc:
        p.error(f"--name: {exc}")
    values["socket"] = address.socket_path(values["socket"] or address.default_socket(values["name"]))
    values["log_level"] = values["log_level"].upper()
    return Config(**{f.name: values[f.name] for f in fields(Config)})
