"""The systemd notification protocol (sd_notify), without libsystemd.

A ``Notifier`` sends datagrams of ``KEY=VALUE`` lines to the AF_UNIX
socket named by ``$NOTIFY_SOCKET`` (a path, or an abstract name written
``@name``).  ``slitterd`` sends READY=1 once its socket is bound and
serving, WATCHDOG=1 from the ``Server`` loop's tick at half of
``$WATCHDOG_USEC`` (so a hung loop is restarted by systemd), RELOADING=1 and
READY=1 around a SIGHUP reload, and STOPPING=1 on shutdown.  Outside systemd
(no ``$NOTIFY_SOCKET``) every call is a no-op.  Sending never raises: a lost
notification is logged, and the daemon goes on.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("slitterd")


class Notifier:
    """Talks to the service manager that started this process, if any."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        raw = environ.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if raw.startswith("@"):
            self.address = "\0" + raw[1:]  # abstract namespace
        elif raw.startswith("/"):
            self.address = raw
        elif raw:
            log.warning("ignoring NOTIFY_SOCKET=%r: neither a path nor an @abstract name", raw)
        #: Seconds between WATCHDOG=1 (half of WATCHDOG_USEC), or None when no watchdog is armed.
        self.watchdog_interval: float | None = None
        usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 2e6
        self._next_watchdog = 0.0
        self._sock: socket.socket | None = None
        if self.address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *lines: str) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines; True if it was sent."""
        if self._sock is None or self.address is None:
            return False
        try:
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            log.warning("sd_notify %s to %r failed: %s", "/".join(lines), self.address.replace("\0", "@"), exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        """READY=1: the daemon serves (its socket is bound)."""
        self._next_watchdog = 0.0
        return self.send("READY=1", *((f"STATUS={status}",) if status else ()))

    def reloading(self) -> bool:
        """RELOADING=1 with the MONOTONIC_USEC that systemd >= 253 asks for; follow with ``ready()``."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self, status: str = "") -> bool:
        """STOPPING=1: the daemon is shutting down."""
        return self.send("STOPPING=1", *((f"STATUS={status}",) if status else ()))

    def tick(self, now: float | None = None) -> None:
        """Called on every loop tick: sends WATCHDOG=1 when it is due."""
        if self.watchdog_interval is None or self._sock is None:
            return
        now = time.monotonic() if now is None else now
        if now >= self._next_watchdog:
            self.send("WATCHDOG=1")
            self._next_watchdog = now + self.watchdog_interval

    def poll_ms(self, default: int) -> int:
        """The loop's poll timeout that keeps watchdog pings on time."""
        if self.watchdog_interval is None:
            return default
        return max(10, min(default, int(self.watchdog_interval * 1000 / 2)))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
