"""Operating the gateway: access lines, request ids, log settings, every response counted, no series that cannot move.

The app's own behaviour runs against a fake Triton (tests/gateway_fakes.py), in-process or under a real uvicorn
where the timing of a stream matters; the `sluice gateway` process itself where its log output is the subject.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from typer.testing import CliRunner

from gateway.app import create_app
from gateway.batcher import Batcher
from gateway.logs import AccessLine, AccessRecord, JsonFormatter, TextFormatter
from gateway.middleware import api_key_digest
from gateway.settings import GatewaySettings, Route
from runtimes.signatures import output_names
from sluice.cli import app as cli
from sluice.manifest import MANIFEST_NAME, MANIFEST_VERSION, GatewayOptions, Manifest, manifest_text
from sluice.triton_server import free_ports
from tests.gateway_fakes import FakeTriton, route
from tests.gateway_server import AppServer
from tests.helpers import sample_value

KEY = "operability-test-key-0123456789"
GENERATED_ID = re.compile(r"[0-9a-f]{32}")


# --- helpers ---------------------------------------------------------------------------------------------------


def fake_gateway_app(triton: FakeTriton, *routes: Route, **changes: Any) -> Starlette:
    """The gateway app whose lifespan puts ``triton`` in place of the real one; settings as tests/gateway_fakes.py
    has them, with ``changes``."""
    settings = dataclasses.replace(GatewaySettings(
        routes={r.service: r for r in routes}, triton_grpc="127.0.0.1:1", host="127.0.0.1", port=8080,
        key_digests=frozenset(), key_rate_limit=None, redis_url=None, cache_max_items=1000, max_request_bytes=65536,
        max_items=64,
    ), **changes)
    triton.types.update({r.service: r.type for r in routes})
    app = create_app(settings)
    real_lifespan = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with real_lifespan(app):
            batcher = Batcher(triton, {r.service: r for r in routes if r.type != "llm"}, output_names)  # type: ignore[arg-type]
            app.state.gateway = dataclasses.replace(app.state.gateway, triton=triton, batcher=batcher)
            try:
                yield
            finally:
                await batcher.close()

    app.router.lifespan_context = lifespan
    return app


@asynccontextmanager
async def client_of(app: Starlette, **transport: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, **transport),
                                     base_url="http://gateway") as client:
            yield client


def access_lines(caplog: pytest.LogCaptureFixture) -> list[AccessLine]:
    return [record.msg for record in caplog.records if record.name == "sluice.access"]


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def samples(metrics_text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(metrics_text)
            for s in family.samples]


# --- the access line -------------------------------------------------------------------------------------------


def test_access_log_writes_one_line_with_the_request_fields_when_an_embedding_request_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sluice.access")
    app = fake_gateway_app(FakeTriton(), route("emb", "embedding", enable_cache=True))

    async def scenario() -> list[httpx.Response]:
        async with client_of(app) as client:
            body = {"model": "emb", "input": ["hello"]}
            return [await client.post("/v1/embeddings", json=body) for _ in range(2)]

    miss, hit = asyncio.run(scenario())
    assert miss.status_code == hit.status_code == 200
    first, second = access_lines(caplog)
    assert first.fields() == {
        "method": "POST", "path": "/v1/embeddings", "status": 200, "duration_ms": first.fields()["duration_ms"],
        "service": "emb", "triton_ms": first.fields()["triton_ms"], "cache_hits": 0, "cache_misses": 1,
        "request_id": miss.headers["x-request-id"], "client": "127.0.0.1",
    }
    assert first.fields()["triton_ms"] > 0 and first.fields()["duration_ms"] >= first.fields()["triton_ms"]
    assert "triton_ms" not in second.fields()  # answered from the cache: no Triton call
    assert (second.fields()["cache_hits"], second.fields()["cache_misses"]) == (1, 0)
    text = str(first)
    assert "\n" not in text and text.startswith("method=POST path=/v1/embeddings status=200 duration_ms=")
    assert f"request_id={miss.headers['x-request-id']} client=127.0.0.1" in text


def test_access_log_writes_a_streams_line_once_its_last_byte_is_sent(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sluice.access")
    triton = FakeTriton(pieces=["a", "b", "c", "d"], piece_interval=0.05)
    with AppServer(fake_gateway_app(triton, route("llm", "llm"))) as server, httpx.Client() as client:
        body = {"model": "llm", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        with client.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=10) as response:
            assert response.status_code == 200
            assert access_lines(caplog) == []  # the status is out, the stream is not over
            streamed = response.read()
        wait_until(lambda: len(access_lines(caplog)) == 1, "the stream's access line")
    assert streamed.endswith(b"data: [DONE]\n\n")
    (line,) = access_lines(caplog)
    fields = line.fields()
    assert (fields["status"], fields["service"], fields["prompt_tokens"], fields["completion_tokens"]) == (
        200, "llm", 2, 4)
    assert fields["ttft_ms"] >= 40 and fields["duration_ms"] >= 190  # four pieces 50 ms apart
    assert fields["request_id"] == response.headers["x-request-id"]


def test_access_log_sums_tokens_and_keeps_the_first_ttft_when_a_completion_has_several_prompts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sluice.access")
    app = fake_gateway_app(FakeTriton(pieces=["a", "b"], piece_interval=0.05), route("llm", "llm"))

    async def scenario() -> httpx.Response:
        async with client_of(app) as client:
            return await client.post("/v1/completions", json={"model": "llm", "prompt": ["one", "two", "three"]})

    assert asyncio.run(scenario()).status_code == 200
    (line,) = access_lines(caplog)
    fields = line.fields()
    assert (fields["prompt_tokens"], fields["completion_tokens"]) == (6, 6)  # 2 and 2 a prompt, three prompts
    # The three generations ran side by side: their first tokens came at about 50 ms, the answer at about 100 ms.
    assert fields["ttft_ms"] < 0.75 * fields["duration_ms"]


def test_access_line_quotes_a_path_when_it_could_break_or_forge_a_line() -> None:
    line = AccessLine(method="GET", path='/a b\nstatus=200 "x"', status=404, seconds=0.001, service=None,
                      request_id="abc", client=None, record=AccessRecord())
    text = str(line)
    assert text == r'method=GET path="/a b\nstatus=200 \"x\"" status=404 duration_ms=1.00 request_id=abc'


def test_json_formatter_writes_a_record_with_its_traceback_as_one_json_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("sluice.gateway", logging.ERROR, __file__, 1, "failed on %s", ("/x",),
                                   sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert (entry["level"], entry["logger"], entry["message"]) == ("ERROR", "sluice.gateway", "failed on /x")
    assert "ValueError: boom" in entry["exception"] and entry["time"].endswith("Z")
    assert TextFormatter().format(record).split(" ", 1)[1].startswith("ERROR sluice.gateway failed on /x\n")


# --- request ids -----------------------------------------------------------------------------------------------


def test_request_id_is_generated_and_echoed_on_every_response_when_the_client_sends_none(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sluice.access")

    class BrokenTriton(FakeTriton):
        async def ready(self, services: Any) -> list[str]:
            raise RuntimeError("a bug")

    app = fake_gateway_app(BrokenTriton(), route("emb", "embedding"), key_digests=frozenset({api_key_digest(KEY)}),
                           max_request_bytes=1000)
    auth = {"authorization": f"Bearer {KEY}"}

    async def scenario() -> list[httpx.Response]:
        async with client_of(app, raise_app_exceptions=False) as client:
            return [
                await client.post("/v1/embeddings", json={"model": "emb", "input": ["a"]}, headers=auth),  # 200
                await client.get("/nope", headers=auth),  # 404
                await client.post("/v1/embeddings", content=b"{", headers=auth),  # 400
                await client.post("/v1/embeddings", json={"model": "emb"}, headers=auth),  # 422
                await client.post("/v1/embeddings", content=b"x" * 2000, headers=auth),  # 413
                await client.post("/v1/embeddings", json={"model": "emb", "input": ["a"]}),  # 401
                await client.get("/ready"),  # 500: the handler failed
            ]

    responses = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [200, 404, 400, 422, 413, 401, 500]
    ids = [r.headers.get("x-request-id", "") for r in responses]
    assert all(GENERATED_ID.fullmatch(ident) for ident in ids), ids
    assert len(set(ids)) == len(ids)
    assert [line.request_id for line in access_lines(caplog)] == ids
    assert [line.status for line in access_lines(caplog)] == [200, 404, 400, 422, 413, 401, 500]


def test_request_id_from_the_client_is_echoed_when_it_is_short_and_plain(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sluice.access")
    app = fake_gateway_app(FakeTriton(), route("emb", "embedding"))
    sent = [str(uuid.uuid4()), "trace:1-5f0c/ab+c=@_.x", "x" * 128]

    async def scenario() -> list[httpx.Response]:
        async with client_of(app) as client:
            return [await client.get("/health", headers={"x-request-id": ident}) for ident in sent]

    responses = asyncio.run(scenario())
    assert [r.headers["x-request-id"] for r in responses] == sent
    assert [line.request_id for line in access_lines(caplog)] == sent


@pytest.mark.parametrize("sent", [b"", b"x" * 129, b"two words", b"a\"b", b"caf\xc3\xa9", b"a;b", b"<script>"])
def test_request_id_from_the_client_is_replaced_when_it_is_not_short_and_plain(sent: bytes) -> None:
    app = fake_gateway_app(FakeTriton(), route("emb", "embedding"))

    async def scenario() -> httpx.Response:
        async with client_of(app) as client:
            return await client.get("/health", headers=[(b"x-request-id", sent)])

    response = asyncio.run(scenario())
    assert response.status_code == 200
    assert GENERATED_ID.fullmatch(response.headers["x-request-id"])


# --- every response counted, under bounded labels --------------------------------------------------------------


def test_request_metrics_count_early_refusals_under_bounded_labels_when_the_service_is_not_known(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sluice.access")
    app = fake_gateway_app(FakeTriton(), route("emb", "embedding", rate_limit=1.0),
                           key_digests=frozenset({api_key_digest(KEY)}), max_request_bytes=1000)
    auth = {"authorization": f"Bearer {KEY}"}
    unknown_path, unknown_model = f"/nope-{uuid.uuid4().hex}", f"model-{uuid.uuid4().hex}"

    async def scenario() -> tuple[list[int], str]:
        async with client_of(app) as client:
            statuses = [(await request).status_code for request in [
                client.get(unknown_path, headers=auth),
                client.post("/v1/embeddings", json={"model": unknown_model, "input": ["a"]}, headers=auth),
                client.post("/v1/embeddings", content=b"{not json", headers=auth),
                client.post("/v1/embeddings", json={"model": "emb"}, headers=auth),
                client.post("/v1/embeddings", content=b"x" * 2000, headers=auth),
                client.post("/v1/embeddings", json={"model": "emb", "input": ["a"]}),
                client.get("/v1/embeddings", headers=auth),
                client.get(f"/v1/models/{unknown_model}", headers=auth),
                client.post("/v1/embeddings", json={"model": "emb", "input": ["a"]}, headers=auth),
                client.post("/v1/embeddings", json={"model": "emb", "input": ["a"]}, headers=auth),
            ]]
            return statuses, (await client.get("/metrics")).text

    statuses, metrics = asyncio.run(scenario())
    assert statuses == [404, 404, 400, 422, 413, 401, 405, 404, 200, 429]

    def counted(service: str, endpoint: str, status: int) -> float:
        return sample_value(metrics, "sluice_gateway_requests_total", service=service, endpoint=endpoint,
                            status=str(status))

    assert counted("-", "-", 404) == 1  # a path the gateway does not serve
    assert counted("-", "/v1/embeddings", 404) == 1  # a model it does not serve
    assert counted("-", "/v1/embeddings", 400) == 1
    assert counted("-", "/v1/embeddings", 422) == 1
    assert counted("-", "/v1/embeddings", 413) == 1
    assert counted("-", "/v1/embeddings", 401) == 1
    assert counted("-", "/v1/embeddings", 405) == 1
    assert counted("-", "/v1/models/{id}", 404) == 1  # the route's template, not the path
    assert counted("emb", "/v1/embeddings", 200) == 1
    assert counted("emb", "/v1/embeddings", 429) == 1
    assert unknown_path.strip("/") not in metrics and unknown_model not in metrics
    requests = [s for s in samples(metrics) if s[0] == "sluice_gateway_requests_total"]
    assert sum(value for _, _, value in requests) == len(statuses)
    assert len(access_lines(caplog)) == len(statuses) + 1  # and one access line each, the scrape's included


def test_request_metrics_count_a_request_499_when_its_client_leaves_before_any_response(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sluice.access")
    slow = FakeTriton(pieces=["late"], piece_interval=5.0)  # the status waits for the first piece
    with AppServer(fake_gateway_app(slow, route("llm", "llm"))) as server:
        body = json.dumps({"model": "llm", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
        port = int(server.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         f"content-length: {len(body)}\r\n\r\n{body}".encode())
            time.sleep(0.3)
        wait_until(lambda: len(access_lines(caplog)) == 1, "the access line of the request that was left")
        metrics = httpx.get(f"{server.url}/metrics").text
    line = access_lines(caplog)[0]  # then the scrape's
    assert (line.status, line.service) == (499, "llm") and line.seconds < 2
    assert sample_value(metrics, "sluice_gateway_requests_total", service="llm", status="499") == 1
    assert sample_value(metrics, "sluice_gateway_requests_total", service="llm", status="500") == 0
    assert sample_value(metrics, "sluice_gateway_in_flight", service="llm") == 0


# --- only series that can move ---------------------------------------------------------------------------------


def test_service_metrics_export_only_the_series_a_service_can_move_when_the_gateway_starts() -> None:
    app = fake_gateway_app(FakeTriton(), route("emb", "embedding", enable_cache=True), route("rr", "reranker"),
                           route("llm", "llm"))

    async def scenario() -> tuple[str, str]:
        async with client_of(app) as client:
            before = (await client.get("/metrics")).text
            await client.post("/v1/completions", json={"model": "llm", "prompt": "hi"})
            return before, (await client.get("/metrics")).text

    before, after = asyncio.run(scenario())

    def services_of(name: str) -> set[str]:
        return {labels["service"] for sample, labels, _ in samples(before) if sample == name}

    assert services_of("sluice_gateway_llm_time_to_first_token_seconds_count") == {"llm"}
    assert services_of("sluice_gateway_llm_prompt_tokens_total") == {"llm"}
    assert services_of("sluice_gateway_llm_completion_tokens_total") == {"llm"}
    assert services_of("sluice_gateway_triton_seconds_count") == {"emb", "rr"}
    assert services_of("sluice_gateway_triton_call_requests_count") == {"emb", "rr"}
    assert services_of("sluice_gateway_queue_depth") == {"emb", "rr"}
    assert services_of("sluice_gateway_cache_hits_total") == {"emb"}  # rr has enable_cache off
    assert services_of("sluice_gateway_in_flight") == {"emb", "rr", "llm"}
    assert {labels["scope"] for sample, labels, _ in samples(before)
            if sample == "sluice_gateway_rate_limited_total"} == {"service"}  # no per-key limit configured
    assert sample_value(after, "sluice_gateway_llm_time_to_first_token_seconds_count", service="llm") == 1


# --- the `sluice gateway` process ------------------------------------------------------------------------------


@contextlib.contextmanager
def gateway_process(
    directory: Path, *args: str, env: dict[str, str] | None = None,
) -> Iterator[tuple[str, io.StringIO]]:
    """`sluice gateway` on a repository holding only sluice.json (one embedding service; no Triton behind it), until
    the block ends; then SIGINT. Yields its URL and, once it has stopped, its stderr."""
    (port,) = free_ports(1)
    manifest = Manifest(
        version=MANIFEST_VERSION, triton_grpc="127.0.0.1:1",
        gateway=GatewayOptions(host="127.0.0.1", port=port, api_key_sha256=(), key_rate_limit=None, redis_url=None,
                               redis_failure="open",
                               cache_max_items=100, max_request_bytes=65536, max_items=64),
        services={"embedding_service": route("embedding_service", "embedding")},
    )
    (directory / MANIFEST_NAME).write_text(manifest_text(manifest), encoding="utf-8")
    base = {key: value for key, value in os.environ.items() if not key.startswith("SLUICE_")}
    stderr_path = directory / "stderr.log"
    stderr = io.StringIO()
    with stderr_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "sluice", "gateway", "--repository", str(directory), *args],
            env={**base, "COLUMNS": "200", **(env or {})}, stdout=subprocess.DEVNULL, stderr=log,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"sluice gateway did not start:\n{stderr_path.read_text(errors='replace')}")
                with contextlib.suppress(httpx.TransportError):
                    httpx.get(f"{url}/health", timeout=1)
                    break
                time.sleep(0.1)
            yield url, stderr
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=20)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            stderr.write(stderr_path.read_text(encoding="utf-8", errors="replace"))


def some_requests(url: str) -> list[httpx.Response]:
    return [
        httpx.get(f"{url}/health", headers={"x-request-id": "probe-1"}),
        httpx.post(f"{url}/v1/embeddings", json={"model": "nope", "input": ["a"]}),
        httpx.get(f"{url}/nope"),
    ]


@pytest.mark.integration
def test_gateway_process_writes_one_text_access_line_per_request_when_run_with_defaults(tmp_path: Path) -> None:
    with gateway_process(tmp_path) as (url, stderr):
        responses = some_requests(url)
    lines = [line for line in stderr.getvalue().splitlines() if " sluice.access " in line]
    # The /health request of the start-up wait comes first.
    assert [re.search(r" status=(\d+) ", line).group(1) for line in lines[1:]] == ["200", "404", "404"]  # type: ignore[union-attr]
    assert "path=/health status=200" in lines[1] and "request_id=probe-1 client=127.0.0.1" in lines[1]
    assert f"request_id={responses[1].headers['x-request-id']}" in lines[2]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO sluice\.access method=GET path=/health .*",
                        lines[1])
    assert "Uvicorn running" not in stderr.getvalue()  # uvicorn's start-up chatter is DEBUG's business


@pytest.mark.integration
def test_gateway_process_writes_json_lines_only_when_the_log_format_is_json(tmp_path: Path) -> None:
    with gateway_process(tmp_path, env={"SLUICE_LOG_FORMAT": "json"}) as (url, stderr):
        responses = some_requests(url)
    entries = [json.loads(line) for line in stderr.getvalue().splitlines()]  # every line, the CLI's own included
    access = [entry for entry in entries if entry["logger"] == "sluice.access"][1:]
    assert [(entry["path"], entry["status"]) for entry in access] == [
        ("/health", 200), ("/v1/embeddings", 404), ("/nope", 404)]
    assert [entry["request_id"] for entry in access] == [r.headers["x-request-id"] for r in responses]
    assert any(entry["logger"] == "sluice.cli" and "gateway http://" in entry["message"] for entry in entries)


@pytest.mark.integration
@pytest.mark.parametrize(("args", "env"), [
    (["--log-level", "warning"], {}),
    ([], {"SLUICE_LOG_LEVEL": "WARNING"}),
    (["--no-access-log"], {}),
    ([], {"SLUICE_ACCESS_LOG": "0"}),
])
def test_gateway_process_writes_no_access_lines_when_they_are_turned_off(
    tmp_path: Path, args: list[str], env: dict[str, str],
) -> None:
    with gateway_process(tmp_path, *args, env=env) as (url, stderr):
        assert [r.status_code for r in some_requests(url)] == [200, 404, 404]
    assert "sluice.access" not in stderr.getvalue()


@pytest.mark.integration
def test_gateway_process_shows_uvicorns_own_lines_when_the_log_level_is_debug(tmp_path: Path) -> None:
    with gateway_process(tmp_path, "--log-level", "debug") as (url, stderr):
        some_requests(url)
    assert "INFO uvicorn.error Application startup complete." in stderr.getvalue()


@pytest.mark.parametrize(("args", "env", "named"), [
    (["--log-level", "loud"], {}, "--log-level"),
    ([], {"SLUICE_LOG_LEVEL": "loud"}, "SLUICE_LOG_LEVEL"),
    (["--log-format", "xml"], {}, "--log-format"),
])
def test_gateway_command_refuses_a_log_setting_when_it_is_not_one_of_the_choices(
    args: list[str], env: dict[str, str], named: str,
) -> None:
    result = CliRunner().invoke(cli, ["gateway", "--repository", "/nonexistent", *args], env={"COLUMNS": "200", **env})
    assert result.exit_code == 2
    assert named in result.output and "is not one of" in result.output
