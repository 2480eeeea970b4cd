"""/openapi.json, /docs, /info and `sluice --version`: the document is valid OpenAPI, lists every route the app
serves, and what each endpoint really answers (fake Triton, tests/gateway_fakes.py) validates against it.

The endpoints build their hot responses as dicts rather than through gateway/responses.py's models: on a
64-embedding response (384 dimensions) the dict and orjson took 0.50 ms, the validated model 1.15 ms with
``model_dump(mode="json")`` + orjson (and 80 % more bytes: float32 values written as float64), 1.6 ms with
``model_dump_json``; a stream chunk 0.4 us against 3.9 us, a 16-result rerank 2.7 us against 17 us. These tests are
what keeps the dicts and the document together.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import tomllib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from html.parser import HTMLParser
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi
from starlette.routing import Route as StarletteRoute
from typer.testing import CliRunner

import sluice
from gateway.app import create_app
from gateway.errors import ErrorEnvelope, GatewayError, HTTPRefusal
from gateway.openapi import openapi_document
from gateway.responses import Info
from gateway.settings import GatewaySettings
from sluice.cli import app as cli_app
from sluice.manifest import api_key_digest
from tests.gateway_fakes import FakeTriton, route, serve

EMB = route("emb", "embedding", fingerprint="sha256-of-emb")
RR = route("rr", "reranker")
LLM = route("llm", "llm")
ROOT = Path(__file__).resolve().parent.parent
# Served but deliberately not in the document: Swagger UI's own files, which /docs loads.
UNDOCUMENTED = {("/docs/static/{name}", "get")}


def settings_of(*routes: Any, **changes: Any) -> GatewaySettings:
    base = GatewaySettings(
        routes={r.service: r for r in routes}, triton_grpc="127.0.0.1:1", host="127.0.0.1", port=8080,
        key_digests=frozenset(), key_rate_limit=None, redis_url=None, cache_max_items=1000, max_request_bytes=65536,
        max_items=64,
    )
    return dataclasses.replace(base, **changes)


@asynccontextmanager
async def client_of(settings: GatewaySettings) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan run, for what needs no Triton (the document, /docs, /info)."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
            yield client


DOCUMENT = openapi_document()


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node and node["$ref"].startswith("#/components/responses/"):
        node = DOCUMENT["components"]["responses"][node["$ref"].rsplit("/", 1)[1]]
    return node


def documented(path: str, method: str, status: int) -> dict[str, Any]:
    """The document's response object for ``status`` of ``method path``; fails when it has none."""
    responses = DOCUMENT["paths"][path][method]["responses"]
    assert str(status) in responses, f"{method.upper()} {path} answered {status}, which the document does not list"
    return _resolve(responses[str(status)])


def check(response: httpx.Response, path: str, method: str = "post") -> None:
    """``response`` is one the document describes for ``method path``: its status, its headers and its body (each
    event's data, for a stream) against the schema of its content type."""
    described = documented(path, method, response.status_code)
    content_type = response.headers["content-type"].split(";")[0]
    assert content_type in described["content"], f"{path} answered {content_type}, not {list(described['content'])}"
    schema = described["content"][content_type]["schema"]
    validator = Draft202012Validator({**schema, "components": DOCUMENT["components"]})
    if content_type == "text/event-stream":
        events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        bodies = [json.loads(event) for event in events[:-1]]
    elif content_type == "application/json":
        bodies = [response.json()]
    else:
        bodies = [response.text]
    for body in bodies:
        errors = sorted(validator.iter_errors(body), key=str)
        assert not errors, f"{path} {response.status_code}: {errors[0].message} at {list(errors[0].absolute_path)}"
    for header in described.get("headers", {}):
        assert header in response.headers, f"{path} {response.status_code} without its documented {header}"


def test_openapi_json_serves_the_document_as_valid_openapi_3_1_with_the_package_version() -> None:
    async def scenario() -> httpx.Response:
        async with client_of(settings_of(EMB)) as client:
            return await client.get("/openapi.json")

    response = asyncio.run(scenario())
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    assert response.json() == DOCUMENT
    validate_openapi(DOCUMENT)
    assert DOCUMENT["openapi"].startswith("3.1")
    assert DOCUMENT["info"]["version"] == sluice.__version__ == metadata.version("sluice")


def test_openapi_document_describes_exactly_the_routes_the_app_serves() -> None:
    app = create_app(settings_of(EMB))
    served = {
        (re.sub(r":\w+}", "}", r.path), method.lower())
        for r in app.routes if isinstance(r, StarletteRoute)
        for method in (r.methods or ()) if method != "HEAD"
    }
    assert all(isinstance(r, StarletteRoute) for r in app.routes), "a Mount or a websocket route escapes this check"
    described = {
        (path, method) for path, item in DOCUMENT["paths"].items() for method in item if method != "parameters"
    }
    assert served - UNDOCUMENTED - described == set(), "served without a description in gateway/openapi.py"
    assert described - served == set(), "described in gateway/openapi.py but not served"


def test_openapi_schemas_are_the_request_models_own() -> None:
    schemas = DOCUMENT["components"]["schemas"]
    embedding = schemas["EmbeddingRequest"]
    assert embedding["additionalProperties"] is False and {"model", "input"} <= set(embedding["required"])
    assert schemas["ChatRequest"]["properties"]["messages"]["minItems"] == 1
    chat = DOCUMENT["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatRequest"}
    stream = chat["responses"]["200"]["content"]["text/event-stream"]["schema"]
    assert {"$ref": "#/components/schemas/ChatCompletionChunk"} in stream["oneOf"]


def test_every_gateway_error_validates_as_the_envelope_with_a_documented_status() -> None:
    def subclasses(cls: type[GatewayError]) -> list[type[GatewayError]]:
        return [cls, *(sub for child in cls.__subclasses__() for sub in subclasses(child))]

    documented_statuses = {int(name.removeprefix("Error")) for name in DOCUMENT["components"]["responses"]}
    for cls in subclasses(GatewayError):
        if cls is HTTPRefusal:  # Starlette's own refusals (405), whatever their status
            continue
        error = cls.__new__(cls)  # the base's constructor: some subclasses take other arguments
        GatewayError.__init__(error, "a message", param="input.0")
        ErrorEnvelope.model_validate(error.body())
        assert error.status in documented_statuses, cls


def test_responses_of_every_endpoint_validate_against_the_document() -> None:
    triton = FakeTriton()

    async def scenario() -> None:
        async with serve(triton, EMB, RR, LLM) as client:
            for encoding in ("float", "base64"):
                response = await client.post("/v1/embeddings", json={"model": "emb", "input": ["a", "b"],
                                                                     "encoding_format": encoding})
                assert response.status_code == 200, response.text
                check(response, "/v1/embeddings")
            for path in ("/v1/rerank", "/v2/rerank"):
                for return_documents in (False, True):
                    response = await client.post(path, json={
                        "model": "rr", "query": "q", "documents": ["a", {"text": "b"}], "top_n": 1,
                        "return_documents": return_documents})
                    assert response.status_code == 200, response.text
                    check(response, path)
            for stream in (False, True):
                body = {"model": "llm", "stream": stream, "stream_options": {"include_usage": True}} if stream else {
                    "model": "llm"}
                response = await client.post("/v1/completions", json=body | {"prompt": ["hi", "ho"][: 2 - stream]})
                assert response.status_code == 200, response.text
                check(response, "/v1/completions")
                response = await client.post("/v1/chat/completions",
                                             json=body | {"messages": [{"role": "user", "content": "hi"}]})
                assert response.status_code == 200, response.text
                check(response, "/v1/chat/completions")
            for path in ("/v1/models", "/health", "/ready", "/info", "/metrics"):
                response = await client.get(path)
                assert response.status_code == 200, response.text
                check(response, path, "get")
            for model, status in (("emb", 200), (EMB.model, 200), ("nope", 404)):
                response = await client.get(f"/v1/models/{model}")
                assert response.status_code == status, response.text
                check(response, "/v1/models/{id}", "get")

    asyncio.run(scenario())


def test_error_responses_validate_against_the_document_for_each_status() -> None:
    slow = FakeTriton(pieces=["word"] * 100, piece_interval=0.02)
    answered: set[int] = set()

    async def scenario() -> None:
        routes = (EMB, route("llm", "llm", total_timeout=0.2), route("tight", "embedding", rate_limit=1.0))
        async with serve(slow, *routes) as client:
            cases = [
                ("/v1/embeddings", {"content": b"{not json"}),
                ("/v1/embeddings", {"json": {"model": "nope", "input": "a"}}),
                ("/v1/embeddings", {"json": {"model": "emb", "input": ["a"] * 65}}),
                ("/v1/embeddings", {"content": b"[" + b'"a",' * 20000 + b'"a"]'}),
                ("/v1/rerank", {"json": {"model": "emb", "query": "q", "documents": []}}),
                ("/v1/embeddings", {"json": {"model": "tight", "input": "a"}}),
                ("/v1/embeddings", {"json": {"model": "tight", "input": "b"}}),
                ("/v1/completions", {"json": {"model": "llm", "prompt": "go on"}}),
            ]
            for path, request in cases:
                response = await client.post(path, **request)
                answered.add(response.status_code)
                check(response, path)
            mid_stream = await client.post("/v1/chat/completions", json={
                "model": "llm", "stream": True, "messages": [{"role": "user", "content": "go on"}]})
            assert mid_stream.status_code == 200 and '"deadline_exceeded"' in mid_stream.text
            check(mid_stream, "/v1/chat/completions")
        async with serve(FakeTriton(not_ready=["emb"]), EMB) as client:
            response = await client.get("/ready")
            answered.add(response.status_code)
            check(response, "/ready", "get")

    asyncio.run(scenario())
    assert answered == {200, 400, 404, 413, 422, 429, 503, 504}  # 200: the request before the 429


class _Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


def test_docs_page_loads_only_assets_the_gateway_serves_itself_without_an_api_key() -> None:
    key = "a-key-of-sixteen-chars-or-more"
    settings = settings_of(EMB, key_digests=frozenset({api_key_digest(key)}))

    async def scenario() -> tuple[httpx.Response, list[httpx.Response], httpx.Response, httpx.Response]:
        async with client_of(settings) as client:
            page = await client.get("/docs")
            parser = _Assets()
            parser.feed(page.text)
            assert len(parser.urls) == 3, parser.urls
            assets = [await client.get(url) for url in parser.urls]
            return page, assets, await client.get("/openapi.json"), await client.get("/docs/static/index.html")

    page, assets, document, unlisted = asyncio.run(scenario())
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'url: "/openapi.json"' in page.text and "validatorUrl: null" in page.text  # nothing sent elsewhere
    for asset in assets:
        url = asset.request.url
        assert url.host == "gateway" and url.path.startswith("/docs/static/"), url  # no CDN, no other host
        assert asset.status_code == 200, url
        expected = {".css": "text/css", ".js": "text/javascript", ".png": "image/png"}[Path(url.path).suffix]
        assert asset.headers["content-type"].split(";")[0] == expected, url
        assert len(asset.content) > 500, url
    assert "SwaggerUIBundle" in next(a.text for a in assets if a.request.url.path.endswith(".js"))
    assert document.status_code == 200  # Swagger UI fetches it without a key
    assert unlisted.status_code == 401  # only the files the page uses are open


def test_info_reports_version_limits_fingerprints_and_options() -> None:
    async def scenario() -> httpx.Response:
        async with client_of(settings_of(LLM, EMB, key_rate_limit=5.0)) as client:
            return await client.get("/info")

    response = asyncio.run(scenario())
    assert response.status_code == 200
    check(response, "/info", "get")
    info = response.json()
    assert info["version"] == sluice.__version__
    assert [s["service"] for s in info["services"]] == ["emb", "llm"]
    emb = info["services"][0]
    assert emb["type"] == "embedding" and emb["model"] == EMB.model and emb["fingerprint"] == "sha256-of-emb"
    assert emb["limits"] == {
        "batch_size": EMB.batch_size, "batch_timeout": EMB.batch_timeout, "max_queue_size": EMB.max_queue_size,
        "worker_count": EMB.instances, "rate_limit": EMB.rate_limit, "total_timeout": EMB.total_timeout,
        "queue_timeout": EMB.queue_timeout, "inference_timeout": EMB.inference_timeout,
        "enable_cache": EMB.enable_cache, "max_length": EMB.max_length,
    }
    assert info["gateway"] == {"max_items": 64, "max_request_bytes": 65536, "api_keys": False, "key_rate_limit": 5.0,
                               "redis": False, "cache_max_items": 1000}


def test_info_holds_no_secret_when_redis_has_a_password_and_keys_are_set() -> None:
    key = "a-key-of-sixteen-chars-or-more"
    settings = settings_of(EMB, redis_url="redis://:hunter2-redis-password@redis.internal:6379/0",
                           key_digests=frozenset({api_key_digest(key)}))
    text = Info.of(settings, "1.2.3").model_dump_json()
    info = json.loads(text)
    assert info["gateway"]["redis"] is True and info["gateway"]["api_keys"] is True
    for secret in ("hunter2", "redis.internal", key, api_key_digest(key)):
        assert secret not in text


def test_info_needs_the_api_key_when_the_gateway_has_keys() -> None:
    key = "a-key-of-sixteen-chars-or-more"

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async with client_of(settings_of(EMB, key_digests=frozenset({api_key_digest(key)}))) as client:
            return await client.get("/info"), await client.get("/info", headers={"authorization": f"Bearer {key}"})

    without, with_key = asyncio.run(scenario())
    assert without.status_code == 401
    check(without, "/info", "get")
    assert with_key.status_code == 200 and with_key.json()["gateway"]["api_keys"] is True


def test_sluice_version_prints_the_installed_package_version() -> None:
    result = CliRunner().invoke(cli_app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"sluice {metadata.version('sluice')}"


def test_version_falls_back_to_pyproject_when_the_package_is_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert sluice._version() == pyproject["project"]["version"]
