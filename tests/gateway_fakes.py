"""The gateway app with a fake Triton in place of the real one: for tests of the app's own behaviour (errors,
deadlines, what it sends) that need no tritonserver."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt

from gateway.app import create_app
from gateway.batcher import Batcher
from gateway.settings import GatewaySettings, Route
from runtimes.signatures import SIGNATURES, output_names

# The numpy dtype of each contract data type, as Triton's Python backend and tritonclient map them.
DTYPES = {"STRING": np.object_, "FP32": np.float32, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_}


def route(service: str, route_type: str, **changes: Any) -> Route:
    """A route as sluice.json describes one, with generous limits unless ``changes`` say otherwise."""
    values: dict[str, Any] = {
        "service": service, "model": f"{service}_model", "type": route_type, "batch_size": 4, "batch_timeout": 0.0,
        "max_queue_size": 100, "instances": 1, "rate_limit": 1000.0, "total_timeout": 5.0, "inference_timeout": 4.0,
        "queue_timeout": 0.5, "enable_cache": False, "max_length": 128, "fingerprint": "fake",
    }
    return Route(**(values | changes))


def contract_outputs(service_type: str, rows: int, values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Exactly the outputs the contract lists for ``service_type``, ``rows`` rows of the contract's types and
    shapes (a variable dimension as 3): zeros, or ``values`` where given."""
    values = values or {}
    tensors: dict[str, Any] = {}
    for tensor in SIGNATURES[service_type][1]:
        shape = (rows, *(3 if dim == -1 else dim for dim in tensor.dims))
        dtype = DTYPES[tensor.data_type]
        if tensor.name in values:
            tensors[tensor.name] = np.asarray(values[tensor.name], dtype=dtype).reshape(shape)
        elif dtype is np.object_:
            tensors[tensor.name] = np.full(shape, b"", dtype=np.object_)
        else:
            tensors[tensor.name] = np.zeros(shape, dtype=dtype)
    return tensors


class FakeTriton:
    """What the gateway calls on Triton. ``stream`` answers ``pieces`` (one piece every ``piece_interval`` seconds),
    then a final response; ``infer`` answers the contract's outputs; ``ready`` reports ``not_ready``. Every call's
    inputs are recorded."""

    def __init__(self, pieces: Sequence[str] = ("Hello", " world"), piece_interval: float = 0.0,
                 not_ready: Sequence[str] = ()) -> None:
        self.pieces = list(pieces)
        self.piece_interval = piece_interval
        self.not_ready = list(not_ready)
        self.types: dict[str, str] = {}  # service -> its type, for infer's answer
        self.streamed: list[Mapping[str, npt.NDArray[Any]]] = []
        self.inferred: list[tuple[Mapping[str, npt.NDArray[Any]], tuple[str, ...]]] = []

    async def ready(self, services: Sequence[str]) -> list[str]:
        return [service for service in services if service in self.not_ready]

    async def infer(self, service: str, inputs: Mapping[str, npt.NDArray[Any]], outputs: Sequence[str],
                    timeout: float, start_by_us: int | None = None) -> dict[str, Any]:
        self.inferred.append((inputs, tuple(outputs)))
        rows = len(next(iter(inputs.values())))
        return contract_outputs(self.types[service], rows)

    async def stream(self, service: str, inputs: Mapping[str, npt.NDArray[Any]],
                     timeout: float, start_by_us: int | None = None) -> AsyncIterator[dict[str, Any]]:
        self.streamed.append(inputs)
        for count, text in enumerate(self.pieces, start=1):
            await asyncio.sleep(self.piece_interval)
            yield contract_outputs("llm", 1, {"text_output": [text.encode()], "prompt_tokens": [2],
                                              "completion_tokens": [count]})
        yield contract_outputs("llm", 1, {"finish_reason": [b"length"], "prompt_tokens": [2],
                                          "completion_tokens": [len(self.pieces)]})

    async def close(self) -> None:
        pass


@asynccontextmanager
async def serve(triton: FakeTriton, *routes: Route) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway app, its lifespan run, with ``triton`` in place of the real one; a client of it."""
    settings = GatewaySettings(
        routes={r.service: r for r in routes}, triton_grpc="127.0.0.1:1", host="127.0.0.1", port=8080,
        key_digests=frozenset(), key_rate_limit=None, redis_url=None, cache_max_items=1000, max_request_bytes=65536,
        max_items=64,
    )
    triton.types.update({r.service: r.type for r in routes})
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        gateway = app.state.gateway
        batcher = Batcher(triton, {r.service: r for r in routes if r.type != "llm"}, output_names)  # type: ignore[arg-type]
        app.state.gateway = dataclasses.replace(gateway, triton=triton, batcher=batcher)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client
