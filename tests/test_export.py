"""compiler/export.py: ONNX exports checked against PyTorch, the content-keyed cache, and model resolution.

The real all-MiniLM-L6-v2 is exported once per session (about 10 s); everything else uses tiny random BERTs built
here in a second.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub: never reach a hub

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from compiler import export_check
from compiler.export import (
    cache_key,
    detect_reranker_kind,
    export_cached,
    export_cross_encoder,
    export_embedding,
    resolve_model_dir,
)
from compiler.export_source import read_pooling
from sluice.demo_models import minilm_source
from sluice.errors import CompileError

TEXTS = [
    "Hi.",
    "Sluice compiles one config file into a Triton model repository.",
    "Embedding models turn each text into a vector; texts that mean similar things get vectors pointing the "
    "same way, which is what semantic search and reranking by cosine similarity rely on.",
]
PAIRS = [
    ("what is triton?", "Triton Inference Server serves models over HTTP and gRPC."),
    ("weather", "It rained."),
    ("a longer query about batching many requests together", "Dynamic batching groups requests."),
]
BERT_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def _tiny_bert(out: Path, *, cross_encoder: bool = False, num_labels: int = 1, seed: int = 0) -> Path:
    """A 1-layer BERT (random weights, MiniLM's tokenizer): exports in about a second."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    # initializer_range 0.2: outputs spread over a few units, so a wrong graph shows up above the tolerances.
    config = BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, initializer_range=0.2
    )
    torch.manual_seed(seed)
    if cross_encoder:
        config.num_labels = num_labels
        BertForSequenceClassification(config).save_pretrained(out)
    else:
        BertModel(config).save_pretrained(out)
    for name in BERT_TOKENIZER_FILES:
        shutil.copyfile(minilm_source() / name, out / name)
    return out


def _with_pooling(model_dir: Path, mode: str) -> Path:
    (model_dir / "1_Pooling").mkdir(exist_ok=True)
    (model_dir / "1_Pooling" / "config.json").write_text(json.dumps({f"pooling_mode_{mode}": True}))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (model_dir / "modules.json").write_text(json.dumps(modules))
    return model_dir


def _run_onnx(export_dir: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return np.asarray(session.run(None, {name: feeds[name].astype(np.int64) for name in names})[0])


def _tokenize(model_dir: Path, *texts: list[str]) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return dict(tokenizer(*texts, padding=True, truncation=True, max_length=128, return_tensors="np"))


@pytest.fixture(scope="session")
def minilm_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("minilm-onnx")
    export_embedding(minilm_source(), out, max_length=256)
    return out


@pytest.fixture(scope="session")
def tiny_cross_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_bert(tmp_path_factory.mktemp("tiny-ce"), cross_encoder=True)


def test_export_embedding_matches_sentence_transformers_when_texts_differ_in_length(minilm_export: Path) -> None:
    from sentence_transformers import SentenceTransformer

    expected = SentenceTransformer(str(minilm_source()), device="cpu", local_files_only=True).encode(TEXTS)
    ours = _run_onnx(minilm_export, _tokenize(minilm_source(), TEXTS))  # one padded batch
    cosines = np.sum(ours * expected, axis=1) / np.linalg.norm(expected, axis=1)
    assert ours.shape == (3, 384)
    assert cosines.min() >= 0.9999, cosines
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_export_embedding_writes_named_dynamic_graph_and_tokenizer_when_exported(minilm_export: Path) -> None:
    graph = onnx.load(str(minilm_export / "model.onnx"), load_external_data=False).graph
    output_dims = [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim]
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.INT64 for i in graph.input)
    assert (graph.output[0].name, output_dims) == ("embedding", ["batch", 384])
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "config.json"):
        assert (minilm_export / name).is_file(), name
    manifest = json.loads((minilm_export / "export.json").read_text())
    assert (manifest["pooling"], manifest["normalized"], manifest["max_length"]) == ("mean", True, 256)


def test_export_cross_encoder_matches_pytorch_logits_when_pairs_differ_in_length(
    tiny_cross_encoder: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForSequenceClassification

    report = export_cross_encoder(tiny_cross_encoder, tmp_path, max_length=128)
    feeds = _tokenize(tiny_cross_encoder, [q for q, _ in PAIRS], [d for _, d in PAIRS])
    model = AutoModelForSequenceClassification.from_pretrained(tiny_cross_encoder, local_files_only=True).eval()
    with torch.no_grad():
        expected = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits[:, 0].numpy()
    scores = _run_onnx(tmp_path, feeds)
    assert (report.output_name, scores.shape) == ("score", (3,))
    assert np.ptp(expected) > 0.1  # the scores differ enough for the comparison to mean something
    np.testing.assert_allclose(scores, expected, atol=1e-3)


def test_export_cross_encoder_scores_log_odds_when_head_has_two_labels(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    model_dir = _tiny_bert(tmp_path / "model", cross_encoder=True, num_labels=2)
    export_cross_encoder(model_dir, tmp_path / "onnx", max_length=64)
    feeds = _tokenize(model_dir, [q for q, _ in PAIRS], [d for _, d in PAIRS])
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True).eval()
    with torch.no_grad():
        logits = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    np.testing.assert_allclose(_run_onnx(tmp_path / "onnx", feeds), logits[:, 1] - logits[:, 0], atol=1e-3)


def test_export_cross_encoder_raises_compile_error_when_head_has_three_labels(tmp_path: Path) -> None:
    model_dir = _tiny_bert(tmp_path / "model", cross_encoder=True, num_labels=3)
    with pytest.raises(CompileError, match="has 3"):
        export_cross_encoder(model_dir, tmp_path / "onnx", max_length=64)


@pytest.mark.parametrize("mode", ["cls", "max"])
def test_export_embedding_pools_as_configured_when_modules_name_pooling(mode: str, tmp_path: Path) -> None:
    from transformers import AutoModel

    model_dir = _with_pooling(_tiny_bert(tmp_path / "model"), {"cls": "cls_token", "max": "max_tokens"}[mode])
    report = export_embedding(model_dir, tmp_path / "onnx", max_length=64)
    feeds = _tokenize(model_dir, TEXTS)
    model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    with torch.no_grad():
        hidden = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    if mode == "cls":
        pooled = hidden[:, 0]
    else:
        pooled = np.where(feeds["attention_mask"][..., None] == 1, hidden, -np.inf).max(axis=1)
    expected = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    assert report.pooling == mode
    np.testing.assert_allclose(_run_onnx(tmp_path / "onnx", feeds), expected, atol=1e-4)


def test_export_embedding_writes_identical_bytes_when_exported_twice(tmp_path: Path) -> None:
    model_dir = _tiny_bert(tmp_path / "model")
    export_embedding(model_dir, tmp_path / "a", max_length=64)
    export_embedding(model_dir, tmp_path / "b", max_length=64)
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (tmp_path / "b" / "model.onnx").read_bytes()


def test_export_embedding_raises_compile_error_when_max_length_exceeds_positions(tmp_path: Path) -> None:
    with pytest.raises(CompileError, match="max_length 4096"):
        export_embedding(_tiny_bert(tmp_path / "model"), tmp_path / "onnx", max_length=4096)


def test_export_cached_returns_same_path_without_reexport_when_called_again(
    tiny_cross_encoder: Path, tmp_path: Path
) -> None:
    first_log: list[str] = []
    second_log: list[str] = []
    first, first_hit = export_cached(
        "cross_encoder", tiny_cross_encoder, max_length=64, cache_root=tmp_path, progress=first_log.append
    )
    mtime = (first / "model.onnx").stat().st_mtime_ns
    second, second_hit = export_cached(
        "cross_encoder", tiny_cross_encoder, max_length=64, cache_root=tmp_path, progress=second_log.append
    )
    assert (first_hit, second_hit) == (False, True)
    assert second == first
    assert any("exporting" in line for line in first_log)
    assert not any("exporting" in line or "loading" in line for line in second_log)
    assert (second / "model.onnx").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]  # no staging directory left behind


def test_cache_key_changes_when_weights_or_settings_change(tmp_path: Path) -> None:
    model_dir = _tiny_bert(tmp_path / "model")
    key = cache_key("embedding", model_dir, max_length=64)
    assert cache_key("embedding", model_dir, max_length=64) == key
    assert cache_key("embedding", model_dir, max_length=128) != key
    assert cache_key("cross_encoder", model_dir, max_length=64) != key
    _tiny_bert(model_dir, seed=1)  # same files, other weights
    assert cache_key("embedding", model_dir, max_length=64) != key


def test_check_embeddings_raises_compile_error_when_graph_disagrees_with_reference(minilm_export: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(minilm_source(), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_source(), local_files_only=True)

    def cls_reference(batch: dict[str, torch.Tensor]) -> torch.Tensor:  # the graph mean-pools
        return model(**batch).last_hidden_state[:, 0]

    batches = export_check.embedding_batches(tokenizer, ["input_ids", "attention_mask", "token_type_ids"], 64)
    with pytest.raises(CompileError, match=r"min row cosine 0\.\d+ over 4 rows, required >= 0.9999"):
        export_check.check_embeddings(minilm_export / "model.onnx", cls_reference, batches)


def test_export_cached_raises_compile_error_and_caches_nothing_when_check_fails(
    tiny_cross_encoder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_check, "SCORE_MAX_ABS_DIFF", -1.0)  # no graph can pass
    with pytest.raises(CompileError, match=r"max abs diff [0-9.e-]+ over 4 rows, required <= -1.0"):
        export_cached("cross_encoder", tiny_cross_encoder, max_length=64, cache_root=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_detect_reranker_kind_says_cross_encoder_when_architecture_classifies(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["XLMRobertaForSequenceClassification"]}))
    assert detect_reranker_kind(tmp_path) == "cross_encoder"


def test_detect_reranker_kind_says_cosine_when_model_is_plain_encoder() -> None:
    assert detect_reranker_kind(minilm_source()) == "cosine"


def test_read_pooling_defaults_to_mean_when_model_has_no_sentence_transformers_config(tmp_path: Path) -> None:
    assert read_pooling(tmp_path) == "mean"


def test_read_pooling_raises_compile_error_when_pipeline_has_dense_layer(tmp_path: Path) -> None:
    modules = [{"path": "2_Dense", "type": "sentence_transformers.models.Dense"}]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(CompileError, match="Dense"):
        read_pooling(tmp_path)


def test_resolve_model_dir_finds_directory_when_path_is_relative_to_config(tmp_path: Path) -> None:
    (tmp_path / "models" / "m").mkdir(parents=True)
    assert resolve_model_dir("models/m", tmp_path) == (tmp_path / "models" / "m").resolve()


def test_resolve_model_dir_raises_compile_error_naming_model_when_not_found_locally(tmp_path: Path) -> None:
    with pytest.raises(CompileError, match=r"'acme/no-such-model' was not found locally"):
        resolve_model_dir("acme/no-such-model", tmp_path, hf_cache_dir=tmp_path / "hf")


def test_resolve_model_dir_finds_snapshot_when_hub_id_is_in_local_cache(tmp_path: Path) -> None:
    repo = tmp_path / "hf" / "models--acme--tiny"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    assert resolve_model_dir("acme/tiny", tmp_path / "configs", hf_cache_dir=tmp_path / "hf") == snapshot
