"""Invalid configs: each fails with an error naming the right path, the value found and what was expected."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from compiler.pipeline import build_plan
from sluice.errors import ConfigError
from tests.helpers import config_with, write_yaml

LLM = {"models.emb": {"type": "llm", "model_name": "tiny"}}
RUNTIME = "services.svc.runtime"

# (case id, changes to the minimal config, path the error must name, words the message must contain)
INVALID: list[tuple[str, dict[str, Any], str, str]] = [
    ("zero batch", {f"{RUNTIME}.batch_size": 0}, f"{RUNTIME}.batch_size", "greater than 0, found 0"),
    ("negative batch", {f"{RUNTIME}.batch_size": -4}, f"{RUNTIME}.batch_size", "found -4"),
    ("string batch", {f"{RUNTIME}.batch_size": "4"}, f"{RUNTIME}.batch_size", "valid integer, found '4'"),
    ("float workers", {f"{RUNTIME}.worker_count": 1.5}, f"{RUNTIME}.worker_count", "found 1.5"),
    ("zero batch timeout", {f"{RUNTIME}.batch_timeout": 0}, f"{RUNTIME}.batch_timeout", "greater than 0"),
    ("nan queue timeout", {f"{RUNTIME}.queue_timeout": float("nan")}, f"{RUNTIME}.queue_timeout", "finite"),
    ("negative rate", {f"{RUNTIME}.rate_limit": -5}, f"{RUNTIME}.rate_limit", "found -5"),
    ("string cache flag", {f"{RUNTIME}.enable_cache": "yes"}, f"{RUNTIME}.enable_cache", "valid boolean"),
    ("typo knob", {f"{RUNTIME}.batchsize": 8}, f"{RUNTIME}.batchsize", "did you mean 'batch_size'"),
    ("typo section", {"servers": {}}, "servers", "did you mean 'server'"),
    ("unknown model ref", {"services.svc.model": "nope"}, "services.svc.model", "unknown model 'nope'; models: emb"),
    ("bad model type", {"models.emb.type": "vision"}, "models.emb.type", "found 'vision'"),
    ("missing model type", {"models.emb.type": ...}, "models.emb.type", "required but missing"),
    ("missing model name", {"models.emb.model_name": ...}, "models.emb.model_name", "required but missing"),
    ("bad device", {"models.emb.device": "tpu"}, "models.emb.device", "cpu, gpu or gpu:<ids>"),
    ("knob of another type", {"models.emb.max_tokens": 10}, "models.emb.max_tokens", "unknown key"),
    ("zero llm max_tokens", {**LLM, "models.emb.max_tokens": 0}, "models.emb.max_tokens", "greater than 0"),
    ("no services", {"services": {}}, "services", "at least 1 item"),
    ("bad service name", {"services": {"a/b": {"model": "emb"}}}, "services.a/b", "letters, digits"),
    (
        "batch timeout not below queue timeout",
        {f"{RUNTIME}.batch_timeout": 0.2, f"{RUNTIME}.queue_timeout": 0.2},
        f"{RUNTIME}.batch_timeout",
        "must be below queue_timeout",
    ),
    (
        "total timeout too short",
        {f"{RUNTIME}.queue_timeout": 0.1, f"{RUNTIME}.inference_timeout": 0.5, f"{RUNTIME}.total_timeout": 0.5},
        f"{RUNTIME}.total_timeout",
        "queue_timeout + inference_timeout",
    ),
    ("port out of range", {"server.http_port": 70000}, "server.http_port", "less than or equal to 65535"),
    ("port collision", {"gateway.port": 8001}, "gateway.port", "already used by server.grpc_port"),
    ("open gateway without keys", {"gateway.host": "0.0.0.0"}, "gateway.host", "without gateway.api_keys"),
    ("short api key", {"gateway.api_keys": ["abc"]}, "gateway.api_keys.0", "at least 16 characters"),
]


@pytest.mark.parametrize(("changes", "path", "words"), [case[1:] for case in INVALID], ids=[c[0] for c in INVALID])
def test_build_plan_names_the_path_when_config_is_invalid(
    tmp_path: Path, changes: dict[str, Any], path: str, words: str
) -> None:
    config = write_yaml(tmp_path, config_with(changes))
    with pytest.raises(ConfigError) as caught:
        build_plan(config)
    messages = {issue.path: issue.message for issue in caught.value.issues}
    assert path in messages, f"expected an error at {path}, got {messages}"
    assert words in messages[path]


def test_build_plan_reports_every_error_when_a_file_has_several(tmp_path: Path) -> None:
    config = write_yaml(tmp_path, config_with({
        f"{RUNTIME}.batch_size": 0,
        f"{RUNTIME}.rate_limit": "fast",
        "models.emb.device": "tpu",
        "services.other": {"model": "missing"},
    }))
    with pytest.raises(ConfigError) as caught:
        build_plan(config)
    paths = {issue.path for issue in caught.value.issues}
    assert paths == {
        f"{RUNTIME}.batch_size", f"{RUNTIME}.rate_limit", "models.emb.device", "services.other.model"
    }
    assert str(config) in str(caught.value) and "4 errors" in str(caught.value)


def test_build_plan_reports_every_cross_field_error_when_several_services_break_rules(tmp_path: Path) -> None:
    config = write_yaml(tmp_path, config_with({
        f"{RUNTIME}.batch_timeout": 1.0,
        "services.two": {"model": "emb", "runtime": {"total_timeout": 0.1}},
    }))
    with pytest.raises(ConfigError) as caught:
        build_plan(config)
    assert {issue.path for issue in caught.value.issues} == {
        f"{RUNTIME}.batch_timeout", "services.two.runtime.total_timeout"
    }


def test_load_rejects_the_file_when_yaml_repeats_a_key(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("models: {}\nservices: {}\nmodels: {}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="duplicate key 'models'"):
        build_plan(config)


def test_load_rejects_the_file_when_yaml_is_malformed(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("models: [\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_plan(config)


def test_load_names_the_file_line_and_column_when_yaml_is_malformed(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("models:\n  emb:\n    type: [embedding,\n  services: {}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        build_plan(config)
    (issue,) = caught.value.issues
    assert issue.path == f"{config}:5:1"  # the end of the file, where the unclosed sequence was still open
    assert "expected ',' or ']'" in issue.message and "started at line 3, column 11" in issue.message
    assert "<unicode string>" not in str(caught.value)


def test_load_names_the_line_when_yaml_repeats_a_key(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("models: {}\nservices: {}\nmodels: {}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        build_plan(config)
    assert [issue.path for issue in caught.value.issues] == [f"{config}:3:1"]


def test_build_plan_names_the_flat_key_when_config_py_is_invalid(tmp_path: Path) -> None:
    config = tmp_path / "config.py"
    config.write_text(
        'LLM_SERVICE_CONFIG = {"llm_model_name": "", "batch_size": 0, "batchsize": 1}\n'
        'FOO_SERVICE_CONFIG = {"foo_model_name": "x"}\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as caught:
        build_plan(config)
    paths = {issue.path for issue in caught.value.issues}
    assert paths == {
        "LLM_SERVICE_CONFIG.llm_model_name",
        "LLM_SERVICE_CONFIG.batch_size",
        "LLM_SERVICE_CONFIG.batchsize",
        "FOO_SERVICE_CONFIG.type",
    }


def test_load_reports_the_exception_when_config_py_fails_to_run(tmp_path: Path) -> None:
    config = tmp_path / "config.py"
    config.write_text("raise RuntimeError('boom')\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="boom"):
        build_plan(config)
