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
class QueuePolicy:
    """default_queue_policy. No default_timeout_microseconds: with one, tritonserver 2.51's dynamic batcher
    leaves the last request of a burst waiting until that timeout and then rejects it, though the instance is
    idle (a third of the requests of a 4+4+2-row burst; docs/triton-notes.md). queue_timeout is enforced by
    the gateway instead. Without a default, Triton 2.51 ignores a direct client's per-request ``timeout`` (it can
    only lower a non-zero default), so ``allow_timeout_override`` has no effect here."""

    max_queue_size: int
    timeout_action: str = "REJECT"
    allow_timeout_override: bool = True


@dataclass(frozen=True)
class DynamicBatching:
    max_queue_delay_microseconds: int
    default_queue_policy: QueuePolicy


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
    response_cache: bool
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
    where: str  # "triton" | "gateway" | "triton+gateway" | "none"
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
        max_batch_size=runtime.batch_size,
        inputs=inputs,
        outputs=outputs,
        dynamic_batching=DynamicBatching(
            max_queue_delay_microseconds=microseconds(runtime.batch_timeout),
            default_queue_policy=QueuePolicy(max_queue_size=runtime.max_queue_size),
        ),
        instance_group=_instance_group(model.device, runtime.worker_count),
        # Triton refuses a response cache on decoupled models.
        response_cache=runtime.enable_cache and not decoupled,
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
        default_max_tokens=model.max_tokens if isinstance(model, LLMModel) else None,
    ).to_config()


def enforcement(plan: ServicePlan) -> list[Enforcement]:
    """Where each of the nine knobs of a planned service takes effect, in the seed's order.

    ``what`` names the fields and mechanisms, never the values (``sluice explain`` shows those beside it), so the
    README's table is this function's output for each service type (tests/test_explain.py keeps them equal).
    """
    t, r = plan.triton, plan.runtime
    llm = plan.model.type == "llm"
    group = t.instance_group
    placement = f"{group.kind} on GPUs {list(group.gpus)}" if group.gpus else group.kind
    if llm:
        batch = ("triton", "max_batch_size: one dynamic batch decodes together; the gateway sends one prompt a request")
        deadline = (
            "triton+gateway",
            "each Triton call's deadline (queue_timeout + inference_timeout, then gRPC cancel and 504); "
            "parameters.inference_timeout_s: the runtime stops generating (finish_reason timeout)",
        )
        cache = ("none", "nothing: completions are never cached (a decoupled model takes no response cache)")
    else:
        batch = (
            "triton+gateway",
            "max_batch_size; the gateway splits larger client batches and merges concurrent small requests up to it",
        )
        deadline = (
            "gateway",
            "each Triton call's deadline (queue_timeout + inference_timeout, then gRPC cancel and 504); "
            "the ONNX run itself is not interrupted",
        )
        cache = ("triton+gateway", "when true: response_cache (per Triton request) + the gateway's per-item cache")
    policy = "dynamic_batching.default_queue_policy.max_queue_size (REJECT: 503 at the gateway)"
    rows = {
        "batch_size": batch,
        "batch_timeout": ("triton", "dynamic_batching.max_queue_delay_microseconds"),
        "max_queue_size": ("triton", f"{policy}; counts Triton requests, not rows"),
        "worker_count": ("triton", f"instance_group.count of {placement}; threads per instance = cores / count"),
        "queue_timeout": (
            "gateway",
            "part of each Triton call's deadline (queue_timeout + inference_timeout); not sent to Triton, which "
            "ignores a per-request timeout when its queue policy has no default (2.51)",
        ),
        "inference_timeout": deadline,
        "total_timeout": ("gateway", "one deadline from arrival to the last byte, streams included (504)"),
        "rate_limit": ("gateway", "requests per second per service (moving window; memory or Redis): 429"),
        "enable_cache": cache,
    }
    return [
        Enforcement(knob, getattr(r, knob), knob in r.explicit, *rows[knob]) for knob in RUNTIME_KNOBS
    ]
