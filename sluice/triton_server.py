"""Start, watch and stop the embedded ``tritonserver`` that ships inside the ``nvidia-pytriton`` wheel.

No Docker and no pytriton Python API: the wheel's binary is run directly on a compiled model repository.
What it takes to do that (see shared/ENVIRONMENT.md, re-checked against tritonserver 2.51.0 / 24.10):

- a backend directory of our own holding ``backends/python/*`` plus the Python-backend stub built for the
  running interpreter (the wheel keeps one stub per Python version under ``python_backend_stubs/``);
- ``LD_LIBRARY_PATH`` with the wheel's ``nvidia_pytriton.libs`` (the copied stub's ``$ORIGIN`` RPATH no
  longer reaches them) and the interpreter's ``LIBDIR`` (``libpython3.X.so``);
- this interpreter's ``bin`` first on ``PATH``: the embedded interpreter in the stub finds its prefix from
  the ``python3`` it sees there, so a venv's ``bin`` makes the stub import the venv's packages.

Readiness and failures: the server runs with ``--model-control-mode=none --exit-on-error=false``. In that
mode Triton loads every model before it opens its HTTP port, and with ``exit-on-error=false`` it stays up
when a model fails, so the repository index (``POST /v2/repository/index``) can tell us, per model, Triton's
own reason for the failure. With the default ``exit-on-error=true`` the process exits with only
"failed to load all models" and the reason is left in the log alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from compiler.schema import Server
from sluice.errors import SluiceError
from sluice.manifest import client_host

STUB_NAME = "triton_python_backend_stub"
LOG_NAME = "tritonserver.log"

# Log lines Triton prints at error level on every CPU-only start; quoting them in an error would mislead.
_HARMLESS_ERRORS = ("CudaDriverHelper has not been initialized",)
# Talks to our own loopback server only: an HTTP(S)_PROXY in the environment must not reroute it.
_LOCAL_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# glog line: severity letter, date, time, thread id, file:line] "message" (the message is JSON-quoted).
_GLOG_LINE = re.compile(r"^(?P<level>[IWEF])\d{4} \S+ +\d+ (?P<where>\S+)\] (?P<message>.*)$")


@dataclass(frozen=True)
class TritonSettings:
    """How to run one tritonserver on one model repository.

    ``workdir`` holds what Sluice prepares for the server (the backend directory, the log), e.g.
    ``.sluice/triton/``. Addresses bind loopback unless told otherwise (``Server``'s default): Triton itself
    defaults to 0.0.0.0, and the gateway, not Triton, is the public front door. A response cache of 0 bytes
    leaves ``--cache-config`` out, so no model can enable the cache.
    """

    model_repository: Path
    workdir: Path
    # Addresses, ports, response cache size and log level: the config's own `server:` section.
    server: Server = field(default_factory=Server)
    # How long Triton, once told to stop, waits for in-flight requests and for open HTTP connections. One idle
    # keep-alive connection (a pooled client) holds shutdown for this long: measured 30.6 s at Triton's default.
    exit_timeout_secs: int = 5

    @property
    def log_path(self) -> Path:
        """The file that receives tritonserver's stdout and stderr."""
        return self.workdir / LOG_NAME


@dataclass(frozen=True)
class TritonInstall:
    """Where the pieces of the tritonserver shipped in ``nvidia-pytriton`` lie."""

    binary: Path
    python_backend_dir: Path
    stub: Path
    libs_dir: Path
    caches_dir: Path


def find_tritonserver() -> TritonInstall:
    """Locate the tritonserver of the installed ``nvidia-pytriton`` wheel and the stub for this Python.

    Raises :class:`SluiceError` naming what is missing.
    """
    # find_spec locates the package without importing it (pytriton's import pulls in a lot).
    spec = find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise SluiceError("tritonserver not found: the nvidia-pytriton package is not installed")
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    root = package_dir / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    install = TritonInstall(
        binary=root / "bin" / "tritonserver",
        python_backend_dir=root / "backends" / "python",
        stub=root / "python_backend_stubs" / version / STUB_NAME,
        libs_dir=package_dir.parent / "nvidia_pytriton.libs",
        caches_dir=root / "caches",
    )
    if not install.stub.is_file():
        stubs = root / "python_backend_stubs"
        available = sorted(p.name for p in stubs.iterdir()) if stubs.is_dir() else []
        raise SluiceError(f"no Python-backend stub for Python {version} in {stubs} (available: {', '.join(available)})")
    for path in (install.binary, install.python_backend_dir, install.libs_dir):
        if not path.exists():
            raise SluiceError(f"incomplete nvidia-pytriton install: {path} is missing")
    return install


def prepare_backend_dir(install: TritonInstall, workdir: Path) -> Path:
    """Lay out ``<workdir>/backends/python/`` (Python backend + matching stub); return ``<workdir>/backends``.

    Idempotent and cheap when already done: a file is copied only when its size or mtime differs. Each copy
    goes to a temporary name and is renamed into place, so a server already running from this directory
    never sees a half-written stub.
    """
    backends = workdir / "backends"
    target = backends / "python"
    target.mkdir(parents=True, exist_ok=True)
    sources = [p for p in sorted(install.python_backend_dir.iterdir()) if p.is_file()]
    sources.append(install.stub)
    for source in sources:
        _copy_if_changed(source, target / source.name)
    return backends


def _copy_if_changed(source: Path, destination: Path) -> None:
    src = source.stat()
    try:
        dst = destination.stat()
    except FileNotFoundError:
        pass
    else:
        if dst.st_size == src.st_size and dst.st_mtime_ns == src.st_mtime_ns:
            return
    partial = destination.with_name(f".{destination.name}.{os.getpid()}.partial")
    shutil.copy2(source, partial)  # copy2 keeps mode (the stub's exec bit) and mtime (the next comparison)
    os.replace(partial, destination)


def triton_env(install: TritonInstall) -> dict[str, str]:
    """The environment for tritonserver: this process's, plus the library path and ``PATH`` the stub needs."""
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR")
    env["LD_LIBRARY_PATH"] = _prepend_paths(
        env.get("LD_LIBRARY_PATH", ""), [str(install.libs_dir), *([str(libdir)] if libdir else [])]
    )
    # sys.executable's own directory, not its resolved target: in a venv the symlink leads out of the venv.
    env["PATH"] = _prepend_paths(env.get("PATH", ""), [str(Path(sys.executable).parent)])
    return env


def _prepend_paths(current: str, first: list[str]) -> str:
    rest = [p for p in current.split(os.pathsep) if p and p not in first]
    return os.pathsep.join([*first, *rest])


def triton_command(settings: TritonSettings, install: TritonInstall, backend_dir: Path) -> list[str]:
    """The tritonserver command line; ``backend_dir`` is what :func:`prepare_backend_dir` returned."""
    server = settings.server
    command = [
        str(install.binary),
        f"--model-repository={settings.model_repository.resolve()}",
        f"--backend-directory={backend_dir.resolve()}",
        # Load everything at start-up and keep running when a model fails, so its reason can be read from
        # the repository index (see the module docstring).
        "--model-control-mode=none",
        "--exit-on-error=false",
        "--strict-readiness=true",
        f"--http-address={server.host}",
        f"--http-port={server.http_port}",
        f"--grpc-address={server.host}",
        f"--grpc-port={server.grpc_port}",
        f"--metrics-address={server.host}",
        f"--metrics-port={server.metrics_port}",
        f"--log-verbose={server.log_verbose}",
        f"--exit-timeout-secs={settings.exit_timeout_secs}",
    ]
    if server.response_cache_bytes > 0:
        command += [
            f"--cache-directory={install.caches_dir}",
            f"--cache-config=local,size={server.response_cache_bytes}",
        ]
    return command


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports free on ``host`` now (each socket stays bound until all are picked)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class TritonServer:
    """One tritonserver process on ``settings.model_repository``.

    Use as a context manager (start, wait until ready, stop on exit) or call :meth:`start`,
    :meth:`wait_until_ready` and :meth:`stop` yourself. The server runs in its own session and process
    group, with the Python-backend stubs it spawns, so that :meth:`stop` can end all of them and a Ctrl-C
    in the terminal reaches only the caller, which then stops Triton in order.
    """

    def __init__(
        self, settings: TritonSettings, install: TritonInstall | None = None, startup_timeout: float = 120.0
    ) -> None:
        self.settings = settings
        self.startup_timeout = startup_timeout
        self._install = install
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The tritonserver process id (also its process group id), or None before :meth:`start`."""
        return self._process.pid if self._process else None

    def is_running(self) -> bool:
        """Whether the tritonserver process has been started and has not exited."""
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit status of a server that has exited (negative: killed by that signal); None while it runs or
        before :meth:`start`."""
        return None if self._process is None else self._process.poll()

    @property
    def log_path(self) -> Path:
        """tritonserver's log file."""
        return self.settings.log_path

    @property
    def http_address(self) -> str:
        """``host:port`` of the HTTP endpoint, the form ``tritonclient.http`` wants (no scheme)."""
        return f"{client_host(self.settings.server.host)}:{self.settings.server.http_port}"

    @property
    def http_url(self) -> str:
        """Base URL of the HTTP/REST endpoint, e.g. ``http://127.0.0.1:8000``."""
        return f"http://{self.http_address}"

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC endpoint; gRPC targets carry no scheme."""
        return f"{client_host(self.settings.server.host)}:{self.settings.server.grpc_port}"

    @property
    def metrics_url(self) -> str:
        """The Prometheus metrics URL, e.g. ``http://127.0.0.1:8002/metrics``."""
        server = self.settings.server
        return f"http://{client_host(server.host)}:{server.metrics_port}/metrics"

    def __enter__(self) -> Self:
        self.start()
        try:
            self.wait_until_ready(self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Spawn tritonserver in its own process group, its output going to :attr:`log_path`."""
        if self._process is not None and self._process.poll() is None:
            raise SluiceError(f"tritonserver already running (pid {self._process.pid})")
        if not self.settings.model_repository.is_dir():
            raise SluiceError(f"model repository {self.settings.model_repository} is not a directory")
        install = self._install or find_tritonserver()
        self._install = install
        backend_dir = prepare_backend_dir(install, self.settings.workdir)
        # The previous run's log is kept beside (after a crash it holds the cause) and this run's starts empty.
        if self.settings.log_path.exists():
            os.replace(self.settings.log_path, self.settings.log_path.with_name(LOG_NAME + ".1"))
        self._log = self.settings.log_path.open("wb")
        try:
            self._process = self._spawn(install, backend_dir, self._log)
        except OSError as error:
            self._log.close()
            self._log = None
            raise SluiceError(f"could not start {install.binary}: {error}") from error

    def _spawn(self, install: TritonInstall, backend_dir: Path, log: IO[bytes]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            triton_command(self.settings, install, backend_dir),
            env=triton_env(install),
            # The stubs put their working directory first on sys.path: run in the workdir so a stray module
            # in the caller's directory cannot shadow a package the models import.
            cwd=self.settings.workdir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_until_ready(self, timeout: float) -> None:
        """Return once the server and every model in the repository are ready.

        Raises :class:`SluiceError` quoting Triton's reason when a model fails to load (from the repository
        index, else from the log) or when the process exits, and naming the log when ``timeout`` passes.
        """
        process = self._require_started()
        deadline = time.monotonic() + timeout
        while True:
            code = process.poll()
            if code is not None:
                raise SluiceError(
                    f"tritonserver exited with code {code} before it was ready:\n"
                    f"{_indent(self._log_errors() or '(no error in the log)')}\n(full log: {self.log_path})"
                )
            # In model-control-mode none the HTTP port opens only after every load has finished, so once
            # the server is live a model that is not ready will not become ready.
            if self._get_ok("/v2/health/live"):
                failures = self._model_failures()
                if failures:
                    raise SluiceError(_describe_failures(failures, self.log_path))
                if self._get_ok("/v2/health/ready"):
                    return
            if time.monotonic() >= deadline:
                raise SluiceError(f"tritonserver not ready after {timeout:g} s (full log: {self.log_path})")
            time.sleep(0.2)

    def stop(self, grace: float = 10.0) -> None:
        """Stop tritonserver and its Python-backend stubs; nothing of the process group is left afterwards.

        SIGTERM goes to the server alone so it can unload the models in order (each stub runs ``finalize``
        and exits); after that, or after ``grace`` seconds, whatever is left of the group gets SIGKILL: a stub
        whose server is gone serves nothing, and would only notice on its next check of its parent.
        Shared-memory regions that killed stubs leave in ``/dev/shm`` are removed.
        """
        process = self._process
        if process is None:
            return
        pgid = process.pid  # start_new_session made the server the leader of its own group
        regions = _shm_regions(pgid)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        if _group_members(pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait()
        killed_deadline = time.monotonic() + 5.0
        while _group_members(pgid) and time.monotonic() < killed_deadline:
            time.sleep(0.05)
        for region in regions:
            Path("/dev/shm", region).unlink(missing_ok=True)  # noqa: S108 (the stubs' own region names)
        if self._log is not None:
            self._log.close()
            self._log = None
        self._process = None
        survivors = _group_members(pgid)
        if survivors:
            raise SluiceError(f"tritonserver processes survived SIGKILL: {survivors}")

    def log_text(self) -> str:
        """Everything tritonserver has written so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _require_started(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise SluiceError("tritonserver was not started")
        return self._process

    def _get_ok(self, path: str) -> bool:
        try:
            with _LOCAL_OPENER.open(self.http_url + path, timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            # URLError covers connection refused and HTTP 400 "not ready" alike: both mean "not yet".
            return False

    def _model_failures(self) -> list[tuple[str, str]]:
        """(model, reason) for each model in the repository index that is not READY and not still loading."""
        url = self.http_url + "/v2/repository/index"
        request = urllib.request.Request(url, data=b"{}", method="POST")  # noqa: S310 (http only)
        try:
            with _LOCAL_OPENER.open(request, timeout=5) as response:
                index: list[dict[str, Any]] = json.load(response)
        except (urllib.error.URLError, OSError, ValueError):
            return []
        failures = []
        for entry in index:
            state = entry.get("state")
            if state in ("READY", "LOADING", "UNLOADING"):
                continue
            name = str(entry.get("name"))
            # A model whose config.pbtxt could not even be parsed is listed with no state and no reason;
            # Triton logged the reason ("Poll failed for model directory ...") instead.
            reason = entry.get("reason") or self._log_errors(mentioning=f"'{name}'") or f"state {state}"
            failures.append((name, str(reason).rstrip()))
        return failures

    def _log_errors(self, mentioning: str | None = None) -> str:
        """The error-level messages of the log (unquoted), optionally only those mentioning a string."""
        messages = []
        for line in self.log_text().splitlines():
            if line.startswith("error:"):  # the final "error: creating server: ..." line
                messages.append(line)
                continue
            match = _GLOG_LINE.match(line)
            if match is None or match["level"] not in "EF":
                continue
            message = _unquote(match["message"])
            if any(harmless in message for harmless in _HARMLESS_ERRORS):
                continue
            messages.append(message)
        if mentioning is not None:
            messages = [m for m in messages if mentioning in m]
        return "\n".join(messages)


def _describe_failures(failures: list[tuple[str, str]], log_path: Path) -> str:
    details = "\n".join(f"  - {name}: {_indent(reason, 4).lstrip()}" for name, reason in failures)
    return f"Triton could not load {len(failures)} model(s):\n{details}\n(full log: {log_path})"


def _unquote(message: str) -> str:
    # Triton writes each message as a JSON string literal (escaped newlines inside a traceback).
    try:
        value = json.loads(message)
    except ValueError:
        return message
    return value if isinstance(value, str) else message


def _indent(text: str, spaces: int = 2) -> str:
    return "\n".join(" " * spaces + line for line in text.splitlines())


def _proc_stat(pid: str) -> tuple[str, int] | None:
    """(state, process group) of a /proc entry, or None if it vanished."""
    try:
        stat = Path("/proc", pid, "stat").read_text()
    except OSError:
        return None
    # The command name in parentheses may hold spaces; the fields after its closing parenthesis do not.
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0], int(fields[2])


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``, read from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(entry)
            if stat is not None and stat[1] == pgid and stat[0] != "Z":
                members.append(int(entry))
    return members


def _shm_regions(pgid: int) -> list[str]:
    """Names of the /dev/shm regions the group's stubs use (the stub's command line names its region)."""
    regions = []
    for pid in _group_members(pgid):
        try:
            argv = Path("/proc", str(pid), "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(STUB_NAME.encode()) and len(argv) > 2:
            regions.append(argv[2].decode(errors="replace"))
    return [r for r in regions if r and "/" not in r]
