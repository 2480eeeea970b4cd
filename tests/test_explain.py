"""`sluice explain` and the README's knob table say what each knob really does, from one function."""

from __future__ import annotations

import os
from pathlib import Path

from compiler.explain import knob_table_markdown
from compiler.pipeline import build_plan
from compiler.plan import enforcement

README = Path(__file__).parent.parent / "README.md"
DATA = Path(__file__).parent / "data"
BEGIN, END = "generated from compiler/plan.py enforcement()", "<!-- end of knob table -->"


def rows_of(service: str) -> dict[str, tuple[str, str]]:
    plan = next(s for s in build_plan(DATA / "seed_config.yaml").plan.services if s.name == service)
    return {row.knob: (row.where, row.what) for row in enforcement(plan)}


def test_readme_knob_table_is_enforcement_output_when_either_changes() -> None:
    text = README.read_text(encoding="utf-8")
    start = text.index("\n", text.index(BEGIN)) + 1
    end = text.index(END)
    if os.environ.get("SLUICE_UPDATE_GOLDEN"):
        README.write_text(text[:start] + knob_table_markdown() + text[end:], encoding="utf-8")
        text = README.read_text(encoding="utf-8")
        end = text.index(END)
    assert text[start:end] == knob_table_markdown(), "README knob table is stale (SLUICE_UPDATE_GOLDEN=1 rewrites)"


def test_explain_says_the_runtime_stops_the_onnx_run_when_an_encoder_passes_inference_timeout() -> None:
    for service in ("embedding_service", "reranker_service"):
        where, what = rows_of(service)["inference_timeout"]
        assert where == "gateway+runtime"
        assert "the runtime stops a batch" in what and "sluice_runs_stopped_total" in what


def test_explain_says_the_engine_stops_generating_when_the_llm_passes_inference_timeout() -> None:
    where, what = rows_of("llm_service")["inference_timeout"]
    assert where == "gateway+runtime"
    assert "starts generating" in what and "finish_reason timeout" in what


def test_explain_says_nothing_is_cached_when_an_llm_service_enables_the_cache() -> None:
    where, what = rows_of("llm_service")["enable_cache"]
    assert where == "none" and "never cached" in what


def test_explain_says_an_encoder_request_past_queue_timeout_is_refused_uncomputed() -> None:
    for service in ("embedding_service", "reranker_service"):
        where, what = rows_of(service)["queue_timeout"]
        assert where == "gateway+runtime" and "sluice_start_by_us" in what and "503" in what


def test_explain_says_an_encoder_queue_lives_in_the_gateway_when_it_has_max_queue_size_and_batch_timeout() -> None:
    rows = rows_of("embedding_service")
    assert rows["max_queue_size"][0] == rows["batch_timeout"][0] == "gateway"


def test_explain_says_the_llm_queue_lives_in_its_engine_when_it_has_batch_and_queue_knobs() -> None:
    rows = rows_of("llm_service")
    assert rows["batch_size"][0] == rows["batch_timeout"][0] == rows["max_queue_size"][0] == "runtime"
    assert "Exceeds maximum queue size" in rows["max_queue_size"][1] and "Retry-After" in rows["max_queue_size"][1]
    assert "only when the engine is idle" in rows["batch_timeout"][1]
    assert "engine of its own" in rows["worker_count"][1]


def test_explain_says_an_llm_request_past_queue_timeout_is_refused_by_the_engine() -> None:
    where, what = rows_of("llm_service")["queue_timeout"]
    assert where == "gateway+runtime"
    assert "Request timeout expired" in what and "sluice_start_by_us" in what


def test_explain_uses_only_known_places_when_saying_where_a_knob_is_enforced() -> None:
    places = {"triton", "gateway", "runtime", "triton+gateway", "gateway+runtime", "none"}
    for service in ("embedding_service", "reranker_service", "llm_service"):
        assert {where for where, _ in rows_of(service).values()} <= places
