"""Triton Python-backend model of an LLM service; the compiler copies it to ``<service>/1/model.py``.

The model is decoupled: each request gets a stream of responses, one per piece of text, and a last one with
flag FINAL carrying the finish reason (tensor contract: ``LLM_INPUTS`` / ``LLM_OUTPUTS`` in
``runtimes/signatures.py``). The requests of one ``execute`` call (dynamic batching) are generated together
by ``runtimes.llm.BatchGenerator``; this module only turns tensors into requests and events into responses.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import triton_python_backend_utils as pb_utils

from runtimes.llm import BatchGenerator, GenerationEvent, GenerationRequest, load_generator

_T = TypeVar("_T")


@dataclass(frozen=True)
class LlmSettings:
    """The model's config.pbtxt ``parameters``, all written by the compiler as string values."""

    artifacts_dir: str  # relative to the version directory: the HF model and tokenizer
    max_length: int
    default_max_tokens: int
    inference_timeout_s: float  # 0: no deadline
    intra_op_threads: int  # 0: cpu_count // worker_count
    worker_count: int  # model instances sharing this machine's cores

    @classmethod
    def from_model_config(cls, model_config: Mapping[str, Any]) -> LlmSettings:
        raw = {name: entry.get("string_value", "") for name, entry in model_config.get("parameters", {}).items()}
        return cls(
            artifacts_dir=_parameter(raw, "artifacts_dir", str),
            max_length=_parameter(raw, "max_length", int),
            default_max_tokens=_parameter(raw, "default_max_tokens", int),
            inference_timeout_s=_parameter(raw, "inference_timeout_s", float),
            intra_op_threads=_parameter(raw, "intra_op_threads", int),
            worker_count=_parameter(raw, "worker_count", int),
        )

    def threads(self, cpu_count: int | None) -> int:
        """Intra-op threads per instance: the configured number, else the cores split between the instances
        (each instance is its own process; more threads than cores makes them fight)."""
        if self.intra_op_threads > 0:
            return self.intra_op_threads
        return max(1, (cpu_count or 1) // max(1, self.worker_count))


def _parameter(raw: Mapping[str, str], name: str, kind: Callable[[str], _T]) -> _T:
    if name not in raw:
        raise ValueError(f"config.pbtxt parameters: {name!r} is missing")
    try:
        return kind(raw[name])
    except ValueError as exc:
        raise ValueError(f"config.pbtxt parameters: {name!r} = {raw[name]!r} is not a valid {kind.__name__}") from exc


def _input_value(request: Any, name: str) -> Any:
    """The single element of an optional input tensor ([1, 1]: batch row + dim), or None when absent."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    array = tensor.as_numpy()
    if array.size != 1:
        raise ValueError(f"input {name!r} must hold one value per request, got shape {list(array.shape)}")
    value = array.reshape(-1)[0]
    if isinstance(value, bytes | np.bytes_):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"input {name!r} is not valid UTF-8") from exc
    return value.item() if isinstance(value, np.generic) else value


def _json_list(request: Any, name: str) -> list[Any] | None:
    text = _input_value(request, name)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"input {name!r} must be a JSON list: {exc}") from exc
    if not isinstance(value, list):
        raise ValueError(f"input {name!r} must be a JSON list, got {type(value).__name__}")
    return value


def parse_request(request: Any, is_cancelled: Callable[[], bool]) -> GenerationRequest:
    """Reads one Triton request's inputs; a ValueError names the input that is wrong."""
    optional = {name: _input_value(request, name) for name in ("max_tokens", "temperature", "top_p", "seed")}
    present = {name: value for name, value in optional.items() if value is not None}
    return GenerationRequest(
        text_input=_input_value(request, "text_input"),
        messages=_json_list(request, "messages"),
        stop=tuple(_json_list(request, "stop") or ()),
        is_cancelled=is_cancelled,
        **present,
    )


def _string_tensor(name: str, text: str) -> Any:
    return pb_utils.Tensor(name, np.array([[text.encode("utf-8")]], dtype=np.object_))


def event_response(event: GenerationEvent) -> Any:
    """One InferenceResponse: an error, or the four LLM_OUTPUTS shaped [1, 1]."""
    if event.error is not None:
        return error_response(event.error)
    return pb_utils.InferenceResponse(
        output_tensors=[
            _string_tensor("text_output", event.text),
            _string_tensor("finish_reason", event.finish_reason or ""),
            pb_utils.Tensor("prompt_tokens", np.array([[event.prompt_tokens]], dtype=np.int32)),
            pb_utils.Tensor("completion_tokens", np.array([[event.completion_tokens]], dtype=np.int32)),
        ]
    )


def error_response(message: str) -> Any:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG))


class _Client:
    """One request's response stream. A send that fails (the client went away) marks the stream cancelled,
    so the decode loop drops that row at its next step instead of failing the whole batch."""

    def __init__(self, sender: Any) -> None:
        self._sender = sender
        self._broken = False
        self.closed = False

    def is_cancelled(self) -> bool:
        return self._broken or bool(self._sender.is_cancelled())

    def send(self, response: Any, final: bool = False) -> None:
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        self.closed = self.closed or final
        try:
            self._sender.send(response, flags=flags)
        # Whatever the backend raises here concerns this client only; logged, never silently dropped.
        except Exception as exc:  # noqa: BLE001
            self._broken = True
            pb_utils.Logger.log_warn(f"llm: could not send a response, dropping the request: {exc}")


def torch_device(args: Mapping[str, str]) -> str:
    """The device instance_group placed this instance on: "cuda:<id>" for KIND_GPU, else "cpu"."""
    if args.get("model_instance_kind") == "GPU":
        return f"cuda:{args['model_instance_device_id']}"
    return "cpu"


FINISH_REASONS = ("stop", "length", "cancelled", "timeout", "error")


class _Metrics:
    """Counters on Triton's own /metrics (Python-backend custom metrics): how requests ended and how many tokens
    were generated, so an operator (and the tests) can see that a cancelled request stopped costing compute."""

    def __init__(self, model_name: str) -> None:
        finished = pb_utils.MetricFamily(
            name="sluice_llm_requests_finished_total",
            description="LLM requests ended, by finish reason",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        tokens = pb_utils.MetricFamily(
            name="sluice_llm_completion_tokens_total",
            description="Tokens generated by the LLM",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        # The families must outlive their metrics: Triton drops a family's values when the family is deleted.
        self._families = (finished, tokens)
        self.finished = {
            reason: finished.Metric(labels={"model": model_name, "reason": reason}) for reason in FINISH_REASONS
        }
        self.tokens = tokens.Metric(labels={"model": model_name})

    def record(self, event: GenerationEvent) -> None:
        self.finished[event.finish_reason or "error"].increment(1)
        if event.completion_tokens:
            self.tokens.increment(event.completion_tokens)


class TritonPythonModel:
    """Triton's entry points: load once, then generate each execute() batch in one decode loop."""

    def initialize(self, args: Mapping[str, str]) -> None:
        settings = LlmSettings.from_model_config(json.loads(args["model_config"]))
        version_dir = Path(args["model_repository"]) / args["model_version"]
        threads = settings.threads(os.cpu_count())
        self._generator: BatchGenerator | None = load_generator(
            version_dir / settings.artifacts_dir,
            threads=threads,
            device=torch_device(args),
            max_length=settings.max_length,
            default_max_tokens=settings.default_max_tokens,
            timeout_s=settings.inference_timeout_s,
        )
        self._metrics = _Metrics(args["model_name"])
        pb_utils.Logger.log_info(
            f"llm: loaded {settings.artifacts_dir} on {torch_device(args)} with {threads} intra-op threads"
        )

    def execute(self, requests: Sequence[Any]) -> None:
        """Streams every request's responses; returns None, as decoupled models do."""
        accepted: list[tuple[GenerationRequest, _Client]] = []
        for request in requests:
            client = _Client(request.get_response_sender())
            try:
                accepted.append((parse_request(request, client.is_cancelled), client))
            except ValueError as exc:
                client.send(error_response(str(exc)), final=True)
        if accepted:
            self._stream([req for req, _ in accepted], [client for _, client in accepted])
        return None

    def _stream(self, requests: list[GenerationRequest], clients: list[_Client]) -> None:
        assert self._generator is not None, "execute() after finalize()"
        try:
            for event in self._generator.generate(requests):
                clients[event.index].send(event_response(event), final=event.final)
                if event.final:
                    self._metrics.record(event)
        # A failure mid-batch (a bug, out of memory) must still close every open stream, or its client hangs.
        except Exception as exc:  # noqa: BLE001
            pb_utils.Logger.log_error(f"llm: generation failed: {exc!r}")
            for client in clients:
                if not client.closed:
                    client.send(
                        pb_utils.InferenceResponse(error=pb_utils.TritonError(f"generation failed: {exc}")),
                        final=True,
                    )

    def finalize(self) -> None:
        self._generator = None
