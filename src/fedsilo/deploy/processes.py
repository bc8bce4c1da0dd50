"""The processes a fedsilo command starts (SuperLink, SuperNode, nginx), each stopped by its PID.

Every child gets the environment fedsilo wants everywhere (Flower telemetry and update checks
off, no runtime dependency installation, no Hugging Face hub access), its own log file, and, on
Linux, a parent-death signal: if the fedsilo process is killed outright, its children get
SIGTERM instead of living on as orphans holding ports.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

QUIET_ENV: Mapping[str, str] = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
_PR_SET_PDEATHSIG = 1


class ProcessFailedError(RuntimeError):
    """A child process failed to start or died; names it and shows the end of its log."""


def quiet_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment with fedsilo's switches (and ``extra``) applied."""
    env = dict(os.environ)
    env.update(QUIET_ENV)
    env.update(extra or {})
    return env


def apply_quiet_environment() -> None:
    """Set fedsilo's switches in this process too (Flower reads some at import time)."""
    os.environ.update(QUIET_ENV)


def flower_binary(name: str) -> str:
    """A Flower command from the same installation as this Python (the venv's bin folder)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


@dataclass
class Child:
    """One started process."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_offset: int = 0  # where this process's output starts in a log shared by restarts

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Children:
    """The processes one command started, stopped newest first, each by its own PID."""

    def __init__(self) -> None:
        self._children: list[Child] = []

    def __iter__(self) -> Iterator[Child]:
        return iter(list(self._children))

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Child:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        offset = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else quiet_environment(),
                cwd=cwd,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        child = Child(name, process, log_path, offset)
        self._children.append(child)
        log.info("started %s (pid %d), log %s", name, child.pid, log_path)
        return child

    def check(self) -> None:
        """Raise if any child has exited."""
        for child in self._children:
            code = child.process.poll()
            if code is not None:
                raise ProcessFailedError(
                    f"{child.name} (pid {child.pid}) exited with status {code}; end of "
                    f"{child.log_path}:\n{child.log_tail()}"
                )

    def stop(self, child: Child, *, timeout: float = 10.0) -> None:
        """SIGTERM ``child`` by its PID, then SIGKILL it if it has not exited in time."""
        if child.alive():
            child.process.send_signal(signal.SIGTERM)
            try:
                child.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM; killing it", child.name, child.pid)
                child.process.kill()
                child.process.wait(timeout=timeout)
        if child in self._children:
            self._children.remove(child)

    def stop_all(self, *, timeout: float = 10.0) -> None:
        for child in reversed(list(self._children)):
            self.stop(child, timeout=timeout)


def wait_for_https(
    url: str, *, ca_cert: Path, timeout: float, children: Children | None = None
) -> None:
    """Wait until ``url`` answers over TLS verified against ``ca_cert`` (any HTTP status)."""
    context = ssl.create_default_context(cafile=str(ca_cert))
    deadline = time.monotonic() + timeout
    last_error = "no attempt"
    while time.monotonic() < deadline:
        if children is not None:
            children.check()
        try:
            with urllib.request.urlopen(url, context=context, timeout=2.0):
                return
        except urllib.error.HTTPError:
            return  # it answered
        except (urllib.error.URLError, OSError) as error:
            last_error = str(error)
        time.sleep(0.2)
    raise ProcessFailedError(f"{url} did not answer within {timeout:g} s ({last_error})")


def wait_for_port(
    host: str, port: int, *, timeout: float, children: Children | None = None
) -> None:
    """Wait until something accepts TCP connections on ``host:port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if children is not None:
            children.check()
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise ProcessFailedError(f"nothing listens on {host}:{port} after {timeout:g} s")
