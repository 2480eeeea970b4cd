"""Rendered config.pbtxt: each section parses into Triton's ModelConfig; the seed's files match golden copies."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from compiler.pipeline import build_plan
from compiler.plan import DynamicBatching, InstanceGroup, QueuePolicy
from compiler.render import (
    render_dynamic_batching,
    render_instance_group,
    render_model_warmup,
    render_parameters,
    render_repository,
    render_tensors,
)
from runtimes.signatures import Tensor

DATA = Path(__file__).parent / "data"
GOLDEN = Path(__file__).parent / "golden" / "seed"


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_render_dynamic_batching_sets_delay_and_queue_policy_when_parsed() -> None:
    text = render_dynamic_batching(DynamicBatching(10_000, QueuePolicy(500)))
    batching = parse(text).dynamic_batching
    assert batching.max_queue_delay_microseconds == 10_000
    policy = batching.default_queue_policy
    assert policy.max_queue_size == 500
    assert policy.default_timeout_microseconds == 0  # see QueuePolicy: Triton 2.51 mis-schedules with one
    assert policy.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT
    assert policy.allow_timeout_override is True


def test_render_dynamic_batching_writes_no_queue_policy_when_the_plan_has_none() -> None:
    batching = parse(render_dynamic_batching(DynamicBatching(0, None))).dynamic_batching
    assert batching.max_queue_delay_microseconds == 0
    assert not batching.HasField("default_queue_policy")


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
    reranker = parse(files["reranker_service/config.pbtxt"])
    assert (reranker.max_batch_size, reranker.instance_group[0].count) == (16, 2)
    assert not reranker.HasField("response_cache")
    llm = parse(files["llm_service/config.pbtxt"])
    assert llm.max_batch_size == 4
    assert llm.dynamic_batching.max_queue_delay_microseconds == 50_000
    assert llm.dynamic_batching.default_queue_policy.max_queue_size == 50
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
    assert chat.dynamic_batching.default_queue_policy.max_queue_size == 50  # llm default


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
