"""Plain ASGI middleware for the gateway: request ids and the access log, a request body limit, bearer-key auth, and
cancel-on-disconnect.

Each validates its options in ``__init__``, handles ``http`` scopes only and passes every other scope (lifespan,
websocket) straight through. None of them buffers a response, so streaming (``text/event-stream``) flows untouched.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import GatewayError, PayloadTooLarge, Unauthorized, envelope_bytes
from gateway.logs import (
    ACCESS_LOGGER,
    REQUEST_ID_HEADER,
    AccessLine,
    AccessRecord,
    current_record,
    request_id,
    unanswered_status,
)
from sluice.manifest import api_key_digest  # BearerAuth compares these digests

__all__ = [
    "WATCHER_TASK_NAME", "WATCH_AFTER_S", "AccessLog", "BearerAuth", "BodySizeLimit", "CancelOnDisconnect",
    "api_key_digest",
]

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
WATCHER_TASK_NAME = "sluice-disconnect-watcher"
# How long after its body a request goes unwatched (see CancelOnDisconnect).
WATCH_AFTER_S = 0.05


async def _send_error(send: Send, error: GatewayError) -> None:
    payload = envelope_bytes(error)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    headers += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return bytes(value)
    return None


class AccessLog:
    """Give each request an id and, once its response has ended (a stream's last byte included), write its access
    line (gateway/logs.py) to ``logger`` unless that is off for INFO.

    The id is the client's ``x-request-id`` when it is short and plain, else a new one; every response carries it
    back as ``x-request-id``, and the app finds it in ``scope["state"]["request_id"]``. Meant to be the outermost
    middleware: only Starlette's own 500 (its error middleware wraps every other) passes outside, and the app's
    handler adds the id to that one.
    """

    def __init__(self, app: ASGIApp, logger: logging.Logger = ACCESS_LOGGER) -> None:
        self.app = app
        self.logger = logger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        ident = request_id(scope)
        state = scope.setdefault("state", {})
        state["request_id"] = ident.decode()
        status: int | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (REQUEST_ID_HEADER, ident)]
            await send(message)

        if not self.logger.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send_with_id)
            return
        record = AccessRecord()
        token = current_record.set(record)
        error: BaseException | None = None
        try:
            await self.app(scope, receive, send_with_id)
        except BaseException as exc:
            error = exc
            raise
        finally:
            current_record.reset(token)
            client = scope.get("client")
            self.logger.info(AccessLine(
                method=scope["method"], path=scope["path"],
                status=status if status is not None else unanswered_status(error),
                seconds=time.monotonic() - started, service=state.get("service"), request_id=state["request_id"],
                client=client[0] if client else None, record=record,
            ))


class _BodyTooLarge(Exception):
    """Raised from ``receive`` once the body passes the limit; never a GatewayError, so no app handler renders it."""


class BodySizeLimit:
    """Reply 413 to requests whose body exceeds ``max_bytes``; the app never receives more than ``max_bytes``.

    A declared ``content-length`` over the limit is refused before the app runs; one within it passes untouched
    (the server frames the body by it, so no more can arrive). A body without one (chunked) is
    counted as the app reads it: the chunk that crosses the limit is not delivered, ``receive`` raises instead, and
    whatever response the app then tries to send (FastAPI turns the error into a 400, Starlette's error middleware
    into a 500) is replaced by the 413. If the app had already started its response, the error propagates and the
    server drops the connection.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}")
        self.app = app
        self.max_bytes = max_bytes

    def _error(self) -> PayloadTooLarge:
        # The unread rest of the body stays on the socket: close the connection rather than keep it alive.
        return PayloadTooLarge(
            f"Request body exceeds the limit of {self.max_bytes} bytes.", headers={"connection": "close"}
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit():
            if int(declared) > self.max_bytes:
                await _send_error(send, self._error())
                return
            if _header(scope, b"transfer-encoding") is None:
                # The server delivers exactly the declared length: nothing to count.
                await self.app(scope, receive, send)
                return

        received = 0
        overflowed = False
        app_started = False  # the app's response began before the overflow: it can no longer be replaced
        error_sent = False

        async def limited_receive() -> Message:
            nonlocal received, overflowed
            if overflowed:
                raise _BodyTooLarge
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    overflowed = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal app_started, error_sent
            if overflowed and not app_started:
                if not error_sent:
                    error_sent = True
                    await _send_error(send, self._error())
                return
            if message["type"] == "http.response.start":
                app_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            if app_started:
                raise
            if not error_sent:
                error_sent = True
                await _send_error(send, self._error())


class BearerAuth:
    """Require ``Authorization: Bearer <key>`` on every HTTP request outside ``exempt_paths``.

    The key is sha256-hashed and compared with every configured digest in constant time; the matching digest is put
    in ``scope["state"]["api_key_digest"]`` for per-key rate limits. Missing or wrong keys get a 401 envelope with
    ``WWW-Authenticate: Bearer``; the key itself is never logged or echoed. With no digests, everything passes.
    """

    def __init__(self, app: ASGIApp, key_digests: Iterable[str], exempt_paths: Iterable[str] = frozenset()) -> None:
        digests = sorted(frozenset(key_digests))
        for index, digest in enumerate(digests):
            # The value is not echoed: a raw key passed here by mistake must not reach the logs.
            if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest):
                raise ValueError(
                    f"key_digests[{index}] (sorted) is not a lowercase sha256 hex digest (64 characters of 0-9a-f)"
                )
        paths = frozenset(exempt_paths)
        for path in sorted(paths):
            if not isinstance(path, str) or not path.startswith("/"):
                raise ValueError(f"exempt_paths entries must be paths starting with '/', got {path!r}")
        self.app = app
        self._digests = tuple(digests)
        self.exempt_paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._digests or scope["path"] in self.exempt_paths:
            await self.app(scope, receive, send)
            return
        key = self._presented_key(scope)
        if key is None:
            await _send_error(
                send,
                Unauthorized(
                    "Missing API key: send it as 'Authorization: Bearer <key>'.",
                    headers={"www-authenticate": "Bearer"},
                ),
            )
            return
        presented = api_key_digest(key)
        matched: str | None = None
        for digest in self._digests:  # every digest, so the time taken does not tell which one matched
            if hmac.compare_digest(presented, digest):
                matched = digest
        if matched is None:
            await _send_error(send, Unauthorized("Invalid API key.", headers={"www-authenticate": "Bearer"}))
            return
        scope.setdefault("state", {})["api_key_digest"] = matched
        await self.app(scope, receive, send)

    @staticmethod
    def _presented_key(scope: Scope) -> bytes | None:
        value = _header(scope, b"authorization")
        if value is None:
            return None
        scheme, _, key = value.strip().partition(b" ")
        key = key.strip()
        if scheme.lower() != b"bearer" or not key:
            return None
        return key


def _declares_no_body(scope: Scope) -> bool:
    """True for HTTP/1.x requests that carry no body (no transfer-encoding, content-length absent or 0)."""
    if scope.get("http_version") not in ("1.0", "1.1") or _header(scope, b"transfer-encoding") is not None:
        return False
    declared = _header(scope, b"content-length")
    return declared is None or declared.strip() == b"0"


class _DisconnectWatch:
    """One request's disconnect watch; see ``CancelOnDisconnect``."""

    def __init__(self, receive: Receive, task: asyncio.Task[object]) -> None:
        self._receive = receive
        self._task = task
        self._watcher: asyncio.Task[None] | None = None
        self._watch_later: asyncio.TimerHandle | None = None  # the watcher's start, when deferred
        self._read_ahead: Message | None = None  # the bodiless request's one http.request, read by the watcher
        self._read_ahead_pending = False
        self._wake = asyncio.Event()  # read-ahead message stored, or the watcher ended
        self._gone = False  # http.disconnect seen (or the response completed): later receives say disconnect
        self._response_complete = False
        self._app_done = False
        self._cancel_requested = False
        self._uncancelled = False

    def start_watcher(self, *, read_ahead: bool) -> None:
        if self._watch_later is not None:
            self._watch_later.cancel()
            self._watch_later = None
        self._read_ahead_pending = read_ahead
        self._watcher = asyncio.create_task(self._watch(), name=WATCHER_TASK_NAME)
        self._watcher.add_done_callback(lambda _: self._wake.set())

    def start_watcher_later(self) -> None:
        self._watch_later = asyncio.get_running_loop().call_later(WATCH_AFTER_S, self._start_when_due)

    def _start_when_due(self) -> None:
        self._watch_later = None
        if self._watcher is None and not self._app_done:
            self.start_watcher(read_ahead=False)

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                break
            if message["type"] == "http.request" and self._read_ahead_pending:
                self._read_ahead_pending = False
                self._read_ahead = message
                self._wake.set()
        self._gone = True
        # Servers also answer http.disconnect once the response is complete (uvicorn does): only a disconnect
        # before that is the client going away.
        if not self._app_done and not self._response_complete:
            self._cancel_requested = True
            self._task.cancel()

    async def receive(self) -> Message:
        if self._watch_later is not None:
            # The app reads past its body (to listen for a disconnect itself): the watcher becomes the one
            # reader of the server's receive now.
            self.start_watcher(read_ahead=False)
        if self._watcher is None:  # the app is still reading the body: pass through, keeping its backpressure
            if self._gone:
                return {"type": "http.disconnect"}
            message = await self._receive()
            if message["type"] == "http.disconnect":
                # The app learns of this one from the message itself (Starlette raises ClientDisconnect).
                self._gone = True
            elif message["type"] == "http.request" and not message.get("more_body", False):
                self.start_watcher_later()
            return message
        while True:
            if self._read_ahead is not None:
                message, self._read_ahead = self._read_ahead, None
                return message
            if self._watcher.done():
                if not self._watcher.cancelled() and (error := self._watcher.exception()) is not None:
                    raise error
                return {"type": "http.disconnect"}
            await self._wake.wait()
            self._wake.clear()

    async def send(self, message: Message, send: Send) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self._response_complete = True
        await send(message)

    def finish(self) -> bool:
        """Mark the app done (before any further await); True when our cancellation is the only one on the task."""
        self._app_done = True
        if self._cancel_requested and not self._uncancelled:
            self._uncancelled = True
            self._task.uncancel()
        return self._cancel_requested and self._task.cancelling() == 0

    async def stop(self) -> None:
        if self._watch_later is not None:  # answered before its watcher was due: none was ever started
            self._watch_later.cancel()
            self._watch_later = None
        if self._watcher is None:
            return
        watcher = self._watcher
        if watcher.done():
            if not watcher.cancelled():
                watcher.result()  # re-raises a failure of the wrapped receive that the app never saw
            return
        if self._response_complete:
            # The server answers the watcher's pending receive with http.disconnect now that the response is
            # complete (uvicorn wakes it in the same turn), so it ends by itself. Cancelling it instead would
            # leave a reference cycle (its CancelledError's traceback holds its frame, which holds this watch and
            # the request's task) for the garbage collector: every request's objects, collected in pauses
            # of up to 100 ms. Should the server not wake it, it is cancelled on the loop's next turn.
            asyncio.get_running_loop().call_soon(_cancel_if_pending, watcher)
            return
        watcher.cancel()


def _cancel_if_pending(task: asyncio.Task[None]) -> None:
    if not task.done():
        task.cancel()


class CancelOnDisconnect:
    """Cancel the app's task when the client disconnects before the response is complete.

    Once the request body has been delivered to the app (at once for a request that declares none), a watcher
    task reads the server's ``receive``. After a body it starts ``WATCH_AFTER_S`` later, or as soon as the app
    reads again: most requests (every cache hit) are answered sooner and never need one, which saves about 45 us
    of a hit's ~300 us (docs/benchmarks.md). A disconnect is therefore noticed up to ``WATCH_AFTER_S`` late.
    On ``http.disconnect`` it marks the connection gone and cancels the app's task, so ``CancelledError`` runs
    through the app's ``finally`` blocks and cancels its in-flight gRPC calls; any later ``receive`` by the app
    returns ``http.disconnect``. While the app is still reading the body, disconnects reach it as the
    ``http.disconnect`` message only. Our own cancellation ends the request quietly; a cancellation from outside
    (server shutdown) still propagates.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("CancelOnDisconnect must run inside an asyncio task")
        watch = _DisconnectWatch(receive, task)
        if _declares_no_body(scope):
            watch.start_watcher(read_ahead=True)

        async def watched_send(message: Message) -> None:
            await watch.send(message, send)

        try:
            await self.app(scope, watch.receive, watched_send)
        except asyncio.CancelledError:
            if not watch.finish():
                raise
        finally:
            watch.finish()
            await watch.stop()
