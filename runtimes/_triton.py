"""What every Sluice model.py needs from Triton's Python backend: its settings, its inputs, error responses, and
for the encoders the start-by check, the warm-up, and the stopping of a batch past its inference_timeout or left by
all its clients (``Stopper``).

Imports ``triton_python_backend_utils``, which exists only inside Triton's Python stub.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import numpy.typing as npt
import triton_python_backend_utils as pb_utils

from runtimes.parameters import RuntimeParameters
from runtimes.signatures import (
    INFERENCE_TIMEOUT_MESSAGE,
    QUEUE_TIMEOUT_MESSAGE,
    START_BY_PARAMETER,
    TOKENS,
    TRUNCATED,
)

if TYPE_CHECKING:  # onnxruntime stays out of the LLM model's process
    from runtimes.encoders import Encoded, OnnxEncoder, Run, RunStopped

Row = TypeVar("Row")

# Triton's own message for a request its queue policy timed out (core scheduler_utils.cc), with its code,
# UNAVAILABLE (gRPC UNAVAILABLE, HTTP 503): a client maps an expired start-by and a queue timeout alike.
EXPIRED_MESSAGE = QUEUE_TIMEOUT_MESSAGE

# onnxruntime runs a new largest shape slowly twice: each of the first two runs grows its arena by the whole
# activation size (measured on 2 cores: MiniLM 64 x 256 tokens +470 MB each; the tiny cross-encoder 16 x 512 +75 MB,
# its first full request after start 0.19 s instead of 0.05 s); from the third run on, that shape and every smaller
# one allocate nothing (tests/test_expiry.py reads the stub's peak RSS).
WARMUP_RUNS = 2


def model_parameters(args: Mapping[str, str], *, llm: bool = False) -> RuntimeParameters:
    """config.pbtxt ``parameters``, parsed strictly (runtimes/parameters.py)."""
    return RuntimeParameters.from_model_config(json.loads(args["model_config"]), llm=llm)


def version_dir(args: Mapping[str, str]) -> Path:
    """``<repository>/<model>/<version>``: where model.py, runtimes/ and artifacts/ live."""
    return Path(args["model_repository"]) / args["model_version"]


def gpu_device_id(args: Mapping[str, str]) -> int | None:
    """The GPU this instance was placed on by instance_group, or None on CPU."""
    return int(args["model_instance_device_id"]) if args.get("model_instance_kind") == "GPU" else None


def _text(value: Any, name: str) -> str:
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"input {name!r} is not valid UTF-8") from None


def request_strings(request: Any, name: str) -> list[str]:
    """The rows of a BYTES input as text; ValueError naming the input when missing or not UTF-8."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise ValueError(f"input {name!r} is required")
    return [_text(value, name) for value in tensor.as_numpy().reshape(-1)]


def request_value(request: Any, name: str) -> Any:
    """The single element of an optional input ([1, 1]: batch row + dim) as a Python value, or None when absent;
    ValueError naming the input when it holds several values or text that is not UTF-8."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    array = tensor.as_numpy()
    if array.size != 1:
        raise ValueError(f"input {name!r} must hold one value per request, got shape {list(array.shape)}")
    value = array.reshape(-1)[0]
    if isinstance(value, bytes | np.bytes_):
        return _text(value, name)
    return value.item() if isinstance(value, np.generic) else value


def error_response(message: str, *, internal: bool = False) -> Any:
    """A response carrying only an error. The default, INVALID_ARG, is the client's fault (Triton's HTTP API
    answers 400); ``internal`` is the server's (500)."""
    return _error(message, pb_utils.TritonError.INTERNAL if internal else pb_utils.TritonError.INVALID_ARG)


def _error(message: str, code: Any) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


def column(values: npt.ArrayLike, dtype: Any) -> npt.NDArray[Any]:
    """Rows as a [rows, 1] array, the shape of a ``dims: [1]`` output with a batch dimension."""
    return np.asarray(values, dtype=dtype).reshape(-1, 1)


def start_by_us(parameters: Mapping[str, Any]) -> int | None:
    """A request's start-by (``START_BY_PARAMETER``: time.time() microseconds), or None when it has none.

    ``parameters`` is the request's parameters, parsed (``json.loads(request.parameters())``); a start-by that is
    not an integer is a ValueError naming the parameter.
    """
    start_by = parameters.get(START_BY_PARAMETER)
    if start_by is None:
        return None
    if isinstance(start_by, bool) or not isinstance(start_by, int):
        raise ValueError(
            f"parameter {START_BY_PARAMETER!r} must be an integer (microseconds since the epoch), got {start_by!r}"
        )
    return start_by


def is_expired(parameters: Mapping[str, Any], now_us: int) -> bool:
    """Whether a request's start-by had passed at ``now_us``; a request without one never expires."""
    start_by = start_by_us(parameters)
    return start_by is not None and start_by < now_us


class Expiry:
    """The start-by check at the top of an encoder's ``execute``: a request whose start-by has passed is answered
    UNAVAILABLE "Request timeout expired" at once, through its response sender, and is not computed; it is counted
    on Triton's /metrics as ``sluice_requests_expired_total{model}``."""

    def __init__(self, model_name: str) -> None:
        family = pb_utils.MetricFamily(
            name="sluice_requests_expired_total",
            description=f"Requests answered UNAVAILABLE without being computed: their {START_BY_PARAMETER} had passed",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        # The family must outlive its metric: Triton drops a family's values when the family is deleted.
        self._family = family
        self._expired = family.Metric(labels={"model": model_name})

    def serve(self, requests: list[Any], respond: Callable[[list[Any]], list[Any]]) -> list[Any]:
        """``respond``'s responses to the requests still worth computing, and None (Triton's mark for "answered
        through the response sender") for the others."""
        now_us = time.time_ns() // 1_000
        refused = [self._refuse(request, now_us) for request in requests]
        if not any(refused):
            return respond(requests)
        live = [request for request, done in zip(requests, refused, strict=True) if not done]
        responses = iter(respond(live) if live else [])
        return [None if done else next(responses) for done in refused]

    def _refuse(self, request: Any, now_us: int) -> bool:
        """Answers ``request`` at once, through its response sender, when its start-by has passed (UNAVAILABLE,
        counted) or is not an integer (INVALID_ARG); whether it did."""
        try:
            if not is_expired(json.loads(request.parameters()), now_us):
                return False
            response = _error(EXPIRED_MESSAGE, pb_utils.TritonError.UNAVAILABLE)
            self._expired.increment(1)
        except ValueError as error:
            response = error_response(str(error))
        request.get_response_sender().send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return True


class Stopper:
    """An encoder instance's watchdog (runtimes/encoders.py): each batch's onnxruntime calls are stopped once the
    batch has computed for the service's inference_timeout, or once every one of its requests was cancelled by its
    client (``request.is_cancelled()``, asked between length buckets, at most every 10 ms). Its requests are then
    answered UNAVAILABLE INFERENCE_TIMEOUT_MESSAGE (the gateway's 504) or CANCELLED, and the batch is counted once on
    Triton's /metrics as ``sluice_runs_stopped_total{model, reason}`` (reason: inference_timeout | cancelled)."""

    def __init__(self, model_name: str, inference_timeout_s: float) -> None:
        from runtimes.encoders import STOP_REASONS, Watchdog

        family = pb_utils.MetricFamily(
            name="sluice_runs_stopped_total",
            description="Batches whose computing was stopped before their end, by reason: inference_timeout (they "
            "computed for the service's inference_timeout) or cancelled (every client of the batch went away)",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self._family = family  # it must outlive its metrics (see Expiry)
        self._stopped = {
            reason: family.Metric(labels={"model": model_name, "reason": reason}) for reason in STOP_REASONS
        }
        self.inference_timeout_s = inference_timeout_s
        self.watchdog = Watchdog(inference_timeout_s, name=f"{model_name}-watchdog")

    def close(self) -> None:
        self.watchdog.close()

    def count(self, stopped: RunStopped) -> None:
        self._stopped[stopped.reason].increment(1)

    def refusal(self, stopped: RunStopped) -> Any:
        """The error response each request of a stopped batch gets (one object per request)."""
        from runtimes.encoders import INFERENCE_TIMEOUT

        if stopped.reason == INFERENCE_TIMEOUT:
            message = f"{INFERENCE_TIMEOUT_MESSAGE} ({self.inference_timeout_s:g} s)"
            return _error(message, pb_utils.TritonError.UNAVAILABLE)
        return _error("every client of the batch went away: the model stopped computing",
                      pb_utils.TritonError.CANCELLED)


def _is_cancelled(request: Any) -> bool:
    return bool(request.is_cancelled())


def warm_up(args: Mapping[str, str], run: Callable[[int], Encoded]) -> None:
    """Runs the encoder at load on the largest input it can be given, ``run(max_batch_size)`` (rows of max_length
    tokens), WARMUP_RUNS times, so that the first real request of any size runs warm; logs how long it took."""
    model_config = json.loads(args["model_config"])
    rows = max(1, int(model_config.get("max_batch_size", 1)))
    seconds = []
    for _ in range(WARMUP_RUNS):
        started = time.perf_counter()
        encoded = run(rows)
        seconds.append(time.perf_counter() - started)
    pb_utils.Logger.log_info(
        f"{args['model_name']}: warmed up on {rows} rows of {int(encoded.tokens.max())} tokens in "
        + " + ".join(f"{took:.3f}" for took in seconds)
        + " s"
    )


def encoder_responses(
    requests: list[Any],
    parse: Callable[[Any], list[Row]],
    encode: Callable[[list[Row], Run], Encoded],
    value_name: str,
    stopper: Stopper,
) -> list[Any]:
    """Run every row of every request through one ``encode`` call, watched by ``stopper``, and answer each request
    with its own rows.

    A request whose inputs do not parse gets an error response naming the input; the others are served, or all get
    the stopper's error when it stopped the batch.
    """
    from runtimes.encoders import RunStopped, all_cancelled

    parsed: list[list[Row] | ValueError] = []
    for request in requests:
        try:
            parsed.append(parse(request))
        except ValueError as error:
            parsed.append(error)
    served = [request for request, rows in zip(requests, parsed, strict=True) if isinstance(rows, list)]
    try:
        with stopper.watchdog.watch(all_cancelled(served, _is_cancelled)) as run:
            encoded = encode([row for rows in parsed if isinstance(rows, list) for row in rows], run)
    except RunStopped as stopped:
        stopper.count(stopped)
        return [
            error_response(str(rows)) if isinstance(rows, ValueError) else stopper.refusal(stopped) for rows in parsed
        ]
    responses, start = [], 0
    for rows in parsed:
        if isinstance(rows, ValueError):
            responses.append(error_response(str(rows)))
            continue
        end = start + len(rows)
        values = encoded.values[start:end]
        values = values if values.ndim > 1 else column(values, np.float32)  # scores: [rows] -> [rows, 1]
        responses.append(
            pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor(value_name, np.ascontiguousarray(values)),
                    pb_utils.Tensor(TOKENS, column(encoded.tokens[start:end], np.int32)),
                    pb_utils.Tensor(TRUNCATED, column(encoded.truncated[start:end], np.bool_)),
                ]
            )
        )
        start = end
    return responses


def load_encoder(args: Mapping[str, str]) -> OnnxEncoder:
    """The ONNX encoder of an embedding or reranker instance, placed and threaded as its config says."""
    from runtimes.encoders import OnnxEncoder, open_session

    parameters = model_parameters(args)
    artifacts = version_dir(args) / parameters.artifacts_dir
    session = open_session(artifacts / "model.onnx", parameters.threads(os.cpu_count()), gpu_device_id(args))
    return OnnxEncoder(artifacts, parameters.max_length, session)
