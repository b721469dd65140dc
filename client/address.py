"""Where an instance lives: its socket address and its shared-memory segment names.

The daemon and the client agree on these names through this module alone.
An address is a socket path or an ``ipc://`` endpoint; the default socket is
``$SLITTER_ADDRESS``, else ``$XDG_RUNTIME_DIR/slitter/NAME.sock``, else
``/run/slitter/NAME.sock`` when writable, else a per-user temp directory.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

DEFAULT_INSTANCE = "default"
SHM_DIR = Path("/dev/shm")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def check_instance_name(name: str) -> str:
    """Return ``name`` if it can name segments, else raise ValueError."""
    if not _NAME_RE.match(name) or name in {".", ".."}:
        raise ValueError(f"instance name {name!r} must be 1-64 of [A-Za-z0-9_.-]")
    return name


def segment_names(instance: str) -> tuple[str, str]:
    """The (meta, data) POSIX shared-memory names of an instance, without '/'."""
    check_instance_name(instance)
    return f"slitter.{instance}.meta", f"slitter.{instance}.data"


def segment_paths(instance: str) -> list[Path]:
    """Where the segments of an instance appear in the file system."""
    return [SHM_DIR / n for n in segment_names(instance)]


def runtime_dir() -> Path:
    """The directory for sockets: the first writable of the documented choices."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.access(xdg, os.W_OK):
        return Path(xdg) / "slitter"
    run = Path("/run/slitter")
    if (run.is_dir() and os.access(run, os.W_OK)) or os.access("/run", os.W_OK):
        return run
    return Path(tempfile.gettempdir()) / f"slitter-{os.getuid()}"


def default_socket(instance: str = DEFAULT_INSTANCE) -> str:
    """The socket path of an instance when none is given."""
    return str(runtime_dir() / f"{check_instance_name(instance)}.sock")


def default_address() -> str:
    """$SLITTER_ADDRESS, else the default instance's socket."""
    return os.environ.get("SLITTER_ADDRESS") or default_socket()


def socket_path(address: str) -> str:
    """The file-system path of an address (``ipc://PATH`` or ``PATH``)."""
    return address[len("ipc://"):] if address.startswith("ipc://") else address


def endpoint(address: str) -> str:
    """The ZeroMQ endpoint of an address."""
    return "ipc://" + socket_path(address)
