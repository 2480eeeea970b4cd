"""Keep the processes `sluice up` and `sluice serve` started running: restart one that exits on its own, with backoff.

A child that dies is started again after a delay that starts at ``Backoff.initial`` and doubles up to
``Backoff.maximum``; once a child has stayed up for ``Backoff.reset_after`` seconds the delay starts over. Each death
is reported with its cause (exit code or signal) and, where the child keeps a log, its last lines.

The loop runs until interrupted (KeyboardInterrupt, see serve.stop_on_signals); stopping the children is left to
whoever started them, so that a shutdown never races a restart: once the loop has been left nothing restarts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from sluice.errors import SluiceError
from sluice.triton_server import TritonServer

Say = Callable[[str], None]

POLL_S = 0.1  # how often the children are checked: a death is noticed within this long
LOG_TAIL_LINES = 10


class Child(Protocol):
    name: str

    def returncode(self) -> int | None:
        """None while the process runs; its exit status (negative: the signal) once it has exited."""

    def restart(self) -> None:
        """Clean up what is left of the dead process and start a new one on the same ports."""

    def last_words(self) -> str:
        """What to quote when it died (its log's last lines), or ''."""


@dataclass
class Backoff:
    initial: float = 0.5
    maximum: float = 10.0
    reset_after: float = 30.0
    _next: float = field(default=0.0, init=False)

    def delay(self, uptime: float) -> float:
        """The wait before the next start of a child that died after ``uptime`` seconds up."""
        if uptime >= self.reset_after or self._next == 0.0:
            self._next = self.initial
        else:
            self._next = min(self._next * 2, self.maximum)
        return self._next


def exit_cause(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


@dataclass
class _Watched:
    child: Child
    backoff: Backoff
    started: float
    restart_at: float | None = None


def supervise(children: Sequence[Child], say: Say, backoff: Callable[[], Backoff] = Backoff) -> None:
    """Watch ``children`` (already started) and restart each one that exits; returns never (interrupt to leave)."""
    now = time.monotonic()
    watched = [_Watched(child, backoff(), now) for child in children]
    while True:
        now = time.monotonic()
        for each in watched:
            if each.restart_at is None:
                code = each.child.returncode()
                if code is None:
                    continue
                delay = each.backoff.delay(now - each.started)
                say(f"{each.child.name} {exit_cause(code)} after {now - each.started:.1f} s up; "
                    f"restarting in {delay:g} s")
                if words := each.child.last_words():
                    say(f"last lines of its log:\n{words}")
                each.restart_at = now + delay
            elif now >= each.restart_at:
                each.child.restart()
                each.started, each.restart_at = time.monotonic(), None
                say(f"{each.child.name} restarted")
        time.sleep(POLL_S)


class SupervisedTriton:
    """The tritonserver of ``running_triton`` as a supervised child: same settings, so same ports and repository."""

    name = "tritonserver"

    def __init__(self, server: TritonServer) -> None:
        self.server = server

    def returncode(self) -> int | None:
        return self.server.returncode

    def restart(self) -> None:
        self.server.stop()  # its stubs and their shared memory, left behind by a killed server
        self.server.start()

    def last_words(self) -> str:
        lines = [line for line in self.server.log_text().splitlines() if line.strip()]
        return "\n".join(f"  {line}" for line in lines[-LOG_TAIL_LINES:]) + f"\n  (full log: {self.server.log_path})"


class GatewayProcess:
    """`sluice gateway` as a child process (its own session, so Ctrl-C reaches only `sluice up`, which stops it in
    order); its output goes to this process's stdout and stderr."""

    name = "gateway"

    def __init__(self, command: list[str], health_url: str, stop_grace: float = 30.0) -> None:
        self.command = command
        self.health_url = health_url
        self.stop_grace = stop_grace
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> None:
        self._process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, start_new_session=True)

    def returncode(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def restart(self) -> None:
        self.stop()
        self.start()

    def last_words(self) -> str:
        return ""  # its log is this process's own stderr, already shown

    def wait_until_healthy(self, timeout: float) -> None:
        """Return once /health answers; raise if the gateway exits first (its error is on stderr) or ``timeout``
        passes."""
        deadline = time.monotonic() + timeout
        while True:
            code = self.returncode()
            if code is not None:
                raise SluiceError(f"the gateway {exit_cause(code)} before it was ready")
            if _answers(self.health_url):
                return
            if time.monotonic() >= deadline:
                raise SluiceError(f"the gateway did not answer {self.health_url} within {timeout:g} s")
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM (uvicorn drains the requests in flight), SIGKILL after ``stop_grace`` seconds."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=self.stop_grace)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        self._process = None


@contextmanager
def running_gateway(command: list[str], health_url: str, ready_timeout: float = 60) -> Iterator[GatewayProcess]:
    gateway = GatewayProcess(command, health_url)
    gateway.start()
    try:
        gateway.wait_until_healthy(ready_timeout)
        yield gateway
    finally:
        gateway.stop()


_LOCAL_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _answers(url: str) -> bool:
    try:
        with _LOCAL_OPENER.open(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False
