"""The compiler -> runtimes contract (runtimes/parameters.py): what the compiler writes into config.pbtxt
``parameters`` is what the runtimes parse back, and the parser refuses anything else."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from compiler.pipeline import build_plan
from compiler.render import render_repository
from runtimes.parameters import LLM_ONLY, RuntimeParameters

SEED = Path(__file__).parent / "data" / "seed_config.yaml"

ENCODER = RuntimeParameters(
    artifacts_dir="artifacts", max_length=256, inference_timeout_s=0.3, queue_timeout_us=50_000, worker_count=4
)
LLM = RuntimeParameters(
    artifacts_dir="artifacts",
    max_length=2048,
    inference_timeout_s=2.0,
    queue_timeout_us=200_000,
    worker_count=1,
    default_max_tokens=256,
    batch_size=4,
    batch_timeout_us=50_000,
    max_queue_size=50,
)


def model_config(values: dict[str, str]) -> dict[str, Any]:
    """The model_config JSON Triton hands to initialize(), reduced to its parameters."""
    return {"parameters": {key: {"string_value": value} for key, value in values.items()}}


def test_runtime_parameters_parse_back_to_the_plan_when_rendered_for_each_seed_service() -> None:
    compiled = build_plan(SEED)
    files = render_repository(compiled.plan)
    expected = {
        "embedding_service": ENCODER,
        "reranker_service": RuntimeParameters("artifacts", 512, 0.5, 100_000, 2),
        "llm_service": LLM,
    }
    assert sorted(service.name for service in compiled.plan.services) == sorted(expected)
    for service in compiled.plan.services:
        # Through the rendered text, as Triton reads it and hands it over: config.pbtxt -> ModelConfig -> JSON.
        config = json_format.MessageToDict(
            text_format.Parse(files[f"{service.name}/config.pbtxt"], model_config_pb2.ModelConfig()),
            preserving_proto_field_name=True,
        )
        parsed = RuntimeParameters.from_model_config(config, llm=service.model.type == "llm")
        assert parsed == expected[service.name]
        assert parsed.to_config() == service.triton.parameters


def test_runtime_parameters_render_sorted_strings_when_written() -> None:
    assert LLM.to_config() == {
        "artifacts_dir": "artifacts",
        "batch_size": "4",
        "batch_timeout_us": "50000",
        "default_max_tokens": "256",
        "inference_timeout_s": "2",  # `:g`, as config.pbtxt has always said
        "intra_op_threads": "0",
        "max_length": "2048",
        "max_queue_size": "50",
        "queue_timeout_us": "200000",
        "worker_count": "1",
    }
    assert list(LLM.to_config()) == sorted(LLM.to_config())
    assert not LLM_ONLY & set(ENCODER.to_config())
    assert ENCODER.to_config()["inference_timeout_s"] == "0.3"


@pytest.mark.parametrize("key", sorted(LLM.to_config()))
def test_runtime_parameters_raise_naming_key_when_it_is_missing(key: str) -> None:
    values = LLM.to_config()
    del values[key]
    with pytest.raises(ValueError, match=f"'{key}' is missing"):
        RuntimeParameters.from_model_config(model_config(values), llm=True)


def test_runtime_parameters_raise_naming_key_when_it_is_unknown() -> None:
    with pytest.raises(ValueError, match="unknown key 'service_type'"):
        RuntimeParameters.from_model_config(model_config(ENCODER.to_config() | {"service_type": "embedding"}))


@pytest.mark.parametrize("key", sorted(LLM_ONLY))
def test_runtime_parameters_raise_naming_key_when_an_encoder_is_given_an_llm_only_key(key: str) -> None:
    with pytest.raises(ValueError, match=f"unknown key '{key}'"):
        RuntimeParameters.from_model_config(model_config(ENCODER.to_config() | {key: LLM.to_config()[key]}))


@pytest.mark.parametrize("settings", [ENCODER, LLM], ids=["encoder", "llm"])
def test_runtime_parameters_round_trip_when_written_and_read_back(settings: RuntimeParameters) -> None:
    llm = settings.default_max_tokens is not None
    assert RuntimeParameters.from_model_config(model_config(settings.to_config()), llm=llm) == settings


def test_runtime_parameters_accept_zero_when_the_llm_neither_holds_nor_queues() -> None:
    values = LLM.to_config() | {"batch_timeout_us": "0", "max_queue_size": "0"}
    parsed = RuntimeParameters.from_model_config(model_config(values), llm=True)
    assert (parsed.batch_timeout_us, parsed.max_queue_size) == (0, 0)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_length", "two"),
        ("max_length", "0"),
        ("worker_count", "1.5"),
        ("worker_count", "0"),
        ("intra_op_threads", "-1"),
        ("queue_timeout_us", ""),
        ("inference_timeout_s", "soon"),
        ("inference_timeout_s", "-1"),
        ("inference_timeout_s", "nan"),
        ("default_max_tokens", "0"),
        ("batch_size", "0"),
        ("batch_size", "four"),
        ("batch_timeout_us", "-1"),
        ("batch_timeout_us", "0.05"),
        ("max_queue_size", "-1"),
        ("artifacts_dir", ""),
    ],
)
def test_runtime_parameters_raise_naming_key_when_value_is_malformed(key: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"'{key}' = '{value}' is not"):
        RuntimeParameters.from_model_config(model_config(LLM.to_config() | {key: value}), llm=True)


def test_runtime_parameters_threads_split_cores_between_instances_when_not_configured() -> None:
    def threads(configured: int, worker_count: int, cpu_count: int | None) -> int:
        settings = RuntimeParameters("a", 1, 0.0, 0, worker_count, intra_op_threads=configured)
        return settings.threads(cpu_count)

    assert threads(0, worker_count=2, cpu_count=8) == 4
    assert threads(0, worker_count=3, cpu_count=8) == 2
    assert threads(0, worker_count=4, cpu_count=2) == 1  # at least one
    assert threads(0, worker_count=1, cpu_count=None) == 1
    assert threads(3, worker_count=4, cpu_count=2) == 3  # configured wins


def test_runtime_parameters_threads_leave_spare_cores_when_asked() -> None:
    settings = RuntimeParameters("a", 1, 0.0, 0, worker_count=1)
    assert settings.threads(2, spare_cores=1) == 1
    assert settings.threads(16, spare_cores=1) == 15
    assert settings.threads(1, spare_cores=1) == 1  # at least one
    assert RuntimeParameters("a", 1, 0.0, 0, worker_count=1, intra_op_threads=4).threads(2, spare_cores=1) == 4
