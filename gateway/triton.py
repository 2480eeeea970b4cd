"""The gateway's one connection to Triton: gRPC (asyncio), one channel reused by every request.

Requests are built directly as Triton's protobuf messages and sent with Triton's generated stub (the same
``service_pb2`` that ``tritonclient.grpc`` wraps): on a 2-core machine ``tritonclient``'s own request and result
objects cost the gateway about 0.2 ms of CPU per call, time the model then lacks (docs/benchmarks.md).

Each call carries a timeout (the service's inference_timeout, or less when the request's total deadline is nearer);
on expiry, or when the caller's task is cancelled, the gRPC call is cancelled and Triton drops the request (an
encoder runtime then stops computing it: every client of its batch is gone). Triton's own refusals become gateway
errors here, so routes see one error path; an encoder batch stopped at its inference_timeout is a 504, as is the
call's own timeout.

The channel may lead to several Triton replicas (triton_target.py): gRPC's round_robin spreads the calls and leaves a
dead replica out until it is back. An encoder call that failed without Triton's answer (the connection refused or
reset) is sent once more, to the next replica. A stream is never retried: an LLM's tokens may already be out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import deserialize_bytes_tensor, np_to_triton_dtype, triton_to_np_dtype

from runtimes.signatures import (
    INFERENCE_TIMEOUT_MESSAGE,
    QUEUE_FULL_MESSAGE,
    QUEUE_TIMEOUT_MESSAGE,
    START_BY_PARAMETER,
    UNLOADING_MESSAGE,
)

from .errors import BadRequest, DeadlineExceeded, GatewayError, Unavailable
from .protocol import REQUEST_FIELD_OF_TENSOR
from .triton_target import grpc_target

Tensors = dict[str, npt.NDArray[Any]]

# Triton's messages for a request turned away: a full queue, and a queue timeout; the encoder runtimes (for a
# request whose start-by passed) and the LLM engine answer with the same texts.
_QUEUE_FULL, _QUEUE_TIMEOUT = QUEUE_FULL_MESSAGE, QUEUE_TIMEOUT_MESSAGE
# A stream's error reaches the gateway as its text alone, without its status. Triton's switch for that (the
# `triton_grpc_error: true` header, which ends the stream with the error's gRPC status) is not used: with it,
# tritonserver 2.51 died twice in python -m benchmarks.llm under a burst of refusals, and never without it. So
# errors are told apart by their text: Triton's queue texts, the model unloading, and the runtimes' habit of naming
# the input at fault first.
# As tritonclient sets them: a batch of embeddings can exceed gRPC's default 4 MiB.
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1),
                    # Triton restarted by `sluice up` is reached again within a second of opening its port: gRPC's
                    # default reconnect backoff grows to 120 s, answering 503 long after Triton is back.
                    ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 1000)]


def text_column(texts: Sequence[str]) -> npt.NDArray[np.object_]:
    """A BYTES input of one text a row: shape [rows, 1]."""
    return np.array([[text.encode("utf-8")] for text in texts], dtype=np.object_)


def infer_request(service: str, inputs: Mapping[str, npt.NDArray[Any]], outputs: Sequence[str] = ()) -> Any:
    """A ModelInferRequest with every input in ``raw_input_contents`` (BYTES elements length-prefixed)."""
    request = service_pb2.ModelInferRequest(model_name=service)
    for name, array in inputs.items():
        tensor = request.inputs.add()
        tensor.name = name
        tensor.shape.extend(array.shape)
        if array.dtype == np.object_:
            tensor.datatype = "BYTES"
            request.raw_input_contents.append(
                b"".join(len(item).to_bytes(4, "little") + item for item in array.flat)
            )
        else:
            tensor.datatype = np_to_triton_dtype(array.dtype)
            request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    for name in outputs:
        request.outputs.add().name = name
    return request


def response_tensors(response: Any) -> Tensors:
    """A ModelInferResponse's outputs as arrays of their shapes (BYTES as object arrays of bytes)."""
    tensors: Tensors = {}
    for output, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        if output.datatype == "BYTES":
            array: npt.NDArray[Any] = deserialize_bytes_tensor(raw)
        else:
            array = np.frombuffer(raw, dtype=triton_to_np_dtype(output.datatype))
        tensors[output.name] = array.reshape(tuple(output.shape))
    return tensors


# Calls spread over every address the target resolves to; an endpoint whose connection fails is left out until gRPC
# has reconnected to it (with the backoff above), so a Triton replica that dies costs only the calls it held.
_ROUND_ROBIN = ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]}))


class Triton:
    def __init__(self, url: str) -> None:
        self.url = url
        target, _ = grpc_target(url)
        self._channel = grpc.aio.insecure_channel(target, options=[*_CHANNEL_OPTIONS, _ROUND_ROBIN])
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._closing: set[asyncio.Task[None]] = set()  # streams whose last response came, until their call ends

    async def close(self) -> None:
        await self._channel.close()

    async def ready(self, services: Sequence[str]) -> list[str]:
        """The services that are not ready (all of them when Triton cannot be reached)."""
        try:
            server = await self._stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=2)
            if not server.ready:
                return list(services)
            not_ready = []
            for service in services:
                model = await self._stub.ModelReady(service_pb2.ModelReadyRequest(name=service), timeout=2)
                if not model.ready:
                    not_ready.append(service)
            return not_ready
        except grpc.aio.AioRpcError:
            return list(services)

    async def infer(
        self,
        service: str,
        inputs: Mapping[str, npt.NDArray[Any]],
        outputs: Sequence[str],
        timeout: float,
        start_by_us: int | None = None,
    ) -> Tensors:
        """One request; raises DeadlineExceeded after ``timeout`` seconds (the call is cancelled at Triton).

        ``start_by_us`` (wall clock, microseconds): the runtime refuses the request, uncomputed, if its batch has not
        started by then (START_BY_PARAMETER in runtimes/signatures.py)."""
        if timeout <= 0:
            raise DeadlineExceeded(f"no time left to call {service}")
        request = infer_request(service, inputs, outputs)
        if start_by_us is not None:
            request.parameters[START_BY_PARAMETER].int64_param = start_by_us
        deadline = time.monotonic() + timeout
        try:
            response = await self._stub.ModelInfer(request, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            left = deadline - time.monotonic()
            if not _unanswered(error) or left <= 0:
                raise triton_error(service, error.code(), error.details() or "", timeout) from None
            # The endpoint went away (refused or reset the connection): once more, on the next one round_robin
            # picks, within what is left of the timeout. The encoders' requests compute and change nothing.
            try:
                response = await self._stub.ModelInfer(request, timeout=left)
            except grpc.aio.AioRpcError as again:
                raise triton_error(service, again.code(), again.details() or "", timeout) from None
        return response_tensors(response)

    async def stream(
        self, service: str, inputs: Mapping[str, npt.NDArray[Any]], timeout: float, start_by_us: int | None = None
    ) -> AsyncIterator[Tensors]:
        """The responses of one decoupled request, as they come; cancelled at Triton when the caller stops
        iterating, is cancelled, or ``timeout`` passes. ``start_by_us`` as for ``infer``: the LLM engine refuses the
        request if it has not started generating by then."""
        if timeout <= 0:
            raise DeadlineExceeded(f"no time left to call {service}")
        request = infer_request(service, inputs)
        request.parameters["triton_enable_empty_final_response"].bool_param = True
        if start_by_us is not None:
            request.parameters[START_BY_PARAMETER].int64_param = start_by_us
        done = asyncio.Event()

        async def one_request() -> AsyncIterator[Any]:
            yield request
            # Keep the request side open until the last response: closing it early ends the stream.
            await done.wait()

        responses = self._stub.ModelStreamInfer(one_request(), timeout=timeout)
        ended = False
        try:
            async for message in responses:
                if message.error_message:  # the text alone, no status (above)
                    raise triton_error(service, None, message.error_message, timeout)
                response = message.infer_response
                if response.outputs:
                    yield response_tensors(response)
                final = response.parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    ended = True
                    return
        except grpc.aio.AioRpcError as error:
            raise triton_error(service, error.code(), error.details() or "", timeout) from None
        finally:
            done.set()  # the request side closes: Triton ends the call once its last response is out
            if ended:
                # Never cancel a call whose request has ended: tritonserver 2.51 then often failed to stop ("Exit
                # timeout expired") after serving LLM streams. It ends by itself; a task keeps it until then.
                self._closing.add(task := asyncio.create_task(_drain(responses)))
                task.add_done_callback(self._closing.discard)
            else:
                responses.cancel()


async def _drain(call: Any) -> None:
    """Waits for a finished stream's call to end (nothing more arrives on it)."""
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
        async for _ in call:
            pass


def _unanswered(error: grpc.aio.AioRpcError) -> bool:
    """Whether a call failed without Triton's answer: UNAVAILABLE from the transport (connection refused or reset),
    not Triton's own UNAVAILABLE refusals (a full queue, a queue timeout, a model unloading, an encoder batch stopped
    at its inference_timeout), which name themselves."""
    message = error.details() or ""
    return error.code() is grpc.StatusCode.UNAVAILABLE and not any(
        text in message for text in (_QUEUE_FULL, _QUEUE_TIMEOUT, UNLOADING_MESSAGE, INFERENCE_TIMEOUT_MESSAGE)
    )


def triton_error(service: str, code: grpc.StatusCode | None, message: str, timeout: float) -> GatewayError:
    """Triton's refusal (a gRPC status, or a stream's error message) as the gateway error a client should see."""
    if code is grpc.StatusCode.DEADLINE_EXCEEDED or "Deadline Exceeded" in message:
        return DeadlineExceeded(f"{service} did not answer within {timeout:.3g} s; the request was cancelled")
    if INFERENCE_TIMEOUT_MESSAGE in message:  # an encoder runtime stopped the batch (runtimes/_triton.py, Stopper)
        return DeadlineExceeded(f"{service}: {message}")
    if _QUEUE_TIMEOUT in message:
        return Unavailable(f"{service} is overloaded: the request waited past its queue_timeout (Triton: {message})",
                           headers={"Retry-After": "1"})
    if _QUEUE_FULL in message:
        return Unavailable(f"{service} is overloaded: {message}", headers={"Retry-After": "1"})
    if code is grpc.StatusCode.UNAVAILABLE or UNLOADING_MESSAGE in message:  # Triton unreachable, or unloading
        return Unavailable(f"{service} is unavailable: {message}", headers={"Retry-After": "1"})
    if code in (grpc.StatusCode.INVALID_ARGUMENT, None):
        # The runtimes name the tensor at fault first ("text_input: the prompt has 1206 tokens; ..."): the client
        # is told the request field it filled that tensor from.
        tensor, _, detail = message.partition(": ")
        if field := REQUEST_FIELD_OF_TENSOR.get(tensor):
            return BadRequest(f"{field}: {detail}", param=field)
        if code is not None:
            return BadRequest(f"{service} rejected the request: {message}")
    return GatewayError(f"{service} failed: {message}")
