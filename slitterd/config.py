"""slitterd's options, defined once: name, parser, default, environment variable, help.

``OPTIONS`` is the one table.  It feeds the command-line flags
(``--arena-size``), the environment variables (``SLITTERD_ARENA_SIZE``), the
keys of the TOML config file (``arena_size``) and the reference in
doc/operations.md (``options_markdown()``; a test keeps the two equal).  A
value is taken from, in rising precedence: the default, the config file, the
environment, the command line.  Every refusal is a ``ConfigError`` whose
message names the key, the variable or the flag; ``slitterd`` prints it as
one line and exits 2.
"""

from __future__ import annotations

import argparse
import difflib
import grp
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, NoReturn

from slitter import address
from slitter.protocol import CLASS_NAME_PRINTABLE, MAX_CLASS_NAME, MAX_OBJECT_SIZE, POLICIES

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_METRICS_HOST = "127.0.0.1"
SHELF_IDLE_SECONDS = 5.0  # option shelf_idle, and the Shelf of an Instance made without a configuration


class ConfigError(ValueError):
    """A refused configuration value; the message names where it came from."""


# -- value parsers: raw value (str from the command line or the environment, or a
# -- TOML value) -> typed value; ValueError says what is wrong, not where.


def parse_size(value: object) -> int:
    """'64G', '512MiB', '1048576' or an integer -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"must be positive, not {value}")
        return value
    m = _SIZE_RE.match(str(value)) if isinstance(value, str) else None
    if not m:
        raise ValueError(f"not a size: {value!r} (use e.g. 64G, 512M, 1048576)")
    return int(m.group(1)) << (10 * " KMGT".index(m.group(2).upper() or " "))


def _int(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"must be an integer, not {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip(), 10)
        except ValueError:
            pass
    raise ValueError(f"must be an integer, not {value!r}")


def parse_positive_int(value: object) -> int:
    n = _int(value)
    if n < 1:
        raise ValueError(f"must be at least 1, not {n}")
    return n


def parse_message_limit(value: object) -> int:
    n = parse_size(value) if isinstance(value, str) else _int(value)
    if not 1024 <= n <= 1 << 20:
        raise ValueError(f"must be between 1024 and 1048576 bytes, not {n}")
    return n


def parse_seconds(value: object) -> float:
    """A duration in seconds, 0.01 to 3600."""
    try:
        seconds = float(value.strip() if isinstance(value, str) else value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"must be a number of seconds, not {value!r}") from None
    if isinstance(value, bool) or not 0.01 <= seconds <= 3600:
        raise ValueError(f"must be between 0.01 and 3600 seconds, not {value!r}")
    return seconds


def parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in {"1", "true", "yes", "on"}:
        return True
    if isinstance(value, str) and value.strip().lower() in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"must be true or false, not {value!r}")


def parse_str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {value!r}")
    return value


def parse_name(value: object) -> str:
    return address.check_instance_name(parse_str(value))


def parse_socket(value: object) -> str:
    path = address.socket_path(parse_str(value))
    if not path:
        raise ValueError("must not be empty")
    return path


def parse_mode(value: object) -> int:
    """0o660 (TOML octal) or '0660' / '660' (text, always octal) -> a permission mode."""
    if isinstance(value, str):
        try:
            mode = int(value.strip().removeprefix("0o"), 8)
        except ValueError:
            raise ValueError(f"not an octal mode: {value!r} (use e.g. '0660')") from None
    elif isinstance(value, int) and not isinstance(value, bool):
        mode = value
    else:
        raise ValueError(f"must be an octal mode such as '0660', not {value!r}")
    if mode & ~0o770:
        raise ValueError(f"{mode:#o} grants more than owner and group (use 0600 or 0660)")
    if mode & 0o600 != 0o600:
        raise ValueError(f"{mode:#o} must let the owner read and write (0600 at least)")
    return mode


def parse_group(value: object) -> str:
    """A group name or numeric gid that exists on this host."""
    text = parse_str(value) if not isinstance(value, int) or isinstance(value, bool) else str(value)
    try:
        if text.isdigit():
            grp.getgrgid(int(text))
        else:
            grp.getgrnam(text)
    except KeyError:
        raise ValueError(f"no group {text!r} on this host") from None
    return text


def group_id(group: str) -> int:
    """The gid of a group that ``parse_group`` accepted."""
    return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid


def parse_log_level(value: object) -> str:
    level = parse_str(value).strip().upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"{value!r} is not one of {', '.join(LOG_LEVELS)}")
    return level


def parse_policy(value: object) -> str:
    policy = parse_str(value).strip().lower()
    if policy not in POLICIES:
        raise ValueError(f"{value!r} is not one of {', '.join(POLICIES)}")
    return policy


def parse_metrics(value: object) -> tuple[str, int]:
    """'PORT', 'HOST:PORT' or '[V6]:PORT' -> (host, port); the host defaults to loopback."""
    if isinstance(value, int) and not isinstance(value, bool):
        host, port_text = DEFAULT_METRICS_HOST, str(value)
    else:
        text = parse_str(value).strip()
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or not rest.startswith(":"):
                raise ValueError(f"not [ADDRESS]:PORT: {text!r}")
            port_text = rest[1:]
        elif ":" in text:
            host, _, port_text = text.rpartition(":")
        else:
            host, port_text = DEFAULT_METRICS_HOST, text
        host = host or DEFAULT_METRICS_HOST
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(f"{host!r} is not an IP address (use e.g. 127.0.0.1:9464)") from None
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} is not 0-65535 (use e.g. 127.0.0.1:9464)")
    return host, int(port_text)


@dataclass(frozen=True)
class ClassConfig:
    """A class declared in the config file, registered when the daemon starts."""

    name: str
    size: int
    #: Objects read as zeros when allocated.
    zero_init: bool = False
    #: The most objects the class may carve (past it, allocate raises
    #: OutOfMemory); None keeps the class's cap (none, or one a client set).
    cap: int | None = None


def _toml_int(value: object) -> int:
    """Class tables come only from TOML, where a number is written as one."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be an integer, not {value!r}")
    return value


def _toml_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, not {value!r}")
    return value


_CLASS_KEYS: dict[str, Callable[[object], object]] = {
    "name": parse_str, "size": _toml_int, "zero_init": _toml_bool,
    "cap": lambda v: parse_positive_int(_toml_int(v)),
}


def parse_classes(value: object) -> tuple[ClassConfig, ...]:
    """A TOML array of tables (``[[classes]]``) -> ClassConfigs; refusals name ``classes[i].key``."""
    if not isinstance(value, list):
        raise ValueError("must be an array of tables ([[classes]])")
    out: list[ClassConfig] = []
    seen: set[str] = set()
    for i, table in enumerate(value):
        where = f"[{i}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: must be a table with name and size")
        for key in table:
            if key not in _CLASS_KEYS:
                raise ConfigError(f"{where}: unknown key {key!r}{_did_you_mean(key, _CLASS_KEYS)}")
        for key in ("name", "size"):
            if key not in table:
                raise ConfigError(f"{where}: missing key {key!r}")
        values: dict[str, Any] = {}
        for key, raw in table.items():
            try:
                values[key] = _CLASS_KEYS[key](raw)
            except ValueError as exc:
                raise ConfigError(f"{where}.{key}: {exc}") from None
        name, size = values["name"], values["size"]
        if not 1 <= len(name.encode()) <= MAX_CLASS_NAME:
            raise ConfigError(f"{where}.name: {name!r} must be 1-{MAX_CLASS_NAME} bytes")
        if not name.isprintable():
            raise ConfigError(f"{where}.name: {name!r}: {CLASS_NAME_PRINTABLE}")
        if not 1 <= size <= MAX_OBJECT_SIZE:
            raise ConfigError(f"{where}.size: {size} is not 1-{MAX_OBJECT_SIZE} bytes")
        if name in seen:
            raise ConfigError(f"{where}.name: class {name!r} is declared twice")
        seen.add(name)
        out.append(ClassConfig(**values))
    return tuple(out)


@dataclass(frozen=True)
class Option:
    """One knob: its parser, default and help; where it may be set."""

    name: str
    parse: Callable[[object], object]
    default: object
    help: str
    #: Settable with --NAME and $SLITTERD_NAME (``classes`` is file-only).
    cli: bool = True
    metavar: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str | None:
        return "SLITTERD_" + self.name.upper() if self.cli else None


OPTIONS: tuple[Option, ...] = (
    Option("name", parse_name, address.DEFAULT_INSTANCE, "instance name; names the shared segments", metavar="NAME"),
    Option("socket", parse_socket, None,
           "socket path (default: $XDG_RUNTIME_DIR/slitter/NAME.sock, else /run/slitter/NAME.sock)", metavar="PATH"),
    Option("socket_mode", parse_mode, 0o600,
           "permissions of the socket and the segments: 0600, or 0660 to let socket_group in", metavar="MODE"),
    Option("socket_group", parse_group, None,
           "group that owns the socket and the segments (default: the daemon's)", metavar="GROUP"),
    Option("arena_size", parse_size, "64G", "virtual size of the data segment (sparse)", metavar="SIZE"),
    Option("max_clients", parse_positive_int, 64, "clients attached at once (one rack each)", metavar="N"),
    Option("max_message_bytes", parse_message_limit, 65536,
           "largest request frame accepted (1 KiB..1 MiB); bigger ones are dropped unanswered", metavar="BYTES"),
    Option("ephemeral", parse_bool, False, "remove the segments on exit"),
    Option("metrics", parse_metrics, None,
           "serve Prometheus metrics over HTTP at [HOST:]PORT (host default 127.0.0.1); off by default",
           metavar="ADDR"),
    Option("error_policy", parse_policy, "raise",
           "policy on a refused release for classes registered without one: raise, log or abort", metavar="POLICY"),
    Option("log_level", parse_log_level, "INFO", "DEBUG, INFO, WARNING, ERROR or CRITICAL", metavar="LEVEL"),
    Option("shelf_idle", parse_seconds, SHELF_IDLE_SECONDS,
           "seconds a class's full magazines may wait on the shelf with none taken before they go back to "
           "the depot (0.5 s while the shelf is nearly full)", metavar="SECONDS"),
    Option("classes", parse_classes, (),
           "classes to register (and cap) at start and on SIGHUP: [[classes]] tables of name, size, zero_init, cap",
           cli=False),
)
OPTION_NAMES = {opt.name: opt for opt in OPTIONS}
CONFIG_ENV = "SLITTERD_CONFIG"


@dataclass(frozen=True)
class Config:
    """The frozen configuration of one daemon."""

    name: str
    socket: str
    socket_mode: int
    socket_group: str | None
    arena_size: int
    max_clients: int
    max_message_bytes: int
    ephemeral: bool
    metrics: tuple[str, int] | None
    error_policy: str
    log_level: str
    shelf_idle: float
    classes: tuple[ClassConfig, ...]
    #: The file the configuration was read from, if any (SIGHUP re-reads it).
    config_file: str | None = None


@dataclass(frozen=True)
class Invocation:
    """What the command line asked for, before the file and environment are merged in."""

    config_file: str | None
    check_only: bool
    #: Options given as flags, still raw text (or bool), by option name.
    flags: Mapping[str, object]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (exit 2), like every other refusal."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="slitterd", description="Serve a slitter shared-memory slab allocator instance.",
                epilog="Precedence: flag > environment > config file > default.  See doc/operations.md.")
    p.add_argument("--config", metavar="FILE", default=None,
                   help=f"read options from this TOML file (${CONFIG_ENV})")
    p.add_argument("--check-config", metavar="FILE", default=None,
                   help="validate FILE (with the other flags and the environment), print a summary, exit 0 or 2")
    for opt in OPTIONS:
        if not opt.cli:
            continue
        if opt.parse is parse_bool:
            p.add_argument(opt.flag, dest=opt.name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{opt.help} (${opt.env})")
        else:
            p.add_argument(opt.flag, dest=opt.name, default=None, metavar=opt.metavar or opt.name.upper(),
                           help=f"{opt.help} (${opt.env})")
    return p


def parse_args(argv: list[str] | None = None) -> Invocation:
    """Parse the command line; a usage error exits 2 with one line."""
    ns = parser().parse_args(argv)
    flags = {opt.name: getattr(ns, opt.name) for opt in OPTIONS if opt.cli and getattr(ns, opt.name) is not None}
    config_file = ns.check_config or ns.config
    return Invocation(config_file, ns.check_config is not None, flags)


def _did_you_mean(key: str, known: Mapping[str, object] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def read_file(path: str) -> dict[str, object]:
    """The top-level table of a TOML config file; unknown keys are refused."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    for key in data:
        if key not in OPTION_NAMES:
            raise ConfigError(f"{path}: unknown key {key!r}{_did_you_mean(key, OPTION_NAMES)}")
    return data


def build(invocation: Invocation, environ: Mapping[str, str] | None = None) -> Config:
    """Merge default < file < environment < flags into a validated ``Config``.

    Raises:
        ConfigError: naming the file key, the variable or the flag at fault.
    """
    environ = os.environ if environ is None else environ
    config_file = invocation.config_file or environ.get(CONFIG_ENV) or None
    from_file = read_file(config_file) if config_file else {}
    values: dict[str, object] = {}
    for opt in OPTIONS:
        if opt.name in invocation.flags:
            raw, where = invocation.flags[opt.name], opt.flag
        elif opt.env and opt.env in environ:
            raw, where = environ[opt.env], f"${opt.env}"
        elif opt.name in from_file:
            raw, where = from_file[opt.name], f"{config_file}: {opt.name}"
        else:
            values[opt.name] = opt.parse(opt.default) if isinstance(opt.default, str) else opt.default
            continue
        try:
            values[opt.name] = opt.parse(raw)
        except ConfigError as exc:  # already names the element: classes[1].size
            raise ConfigError(f"{where}{exc}") from None
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    values["socket"] = values["socket"] or address.default_socket(str(values["name"]))
    _check_arena(values, invocation, environ, from_file, config_file)
    return Config(**{f.name: values[f.name] for f in fields(Config) if f.name != "config_file"},
                  config_file=config_file)


def _check_arena(values: dict[str, object], invocation: Invocation, environ: Mapping[str, str],
                 from_file: Mapping[str, object], config_file: str | None) -> None:
    from slitter._native import lib
    from slitterd.arena import Geometry  # the layout rules live with the arena

    classes = values["classes"]
    if len(classes) >= lib.SLITTER_MAX_CLASSES:  # type: ignore[arg-type]
        raise ConfigError(f"{config_file}: classes: {len(classes)} declared; "  # type: ignore[arg-type]
                          f"an instance has at most {lib.SLITTER_MAX_CLASSES - 1}")
    try:
        Geometry.for_arena(int(values["arena_size"]), int(values["max_clients"]))  # type: ignore[call-overload]
    except ValueError as exc:
        opt = OPTION_NAMES["arena_size"]
        where = (opt.flag if opt.name in invocation.flags else f"${opt.env}" if opt.env in environ
                 else f"{config_file}: arena_size" if "arena_size" in from_file else opt.flag)
        raise ConfigError(f"{where}: {exc}") from None


def load(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> tuple[Invocation, Config]:
    """Command line, environment and file -> (invocation, config); ConfigError on any refusal."""
    invocation = parse_args(argv)
    return invocation, build(invocation, environ)


def summary(cfg: Config) -> str:
    """One line saying what a config will do (``--check-config`` prints it)."""
    metrics = f"metrics on {cfg.metrics[0]}:{cfg.metrics[1]}" if cfg.metrics else "no metrics"
    return (f"instance '{cfg.name}' on {cfg.socket} (mode {cfg.socket_mode:04o}"
            f"{', group ' + cfg.socket_group if cfg.socket_group else ''}), arena {cfg.arena_size} bytes, "
            f"{cfg.max_clients} clients, {len(cfg.classes)} classes, {metrics}")


def options_markdown() -> str:
    """The configuration reference of doc/operations.md, rendered from ``OPTIONS``."""
    rows = ["| file key | flag | environment | default | meaning |", "| --- | --- | --- | --- | --- |"]
    for opt in OPTIONS:
        if opt.default is None or opt.default == ():
            default = "—"
        elif isinstance(opt.default, bool):
            default = f"`{str(opt.default).lower()}`"
        else:
            default = f"`{opt.default:04o}`" if opt.parse is parse_mode else f"`{opt.default}`"
        rows.append(f"| `{opt.name}` | {f'`{opt.flag}`' if opt.cli else '—'} | "
                    f"{f'`{opt.env}`' if opt.env else '—'} | {default} | {opt.help} |")
    return "\n".join(rows) + "\n"
