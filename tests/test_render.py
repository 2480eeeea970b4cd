"""Rendered config.pbtxt: each section parses into Triton's ModelConfig; the seed's files match golden copies."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from compiler.pipeline import build_plan
from compiler.plan import DynamicBatching, InstanceGroup
from compiler.render import (
    render_dynamic_batching,
    render_instance_group,
    render_model_warmup,
    render_parameters,
    render_repository,
    render_tensors,
)
from runtimes.parameters import LLM_ONLY
from runtimes.signatures import Tensor

DATA = Path(__file__).parent / "data"
GOLDEN = Path(__file__).parent / "golden" / "seed"


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_render_dynamic_batching_writes_delay_and_no_queue_policy_when_parsed() -> None:
    batching = parse(render_dynamic_batching(DynamicBatching(10_000))).dynamic_batching
    assert batching.max_queue_delay_microseconds == 10_000
    assert not batching.HasField("default_queue_policy")  # see DynamicBatching: Triton 2.51 stalls bursts with one


def test_render_instance_group_lists_gpus_when_device_names_them() -> None:
    (group,) = parse(render_instance_group(InstanceGroup(2, "KIND_GPU", (0, 3)))).instance_group
    assert group.count == 2
    assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert list(group.gpus) == [0, 3]


def test_render_instance_group_omits_gpus_when_on_cpu() -> None:
    (group,) = parse(render_instance_group(InstanceGroup(4, "KIND_CPU"))).instance_group
    assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU and not group.gpus


def test_render_tensors_marks_optional_inputs_when_parsed() -> None:
    text = render_tensors("input", (Tensor("a", "STRING", (1,)), Tensor("b", "INT32", (-1, 4), optional=True)))
    first, second = parse(text).input
    assert (first.name, first.data_type, list(first.dims), first.optional) == (
        "a", model_config_pb2.TYPE_STRING, [1], False
    )
    assert (second.data_type, list(second.dims), second.optional) == (model_config_pb2.TYPE_INT32, [-1, 4], True)


def test_render_model_warmup_feeds_every_input_zeroes_when_parsed() -> None:
    text = render_model_warmup((Tensor("query", "STRING", (1,)), Tensor("document", "STRING", (1,))))
    (warmup,) = parse(text).model_warmup
    assert warmup.batch_size == 1
    assert set(warmup.inputs) == {"query", "document"}
    assert warmup.inputs["query"].zero_data and list(warmup.inputs["query"].dims) == [1]


def test_render_parameters_escapes_values_when_they_hold_quotes() -> None:
    config = parse(render_parameters({"b": 'say "hi"\\', "a": "1"}))
    assert config.parameters["b"].string_value == 'say "hi"\\'
    assert config.parameters["a"].string_value == "1"


def test_render_repository_maps_every_knob_when_compiling_the_seed() -> None:
    files = render_repository(build_plan(DATA / "seed_config.yaml").plan)
    embedding = parse(files["embedding_service/config.pbtxt"])
    assert embedding.max_batch_size == 64
    # An encoder's queue is the gateway's: Triton holds nothing and has no queue policy (prefetching stays on).
    assert embedding.dynamic_batching.max_queue_delay_microseconds == 0
    assert not embedding.dynamic_batching.HasField("default_queue_policy")
    routes = json.loads(files["sluice.json"])["services"]
    assert (routes["embedding_service"]["batch_timeout"], routes["embedding_service"]["max_queue_size"]) == (0.01, 500)
    assert routes["embedding_service"]["instances"] == 4
    assert embedding.parameters["queue_timeout_us"].string_value == "50000"
    assert embedding.instance_group[0].count == 4
    assert not embedding.HasField("response_cache")  # it would cache error responses as empty answers
    assert embedding.parameters["inference_timeout_s"].string_value == "0.3"
    assert not LLM_ONLY & set(embedding.parameters)  # an encoder's queue is the gateway's, not its runtime's
    reranker = parse(files["reranker_service/config.pbtxt"])
    assert (reranker.max_batch_size, reranker.instance_group[0].count) == (16, 2)
    assert not reranker.HasField("response_cache")
    assert not LLM_ONLY & set(reranker.parameters)
    llm = parse(files["llm_service/config.pbtxt"])
    assert llm.max_batch_size == 4
    # The LLM's queue is its engine's: Triton hands each request to execute at once, and the engine reads its knobs.
    assert llm.dynamic_batching.max_queue_delay_microseconds == 0
    assert not llm.dynamic_batching.HasField("default_queue_policy")
    engine = {key: llm.parameters[key].string_value for key in LLM_ONLY}
    assert engine == {
        "batch_size": "4", "batch_timeout_us": "50000", "max_queue_size": "50", "default_max_tokens": "256"
    }
    assert llm.model_transaction_policy.decoupled is True
    assert llm.parameters["queue_timeout_us"].string_value == "200000"
    assert llm.parameters["inference_timeout_s"].string_value == "2"
    assert not llm.model_warmup and embedding.model_warmup[0].inputs["text"].zero_data
    assert {t.name for t in llm.input if t.optional} == {t.name for t in llm.input}


def test_render_repository_matches_golden_files_when_compiling_the_seed() -> None:
    files = render_repository(build_plan(DATA / "seed_config.yaml").plan)
    wanted = {name: text for name, text in files.items() if name.endswith(".pbtxt") or name == "sluice.json"}
    if os.environ.get("SLUICE_UPDATE_GOLDEN"):
        for name, text in wanted.items():
            (GOLDEN / name).parent.mkdir(parents=True, exist_ok=True)
            (GOLDEN / name).write_text(text, encoding="utf-8")
    golden = {
        str(p.relative_to(GOLDEN)): p.read_text(encoding="utf-8") for p in GOLDEN.rglob("*") if p.is_file()
    }
    assert golden.keys() == wanted.keys()
    for name, text in wanted.items():
        assert text == golden[name], f"{name} differs from its golden copy (SLUICE_UPDATE_GOLDEN=1 rewrites)"


def test_render_repository_fills_type_defaults_when_a_service_names_only_its_model(tmp_path: Path) -> None:
    from tests.helpers import write_yaml

    config = write_yaml(tmp_path, {
        "models": {"r": {"type": "reranker", "model_name": "x"}, "l": {"type": "llm", "model_name": "y"}},
        "services": {"rerank": {"model": "r"}, "chat": {"model": "l", "runtime": {"batch_size": 2}}},
    })
    files = render_repository(build_plan(config).plan)
    rerank = parse(files["rerank/config.pbtxt"])
    assert rerank.max_batch_size == 16 and rerank.instance_group[0].count == 2
    assert json.loads(files["sluice.json"])["services"]["rerank"]["batch_timeout"] == 0.02
    chat = parse(files["chat/config.pbtxt"])
    assert chat.max_batch_size == 2  # overridden
    assert chat.parameters["batch_size"].string_value == "2"
    assert chat.parameters["max_queue_size"].string_value == "50"  # llm default
    assert chat.parameters["batch_timeout_us"].string_value == "50000"  # llm default
    assert not chat.dynamic_batching.HasField("default_queue_policy")


@pytest.mark.parametrize("name", ["seed_config.yaml", "seed_config.py"])
def test_build_plan_warns_about_queues_that_never_bind_when_compiling_the_seed(name: str) -> None:
    compiled = build_plan(DATA / name)
    unbound = [w for w in compiled.warnings if w.path.endswith("max_queue_size")]
    assert len(unbound) == 3
    assert any("100 * 0.5 = 50" in w.message for w in unbound)


def test_build_plan_warns_about_workers_beyond_cores_when_service_is_on_cpu() -> None:
    from compiler.check import check

    compiled = build_plan(DATA / "seed_config.yaml")
    config = compiled.plan.config
    runtimes = {service.name: service.runtime for service in compiled.plan.services}
    findings = check(config, runtimes, cpu_count=2)
    paths = {w.path for w in findings.warnings}
    assert "services.embedding_service.runtime.worker_count" in paths
    assert "services.reranker_service.runtime.worker_count" not in paths


def test_build_plan_warns_that_only_the_first_llm_batch_is_capped_when_batch_size_exceeds_max_queue_size(
    tmp_path: Path,
) -> None:
    from tests.helpers import write_yaml

    runtime = {"batch_size": 8, "max_queue_size": 4}
    config = write_yaml(tmp_path, {
        "models": {"e": {"type": "embedding", "model_name": "x"}, "l": {"type": "llm", "model_name": "y"}},
        "services": {"embed": {"model": "e", "runtime": runtime}, "chat": {"model": "l", "runtime": runtime}},
    })
    said = {w.path: w.message for w in build_plan(config).warnings if w.path.endswith("batch_size")}
    assert "full batches can never form" in said["services.embed.runtime.batch_size"]
    # The engine admits waiting requests at every decode step: its running batch still fills.
    assert "more join at later decode steps" in said["services.chat.runtime.batch_size"]
