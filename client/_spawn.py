"""``spawn_daemon()``: a private, ephemeral slitterd in a subprocess.

For tests and single-program use.  The daemon gets a unique instance name
and a socket in a private directory; leaving the ``with`` block stops it
with SIGTERM (SIGKILL if it does not stop) and makes sure its segments are
gone.  If the program dies without leaving the block, the daemon gets
SIGTERM from the kernel (PR_SET_PDEATHSIG) and removes its segments itself;
that signal follows the *thread* that started it, so start a daemon that
must outlive a thread from the main thread.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from slitter import address as _address
from slitter import errors
from slitter._transport import Transport
from slitter.protocol import Op


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies, so a private
    daemon never outlives its program (it then removes its segments)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


class spawn_daemon:  # noqa: N801 - used like a function: `with spawn_daemon() as address`
    """Start slitterd; ``with spawn_daemon() as address: ...`` yields its address."""

    def __init__(self, name: str | None = None, *, arena_size: str | int = "4G",
                 args: tuple[str, ...] = (), timeout: float = 20.0) -> None:
        self.name = _address.check_instance_name(name or f"spawn-{os.getpid()}-{secrets.token_hex(4)}")
        self.directory = Path(tempfile.mkdtemp(prefix="slitter-"))
        self.address = str(self.directory / "slitterd.sock")
        self.log_path = self.directory / "slitterd.log"
        self.arena_size = str(arena_size)
        self.args = tuple(args)
        self.timeout = timeout
        self.process: subprocess.Popen | None = None
        #: Segments still present when the daemon had exited (it should remove them itself).
        self.left_segments: list[Path] = []

    def start(self) -> str:
        """Start the daemon and wait until it answers a ping; returns its address."""
        cmd = [sys.executable, "-m", "slitterd", "--ephemeral", "--name", self.name,
               "--socket", self.address, "--arena-size", self.arena_size, *self.args]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                            cwd=self.directory, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._cleanup()
                raise errors.DaemonUnavailable(
                    f"slitterd for {self.address} exited with {self.process.returncode}: {self.log_tail()}",
                    address=self.address)
            if os.path.exists(self.address):
                transport = Transport(self.address, timeout=0.5)
                try:
                    transport.call(Op.PING)
                    return self.address
                except errors.DaemonUnavailable:
                    pass
                finally:
                    transport.close()
            time.sleep(0.02)
        self.stop()
        raise errors.DaemonUnavailable(f"slitterd at {self.address} did not start within {self.timeout} s",
                                       address=self.address)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; removes segments and the socket dir."""
        code = None
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                code = self.process.wait()
        elif self.process is not None:
            code = self.process.returncode
        self._cleanup()
        return code

    def _cleanup(self) -> None:
        self.left_segments = [p for p in _address.segment_paths(self.name) if p.exists()]
        for path in self.left_segments:
            path.unlink(missing_ok=True)
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
