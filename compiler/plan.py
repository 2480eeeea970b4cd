"""Stage 4: validated config -> one plan per service, spelled like Triton's model_config.proto.

This module is the one place that says what each knob becomes (``KNOB_ENFORCEMENT`` and ``plan_service``):
the renderer writes the plan out, ``sluice explain`` reads it back, the README's table documents it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from runtimes.parameters import RuntimeParameters
from runtimes.signatures import SIGNATURES, Tensor
from sluice.manifest import Route

from .defaults import RUNTIME_KNOBS, ResolvedRuntime
from .schema import AnyModel, Config, LLMModel

# Model files travel inside each model's version directory, under this name.
ARTIFACTS_DIR = "artifacts"


@dataclass(frozen=True)
class DynamicBatching:
    """dynamic_batching, with no default_queue_policy for any service: Triton hands each request to ``execute`` at
    once and the queue lives elsewhere (an encoder's in the gateway, the LLM's in its engine).

    Why no queue policy. With one (max_queue_size, allow_timeout_override or a default timeout all turn Triton's
    prefetching off), 14 of 30 bursts of 9 single-row requests waited 0.4-1.0 s for a lost wake-up with the
    instance idle; 0 of 30 without (python -m benchmarks.burst_stall, docs/benchmarks.md). A default timeout also
    left the last request of a burst waiting until it expired, then rejected it, though the instance was idle
    (docs/triton-notes.md). Without a default, Triton 2.51 also ignores a client's per-request ``timeout``: the
    runtimes refuse a request past its ``sluice_start_by_us`` themselves (the LLM's engine past queue_timeout too).
    """

    max_queue_delay_microseconds: int


@dataclass(frozen=True)
class InstanceGroup:
    count: int
    kind: str  # KIND_CPU | KIND_GPU
    gpus: tuple[int, ...] = ()


@dataclass(frozen=True)
class TritonModelPlan:
    """Everything config.pbtxt says about one service."""

    name: str
    backend: str
    max_batch_size: int
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    dynamic_batching: DynamicBatching
    instance_group: InstanceGroup
    decoupled: bool
    # Inputs fed once at load (model_warmup), so the first client does not pay onnxruntime's first-run cost.
    warmup_inputs: tuple[Tensor, ...]
    # Settings the runtime (model.py) reads at initialize(); config.pbtxt `parameters`, string values.
    parameters: dict[str, str]


@dataclass(frozen=True)
class ServicePlan:
    name: str
    model_key: str
    model: AnyModel
    runtime: ResolvedRuntime
    triton: TritonModelPlan
    gateway: Route  # sluice.json's entry for the service (its fingerprint is added at compile)


@dataclass(frozen=True)
class Enforcement:
    """One row of `sluice explain`: a knob, its value, and where it takes effect."""

    knob: str
    value: Any
    explicit: bool
    where: str  # "triton" | "gateway" | "runtime" | "triton+gateway" | "gateway+runtime" | "none"
    what: str


@dataclass(frozen=True)
class RepositoryPlan:
    config: Config
    services: tuple[ServicePlan, ...] = field(default_factory=tuple)


def microseconds(seconds: float) -> int:
    return round(seconds * 1_000_000)


def plan_service(name: str, config: Config, runtime: ResolvedRuntime) -> ServicePlan:
    """The knob mapping. Read this function to know what each knob becomes."""
    model_key = config.services[name].model
    model = config.models[model_key]
    decoupled = model.type == "llm"  # the LLM streams: one request, many responses
    inputs, outputs = SIGNATURES[model.type]
    triton = TritonModelPlan(
        name=name,
        backend="python",
        # For the LLM only how many requests one execute may take: its engine bounds the sequences running.
        max_batch_size=runtime.batch_size,
        inputs=inputs,
        outputs=outputs,
        # Triton holds nothing and has no queue policy (DynamicBatching says why): it runs what it is sent at once.
        # An encoder's requests wait in the gateway, which holds batches for batch_timeout and enforces
        # max_queue_size and queue_timeout itself (gateway/scheduler.py). The LLM's execute only hands each request
        # to the model's engine (runtimes/llm_engine.py), which owns the waiting queue and the running batch and
        # enforces batch_size, batch_timeout, max_queue_size and queue_timeout from `parameters`; a Triton queue in
        # front of it would only hold requests the engine could already be admitting at its next decode step.
        dynamic_batching=DynamicBatching(max_queue_delay_microseconds=0),
        instance_group=_instance_group(model.device, runtime.worker_count),
        # No response_cache: Triton 2.51 caches error responses too, as answers without outputs, so a request
        # refused once (expired, or bad input) would be answered empty ever after. The gateway caches per item.
        decoupled=decoupled,
        # Decoupled models take no warm-up; the LLM loads its weights eagerly anyway.
        warmup_inputs=() if decoupled else inputs,
        parameters=_parameters(model, runtime),
    )
    gateway = Route(
        service=name,
        model=model_key,
        type=model.type,
        batch_size=runtime.batch_size,
        batch_timeout=runtime.batch_timeout,
        max_queue_size=runtime.max_queue_size,
        instances=triton.instance_group.count * max(1, len(triton.instance_group.gpus)),
        rate_limit=runtime.rate_limit,
        total_timeout=runtime.total_timeout,
        inference_timeout=runtime.inference_timeout,
        queue_timeout=runtime.queue_timeout,
        enable_cache=runtime.enable_cache,
        max_length=model.max_length,
        fingerprint="",
    )
    return ServicePlan(name, model_key, model, runtime, triton, gateway)


def _instance_group(device: str, count: int) -> InstanceGroup:
    if device == "cpu":
        return InstanceGroup(count=count, kind="KIND_CPU")
    gpus = tuple(int(gpu) for gpu in device.partition(":")[2].split(",") if gpu)
    # Triton places `count` instances on *each* listed GPU (all GPUs when none are listed).
    return InstanceGroup(count=count, kind="KIND_GPU", gpus=gpus)


def _parameters(model: AnyModel, runtime: ResolvedRuntime) -> dict[str, str]:
    """config.pbtxt ``parameters``: the runtime's settings, spelled by the contract both sides import."""
    return RuntimeParameters(
        artifacts_dir=ARTIFACTS_DIR,
        max_length=model.max_length,
        inference_timeout_s=runtime.inference_timeout,
        queue_timeout_us=microseconds(runtime.queue_timeout),
        worker_count=runtime.worker_count,
        # 0: the runtime derives its threads from the cores it finds and worker_count.
        intra_op_threads=0,
        **(_engine_parameters(model, runtime) if isinstance(model, LLMModel) else {}),
    ).to_config()


def _engine_parameters(model: LLMModel, runtime: ResolvedRuntime) -> dict[str, int]:
    """What the LLM's engine schedules by (runtimes/llm_engine.py): it owns the queue, not Triton."""
    return {
        "default_max_tokens": model.max_tokens,
        "batch_size": runtime.batch_size,
        "batch_timeout_us": microseconds(runtime.batch_timeout),
        "max_queue_size": runtime.max_queue_size,
    }


def enforcement(plan: ServicePlan) -> list[Enforcement]:
    """Where each of the nine knobs of a planned service takes effect, in the seed's order.

    ``what`` names the fields and mechanisms, never the values (``sluice explain`` shows those beside it), so the
    README's table is this function's output for each service type (tests/test_explain.py keeps them equal).
    """
    r, group = plan.runtime, plan.triton.instance_group
    placement = f"{group.kind} on GPUs {list(group.gpus)}" if group.gpus else group.kind
    deadline = "each Triton call's deadline (queue_timeout + inference_timeout, then gRPC cancel and 504)"
    rows: dict[str, tuple[str, str]]
    if plan.model.type == "llm":  # scheduled by the model's own engine (runtimes/llm_engine.py), one prompt a request
        rows = {
            "batch_size": (
                "runtime",
                "sequences decoding at once in the model's engine: a request joins the running batch at the next "
                "decode step, a finished one leaves at once",
            ),
            "batch_timeout": (
                "runtime",
                "only when the engine is idle: how long the first arrival waits for company before its prefill",
            ),
            "max_queue_size": (
                "runtime",
                'requests waiting in the engine; one more is refused at once (UNAVAILABLE "Exceeds maximum queue '
                'size": 503 with Retry-After)',
            ),
            "worker_count": ("triton", f"instance_group.count of {placement}; each instance runs an engine of its own"),
            "queue_timeout": (
                "gateway+runtime",
                'a request not started by then is refused at the next decode step (UNAVAILABLE "Request timeout '
                "expired\": 503); the gateway's requests carry it as sluice_start_by_us",
            ),
            "inference_timeout": (
                "gateway+runtime",
                "from the moment a request starts generating: the engine ends it with finish_reason timeout; "
                f"{deadline}",
            ),
            "total_timeout": ("gateway", "one deadline from arrival to the last byte, the stream included (504)"),
            "rate_limit": ("gateway", "requests per second per service (memory or Redis): 429"),
            "enable_cache": ("none", "nothing: completions are never cached (a decoupled model has no response cache)"),
        }
    else:  # queued in the gateway (gateway/scheduler.py), one call per model instance in flight
        rows = {
            "batch_size": (
                "triton+gateway",
                "max_batch_size; a request goes as chunks of at most this many items, batched with other waiting "
                "chunks up to it",
            ),
            "batch_timeout": (
                "gateway", "a batch that is not full waits this long for company (Triton's max_queue_delay is 0)"
            ),
            "max_queue_size": (
                "gateway",
                "chunks waiting in the gateway; beyond it 503 at once (no Triton queue policy: it stalls bursts)",
            ),
            "worker_count": (
                "triton+gateway",
                f"instance_group.count of {placement}; the gateway keeps one call per instance in flight",
            ),
            "queue_timeout": (
                "gateway+runtime",
                "a chunk not sent by then gets 503 (an arrival that cannot be, at once); each Triton request "
                "carries it as sluice_start_by_us and the runtime refuses it uncomputed once passed",
            ),
            "inference_timeout": (
                "gateway+runtime",
                "the runtime stops a batch that has computed this long (onnxruntime's terminate; 504, counted in "
                f"sluice_runs_stopped_total), and a batch whose clients all left; {deadline} as the backstop",
            ),
            "total_timeout": (
                "gateway",
                "per batch_size items: n items have ceil(n / batch_size) x total_timeout, arrival to last byte (504)",
            ),
            "rate_limit": (
                "gateway", "requests per second per service (memory or Redis); n items count ceil(n / batch_size): 429"
            ),
            "enable_cache": (
                "gateway",
                "when true: the gateway's per-item cache (memory or Redis); no Triton response_cache, which 2.51 "
                "fills with error responses as empty answers",
            ),
        }
    return [
        Enforcement(knob, getattr(r, knob), knob in r.explicit, *rows[knob]) for knob in RUNTIME_KNOBS
    ]
