"""The compiler -> runtimes contract: the settings each model.py reads from its config.pbtxt ``parameters``.

The compiler builds one ``RuntimeParameters`` per service and writes ``to_config()`` into config.pbtxt; the
model.py inside Triton reads it back with ``RuntimeParameters.from_model_config``. The reading side is strict: a
key that is missing, unknown or malformed is a ValueError naming it, so a key added, renamed or dropped on one side
alone fails at load instead of being silently ignored.

A leaf module: no torch, onnxruntime or Triton import, since the compiler imports it too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

# Only an LLM has these (its engine schedules its own queue); an encoder's config.pbtxt must not carry them.
LLM_ONLY = frozenset({"default_max_tokens", "batch_size", "batch_timeout_us", "max_queue_size"})


@dataclass(frozen=True)
class RuntimeParameters:
    """One service's runtime settings. The field names are the config.pbtxt ``parameters`` keys."""

    artifacts_dir: str  # relative to the version directory: the exported model and its tokenizer
    max_length: int  # tokens per text or pair (encoders); the context window (LLM)
    inference_timeout_s: float  # the runtime's own deadline per request; 0: none
    # The service's queue_timeout. The LLM engine enforces it for every client; for an encoder it is on record
    # only (the gateway enforces it; Triton 2.51 ignores a per-request `timeout` without a queue policy default).
    queue_timeout_us: int
    worker_count: int  # model instances sharing this machine's cores
    intra_op_threads: int = 0  # 0: derived from the cores and worker_count (threads())
    # LLM only (None for an encoder): what its engine enforces (runtimes/llm_engine.py).
    default_max_tokens: int | None = None  # tokens generated when a request does not say
    batch_size: int | None = None  # sequences running at once
    batch_timeout_us: int | None = None  # when idle, how long the first arrival may wait for company
    max_queue_size: int | None = None  # requests waiting to start; one more is refused

    def to_config(self) -> dict[str, str]:
        """The ``{key: string_value}`` config.pbtxt carries, sorted by key; None fields are left out."""
        values: dict[str, str] = {
            "artifacts_dir": self.artifacts_dir,
            "max_length": str(self.max_length),
            # `:g` writes 2, not 2.0: the text config.pbtxt has always had (golden files). Six significant
            # digits are plenty for a timeout.
            "inference_timeout_s": f"{self.inference_timeout_s:g}",
            "queue_timeout_us": str(self.queue_timeout_us),
            "worker_count": str(self.worker_count),
            "intra_op_threads": str(self.intra_op_threads),
        }
        for name in sorted(LLM_ONLY):
            value = getattr(self, name)
            if value is not None:
                values[name] = str(value)
        return dict(sorted(values.items()))

    @classmethod
    def from_model_config(cls, model_config: Mapping[str, Any], *, llm: bool = False) -> RuntimeParameters:
        """Parses the ``parameters`` of the model_config JSON Triton hands to ``initialize``
        (``{"key": {"string_value": "..."}}``). ``llm``: the LLM_ONLY keys are required; otherwise refused."""
        raw = {name: entry.get("string_value", "") for name, entry in model_config.get("parameters", {}).items()}
        known = {field.name for field in fields(cls)} - (set() if llm else LLM_ONLY)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"config.pbtxt parameters: unknown key {unknown[0]!r} (expected {sorted(known)})")
        return cls(
            artifacts_dir=_text(raw, "artifacts_dir"),
            max_length=_integer(raw, "max_length", minimum=1),
            inference_timeout_s=_seconds(raw, "inference_timeout_s"),
            queue_timeout_us=_integer(raw, "queue_timeout_us", minimum=0),
            worker_count=_integer(raw, "worker_count", minimum=1),
            intra_op_threads=_integer(raw, "intra_op_threads", minimum=0),
            default_max_tokens=_integer(raw, "default_max_tokens", minimum=1) if llm else None,
            batch_size=_integer(raw, "batch_size", minimum=1) if llm else None,
            batch_timeout_us=_integer(raw, "batch_timeout_us", minimum=0) if llm else None,
            max_queue_size=_integer(raw, "max_queue_size", minimum=0) if llm else None,
        )

    def threads(self, cpu_count: int | None, *, spare_cores: int = 0) -> int:
        """Intra-op threads per instance: the configured number, else the cores (less ``spare_cores``) split between
        the instances (each instance is its own process; more threads than cores makes them fight)."""
        if self.intra_op_threads > 0:
            return self.intra_op_threads
        return max(1, ((cpu_count or 1) - spare_cores) // max(1, self.worker_count))


def _value(raw: Mapping[str, str], name: str) -> str:
    if name not in raw:
        raise ValueError(f"config.pbtxt parameters: {name!r} is missing")
    return raw[name]


def _malformed(name: str, text: str, expected: str) -> ValueError:
    return ValueError(f"config.pbtxt parameters: {name!r} = {text!r} is not {expected}")


def _text(raw: Mapping[str, str], name: str) -> str:
    text = _value(raw, name)
    if not text:
        raise _malformed(name, text, "a non-empty string")
    return text


def _integer(raw: Mapping[str, str], name: str, minimum: int) -> int:
    text = _value(raw, name)
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise _malformed(name, text, f"an integer >= {minimum}")
    return value


def _seconds(raw: Mapping[str, str], name: str) -> float:
    text = _value(raw, name)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise _malformed(name, text, "a finite number of seconds >= 0")
    return value
