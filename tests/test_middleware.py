"""The gateway's ASGI middleware: body limit and auth in-process, cancel-on-disconnect against a real uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.middleware import (
    WATCH_AFTER_S,
    WATCHER_TASK_NAME,
    BearerAuth,
    BodySizeLimit,
    CancelOnDisconnect,
    api_key_digest,
)

# --- helpers ---------------------------------------------------------------------------------------------------


def _request(app: ASGIApp, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def _counting_app(seen: list[int]) -> Starlette:
    """Reads the body chunk by chunk, recording how many bytes it saw, and echoes the count."""

    async def upload(request: Request) -> Response:
        async for chunk in request.stream():
            seen.append(len(chunk))
        return PlainTextResponse(str(sum(seen)))

    return Starlette(routes=[Route("/upload", upload, methods=["POST"])])




async def _chunks(count: int, size: int) -> AsyncIterator[bytes]:
    for _ in range(count):
        yield b"x" * size


class _Recorder:
    """What happened inside an endpoint running on the server thread."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.cancelled = threading.Event()
        self.cleaned_up = threading.Event()
        self.finished = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None

    def task_names(self) -> set[str]:
        async def names() -> set[str]:
            return {task.get_name() for task in asyncio.all_tasks()}

        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(names(), self.loop).result(timeout=2)


@pytest.fixture(params=["h11", "httptools"])
def http_impl(request: pytest.FixtureRequest) -> str:
    """uvicorn's HTTP/1.1 implementations notice disconnects in their own code: test both."""
    pytest.importorskip(request.param)
    return str(request.param)


@contextlib.contextmanager
def _serve(app: ASGIApp, http_impl: str) -> Iterator[int]:
    """A real uvicorn on a free loopback port, in a thread; yields the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app, http=http_impl, lifespan="off", log_level="warning", loop="asyncio", timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()


def _connect(port: int, request: bytes) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=2)
    conn.sendall(request)
    return conn


def _read_until(conn: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = conn.recv(4096)
        assert chunk, f"connection closed before {marker!r}"
        data += chunk
    return data


def _sleepy_app(recorder: _Recorder) -> Starlette:
    async def wait_long() -> None:
        recorder.loop = asyncio.get_running_loop()
        recorder.started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            recorder.cancelled.set()
            raise
        finally:
            recorder.cleaned_up.set()

    async def sleep(request: Request) -> Response:
        await wait_long()
        return PlainTextResponse("late")

    async def read_then_sleep(request: Request) -> Response:
        await request.body()
        await wait_long()
        return PlainTextResponse("late")

    async def quick(request: Request) -> Response:
        recorder.loop = asyncio.get_running_loop()
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            recorder.cancelled.set()
            raise
        recorder.finished.set()
        return PlainTextResponse("done")

    async def background_work() -> None:
        try:
            await asyncio.sleep(0.3)
        except asyncio.CancelledError:
            recorder.cancelled.set()
            raise
        recorder.finished.set()

    async def with_background(request: Request) -> Response:
        recorder.loop = asyncio.get_running_loop()
        return PlainTextResponse("ok", background=BackgroundTask(background_work))

    async def ticks() -> AsyncIterator[str]:
        try:
            for tick in range(1000):
                yield f"data: {tick}\n\n"
                recorder.started.set()
                await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            recorder.cancelled.set()
            raise
        finally:
            recorder.cleaned_up.set()

    async def stream(request: Request) -> Response:
        return StreamingResponse(ticks(), media_type="text/event-stream")

    return Starlette(
        routes=[
            Route("/sleep", sleep),
            Route("/read-then-sleep", read_then_sleep, methods=["POST"]),
            Route("/quick", quick),
            Route("/background", with_background),
            Route("/stream", stream),
        ]
    )


# --- BodySizeLimit ---------------------------------------------------------------------------------------------


def test_body_size_limit_rejects_with_413_envelope_when_content_length_exceeds_limit() -> None:
    seen: list[int] = []
    response = _request(BodySizeLimit(_counting_app(seen), max_bytes=100), "POST", "/upload", content=b"x" * 101)

    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert "100 bytes" in response.json()["error"]["message"]
    assert response.headers["connection"] == "close"
    assert seen == []


def test_body_size_limit_passes_body_when_within_limit() -> None:
    seen: list[int] = []
    response = _request(BodySizeLimit(_counting_app(seen), max_bytes=100), "POST", "/upload", content=b"x" * 100)

    assert response.status_code == 200
    assert response.text == "100"


def test_body_size_limit_cuts_off_with_413_when_chunked_body_grows_past_limit() -> None:
    seen: list[int] = []
    app = BodySizeLimit(_counting_app(seen), max_bytes=250)
    response = _request(app, "POST", "/upload", content=_chunks(10, 100))

    assert response.status_code == 413
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert sum(seen) <= 250


def test_body_size_limit_raises_value_error_when_max_bytes_not_positive() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        BodySizeLimit(_counting_app([]), max_bytes=0)


# --- BearerAuth ------------------------------------------------------------------------------------------------

_KEY = "sk-test-123"


def _auth_app() -> BearerAuth:
    async def whoami(request: Request) -> Response:
        return JSONResponse({"digest": request.state.api_key_digest})

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/v1/whoami", whoami), Route("/health", health)])
    return BearerAuth(app, frozenset({api_key_digest(_KEY), api_key_digest("other")}), frozenset({"/health"}))


def test_bearer_auth_rejects_with_401_when_key_missing() -> None:
    response = _request(_auth_app(), "GET", "/v1/whoami")

    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["type"] == "authentication_error"


def test_bearer_auth_rejects_with_401_without_echoing_key_when_key_wrong() -> None:
    response = _request(_auth_app(), "GET", "/v1/whoami", headers={"Authorization": "Bearer sk-wrong-secret"})

    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert "sk-wrong-secret" not in response.text


def test_bearer_auth_rejects_with_401_when_scheme_not_bearer() -> None:
    response = _request(_auth_app(), "GET", "/v1/whoami", headers={"Authorization": f"Basic {_KEY}"})

    assert response.status_code == 401


def test_bearer_auth_puts_digest_in_scope_state_when_key_right() -> None:
    response = _request(_auth_app(), "GET", "/v1/whoami", headers={"Authorization": f"Bearer {_KEY}"})

    assert response.status_code == 200
    assert response.json() == {"digest": api_key_digest(_KEY)}


def test_bearer_auth_passes_without_key_when_path_exempt() -> None:
    response = _request(_auth_app(), "GET", "/health")

    assert response.status_code == 200


def test_bearer_auth_passes_everything_when_no_digests_configured() -> None:
    async def hello(request: Request) -> Response:
        return PlainTextResponse("hi")

    app = BearerAuth(Starlette(routes=[Route("/", hello)]), frozenset(), frozenset())

    assert _request(app, "GET", "/").status_code == 200


def test_bearer_auth_raises_value_error_without_echo_when_digest_malformed() -> None:
    with pytest.raises(ValueError, match="sha256") as excinfo:
        BearerAuth(_counting_app([]), frozenset({"raw-secret-key"}), frozenset())

    assert "raw-secret-key" not in str(excinfo.value)


# --- all three -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scope_type", ["lifespan", "websocket"])
@pytest.mark.parametrize(
    "wrap",
    [
        lambda app: BodySizeLimit(app, max_bytes=1),
        lambda app: BearerAuth(app, frozenset({api_key_digest(_KEY)}), frozenset()),
        CancelOnDisconnect,
    ],
    ids=["body-limit", "auth", "cancel"],
)
def test_middleware_passes_scope_through_when_not_http(scope_type: str, wrap: Any) -> None:
    calls: list[tuple[Scope, Receive, Send]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        calls.append((scope, receive, send))

    async def receive() -> Message:
        return {"type": f"{scope_type}.connect"}

    async def send(message: Message) -> None:
        raise AssertionError("nothing should be sent")

    scope: Scope = {"type": scope_type, "path": "/v1/x", "headers": [(b"content-length", b"99")]}
    asyncio.run(wrap(app)(scope, receive, send))

    assert calls == [(scope, receive, send)]


# --- CancelOnDisconnect ----------------------------------------------------------------------------------------


def test_cancel_on_disconnect_cancels_endpoint_when_client_disconnects_mid_request(http_impl: str) -> None:
    recorder = _Recorder()
    with _serve(CancelOnDisconnect(_sleepy_app(recorder)), http_impl) as port:
        conn = _connect(port, b"GET /sleep HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert recorder.started.wait(2)
        conn.close()

        assert recorder.cancelled.wait(1)
        assert recorder.cleaned_up.wait(1)


def test_cancel_on_disconnect_cancels_endpoint_when_client_disconnects_after_sending_body(http_impl: str) -> None:
    recorder = _Recorder()
    with _serve(CancelOnDisconnect(_sleepy_app(recorder)), http_impl) as port:
        head = b"POST /read-then-sleep HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
        conn = _connect(port, head + b"5\r\nhello\r\n0\r\n\r\n")
        assert recorder.started.wait(2)
        conn.close()

        assert recorder.cancelled.wait(1)


def test_cancel_on_disconnect_closes_stream_when_client_disconnects_after_first_chunk(http_impl: str) -> None:
    recorder = _Recorder()
    with _serve(CancelOnDisconnect(_sleepy_app(recorder)), http_impl) as port:
        conn = _connect(port, b"GET /stream HTTP/1.1\r\nHost: gw\r\n\r\n")
        _read_until(conn, b"data: 0")
        conn.close()

        # On uvicorn (ASGI spec 2.3) StreamingResponse also listens for the disconnect itself, through our receive.

        assert recorder.cleaned_up.wait(1)
        assert recorder.cancelled.is_set()


def test_cancel_on_disconnect_cancels_raw_stream_when_app_never_listens_for_disconnect(http_impl: str) -> None:
    # uvicorn's send() returns silently once the client is gone, so this app alone would stream forever.
    recorder = _Recorder()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            while True:
                await send({"type": "http.response.body", "body": b"tick\n", "more_body": True})
                await asyncio.sleep(0.02)
        except asyncio.CancelledError:
            recorder.cancelled.set()
            raise

    with _serve(CancelOnDisconnect(app), http_impl) as port:
        conn = _connect(port, b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
        _read_until(conn, b"tick")
        conn.close()

        assert recorder.cancelled.wait(1)


def test_cancel_on_disconnect_leaves_no_watcher_when_request_completes_normally(http_impl: str) -> None:
    recorder = _Recorder()
    with _serve(CancelOnDisconnect(_sleepy_app(recorder)), http_impl) as port:
        response = httpx.get(f"http://127.0.0.1:{port}/quick", timeout=2)

        assert response.status_code == 200
        assert response.text == "done"
        assert recorder.finished.is_set()
        assert not recorder.cancelled.is_set()
        deadline = time.monotonic() + 1
        while WATCHER_TASK_NAME in recorder.task_names():
            assert time.monotonic() < deadline, "watcher task left running"
            time.sleep(0.01)


def test_cancel_on_disconnect_leaves_no_garbage_cycles_when_requests_complete_normally(http_impl: str) -> None:
    # A watcher cancelled after the response would keep its request's objects in a reference cycle (its
    # CancelledError's traceback holds its frame): about 20 objects a request, for the collector to find.
    async def echo(request: Request) -> Response:
        body = await request.body()
        await asyncio.sleep(WATCH_AFTER_S + 0.01)  # long enough for the watcher to start
        return PlainTextResponse(str(len(body)))

    request = b"POST /echo HTTP/1.1\r\nHost: gw\r\nContent-Length: 10\r\n\r\n0123456789"
    app = CancelOnDisconnect(Starlette(routes=[Route("/echo", echo, methods=["POST"])]))
    with _serve(app, http_impl) as port, _connect(port, request) as conn:  # a raw client: no garbage of its own
        _read_until(conn, b"\r\n\r\n10")
        gc.collect()
        gc.disable()
        try:
            for _ in range(20):
                conn.sendall(request)
                _read_until(conn, b"\r\n\r\n10")
            time.sleep(0.1)  # the last watcher ends on the server's next loop turn
            unreachable = gc.collect()
        finally:
            gc.enable()
    assert unreachable < 20


def test_cancel_on_disconnect_lets_background_task_finish_when_client_leaves_after_response(http_impl: str) -> None:
    recorder = _Recorder()
    with _serve(CancelOnDisconnect(_sleepy_app(recorder)), http_impl) as port:
        conn = _connect(port, b"GET /background HTTP/1.1\r\nHost: gw\r\n\r\n")
        _read_until(conn, b"\r\n\r\nok")
        conn.close()

        assert recorder.finished.wait(2)
        assert not recorder.cancelled.is_set()


def test_cancel_on_disconnect_propagates_app_error_and_leaves_no_watcher_when_app_raises() -> None:
    class Boom(Exception):
        pass

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise Boom

    async def go() -> set[str]:
        transport = httpx.ASGITransport(app=CancelOnDisconnect(app))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            with pytest.raises(Boom):
                await client.get("/")
        await asyncio.sleep(0)  # the watcher is cancelled, not awaited: it ends on the loop's next turn
        return {task.get_name() for task in asyncio.all_tasks()}

    assert WATCHER_TASK_NAME not in asyncio.run(go())


def test_cancel_on_disconnect_propagates_cancellation_when_cancelled_from_outside() -> None:
    cleaned_up: list[bool] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await asyncio.sleep(30)
        finally:
            cleaned_up.append(True)

    async def receive() -> Message:  # a client that stays connected
        if not cleaned_up:
            await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        raise AssertionError("nothing should be sent")

    async def go() -> set[str]:
        scope: Scope = {"type": "http", "http_version": "1.1", "method": "GET", "path": "/", "headers": []}
        task = asyncio.create_task(CancelOnDisconnect(app)(scope, receive, send))
        await asyncio.sleep(0.01)
        task.cancel()  # as uvicorn does when graceful shutdown times out
        with pytest.raises(asyncio.CancelledError):
            await task
        return {task.get_name() for task in asyncio.all_tasks()}

    assert WATCHER_TASK_NAME not in asyncio.run(go())
    assert cleaned_up == [True]


def test_cancel_on_disconnect_delivers_body_and_disconnect_when_app_reads_after_response() -> None:
    received: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        received.append(await receive())
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        received.append(await receive())

    response = _request(CancelOnDisconnect(app), "GET", "/")

    assert response.status_code == 204
    assert [message["type"] for message in received] == ["http.request", "http.disconnect"]
