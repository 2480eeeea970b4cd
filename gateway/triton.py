"""The gateway's one connection to Triton: gRPC (asyncio), one channel reused by every request.

Each call carries a timeout (the service's inference_timeout, or less when the request's total deadline is nearer);
on expiry, or when the caller's task is cancelled, the gRPC call is cancelled and Triton drops the request.
Triton's own refusals become gateway errors here, so routes see one error path.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import tritonclient.grpc.aio as grpc_aio
from tritonclient.grpc import InferInput, InferRequestedOutput, InferResult
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from .errors import BadRequest, DeadlineExceeded, GatewayError, Unavailable

# Triton's messages for requests its queue policy turned away (tritonserver 2.51).
_QUEUE_REFUSALS = ("Exceeds maximum queue size", "Request timeout expired")


def _tensor(name: str, array: npt.NDArray[Any]) -> InferInput:
    tensor = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(array)
    return tensor


def text_column(texts: Sequence[str]) -> npt.NDArray[np.object_]:
    """A BYTES input of one text a row: shape [rows, 1]."""
    return np.array([[text.encode("utf-8")] for text in texts], dtype=np.object_)


class Triton:
    def __init__(self, url: str) -> None:
        self.url = url
        self._client = grpc_aio.InferenceServerClient(url)

    async def close(self) -> None:
        await self._client.close()

    async def ready(self, services: Sequence[str]) -> list[str]:
        """The services that are not ready (all of them when Triton cannot be reached)."""
        try:
            if not await self._client.is_server_ready():
                return list(services)
            return [s for s in services if not await self._client.is_model_ready(s)]
        except InferenceServerException:
            return list(services)

    async def infer(
        self, service: str, inputs: Mapping[str, npt.NDArray[Any]], outputs: Sequence[str], timeout: float
    ) -> dict[str, npt.NDArray[Any]]:
        """One request; raises DeadlineExceeded after ``timeout`` seconds (the call is cancelled at Triton)."""
        if timeout <= 0:
            raise DeadlineExceeded(f"no time left to call {service}")
        try:
            result = await self._client.infer(
                service,
                [_tensor(name, array) for name, array in inputs.items()],
                outputs=[InferRequestedOutput(name) for name in outputs],
                client_timeout=timeout,
            )
        except InferenceServerException as error:
            raise triton_error(service, error, timeout) from None
        return {name: result.as_numpy(name) for name in outputs}

    async def stream(
        self, service: str, inputs: Mapping[str, npt.NDArray[Any]], timeout: float
    ) -> AsyncIterator[InferResult]:
        """The responses of one decoupled request, as they come; cancelled at Triton when the caller stops
        iterating, is cancelled, or ``timeout`` passes."""
        if timeout <= 0:
            raise DeadlineExceeded(f"no time left to call {service}")
        done = asyncio.Event()

        async def one_request() -> AsyncIterator[dict[str, Any]]:
            yield {
                "model_name": service,
                "inputs": [_tensor(name, array) for name, array in inputs.items()],
                "enable_empty_final_response": True,
            }
            # Keep the request side open until the last response: closing it early ends the stream.
            await done.wait()

        responses = self._client.stream_infer(one_request(), stream_timeout=timeout)
        try:
            async for result, error in responses:
                if error is not None:
                    raise triton_error(service, error, timeout)
                if result.get_response().outputs:
                    yield result
                if _is_final(result):
                    return
        except grpc.aio.AioRpcError as error:
            raise triton_error(service, InferenceServerException(error.details(), str(error.code())), timeout) from None
        finally:
            done.set()
            responses.cancel()


def _is_final(result: InferResult) -> bool:
    flag = result.get_response().parameters.get("triton_final_response")
    return flag is not None and bool(flag.bool_param)


def triton_error(service: str, error: InferenceServerException, timeout: float) -> GatewayError:
    """Triton's refusal as the gateway error a client should see."""
    status, message = str(error.status() or ""), str(error.message() or error)
    if "DEADLINE_EXCEEDED" in status or "Deadline Exceeded" in message:
        return DeadlineExceeded(f"{service} did not answer within {timeout:.3g} s; the request was cancelled")
    if any(refusal in message for refusal in _QUEUE_REFUSALS):
        return Unavailable(f"{service} is overloaded: {message}", headers={"Retry-After": "1"})
    if "UNAVAILABLE" in status:
        return Unavailable(f"Triton is unreachable: {message}", headers={"Retry-After": "1"})
    if "INVALID_ARG" in status or "INVALID_ARGUMENT" in status:
        return BadRequest(f"{service} rejected the request: {message}")
    return GatewayError(f"{service} failed: {message}")
