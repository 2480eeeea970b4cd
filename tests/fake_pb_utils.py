"""A stand-in for ``triton_python_backend_utils`` (which exists only inside Triton's Python stub), enough for the
encoder runtime's helpers (runtimes/_triton.py) to be tested in-process: errors, responses, custom metrics and
input tensors of plain dict requests ({input name: array})."""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

FINAL = 1  # TRITONSERVER_RESPONSE_COMPLETE_FINAL


class FakeTritonError:
    INVALID_ARG, INTERNAL, UNAVAILABLE = 3, 13, 14

    def __init__(self, message: str, code: int | None = None) -> None:
        self.message, self.code = message, code


class FakeResponse:
    def __init__(self, output_tensors: list[Any] | None = None, error: FakeTritonError | None = None) -> None:
        self.output_tensors, self.error = output_tensors or [], error


class FakeMetric:
    """A counter (increment), gauge (set) or histogram (observe: every value kept)."""

    def __init__(self, labels: dict[str, str], buckets: list[float] | None = None) -> None:
        self.labels, self.buckets, self.value = labels, buckets, 0.0
        self.observed: list[float] = []

    def increment(self, value: float) -> None:
        self.value += value

    def set(self, value: float) -> None:
        self.value = value

    def observe(self, value: float) -> None:
        self.observed.append(value)


class FakeMetricFamily:
    COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
    families: ClassVar[list[FakeMetricFamily]] = []

    def __init__(self, name: str, description: str, kind: str) -> None:
        self.name, self.kind, self.metrics = name, kind, list[FakeMetric]()
        FakeMetricFamily.families.append(self)

    def Metric(self, labels: dict[str, str], buckets: list[float] | None = None) -> FakeMetric:
        if (buckets is None) == (self.kind == self.HISTOGRAM):
            raise ValueError("buckets are given for a histogram, and only for one")  # as Triton's stub checks
        self.metrics.append(FakeMetric(labels, buckets))
        return self.metrics[-1]


def runtime_helpers(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """``runtimes._triton`` imported against the fake (for a fixture to yield); no later test gets this copy."""
    fake = types.ModuleType("triton_python_backend_utils")
    fake.__dict__.update(
        TritonError=FakeTritonError,
        InferenceResponse=FakeResponse,
        MetricFamily=FakeMetricFamily,
        TRITONSERVER_RESPONSE_COMPLETE_FINAL=FINAL,
        Tensor=lambda name, array: (name, array),
        get_input_tensor_by_name=lambda request, name: (
            types.SimpleNamespace(as_numpy=lambda: request[name]) if name in request else None
        ),
    )
    FakeMetricFamily.families.clear()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    monkeypatch.delitem(sys.modules, "runtimes._triton", raising=False)
    yield importlib.import_module("runtimes._triton")
    sys.modules.pop("runtimes._triton", None)
