"""Embedding and reranker models -> ONNX directories the Triton Python-backend runtimes open with onnxruntime.

Each export directory holds ``model.onnx``, the tokenizer files (so the runtime never needs a hub) and
``export.json`` (what the graph takes and returns). Graphs:

- embedding: ``input_ids``, ``attention_mask`` [, ``token_type_ids``] int64 [batch, sequence] -> ``embedding``
  float32 [batch, dim]; pooling from the model's sentence-transformers config (mean when it has none), then L2
  normalisation, always: the cosine reranker and OpenAI-style clients rely on unit vectors, and for a model trained
  without Normalize it changes only vector lengths, never cosine similarities or rankings.
- cross_encoder: the same inputs, one (query, document) pair a row -> ``score`` float32 [batch]: the logit when
  num_labels == 1, the log-odds logit[1] - logit[0] when 2 (a binary relevant/irrelevant head); more is refused.

Every export is checked against PyTorch before it is kept (compiler.export_check). Exports are cached by content
(``export_cached``). torch and transformers are imported only when an export actually runs, so a compile whose
exports are all cached never pays for them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from compiler.export_source import (
    TOKENIZER_FILES,
    PoolingMode,
    detect_reranker_kind,
    model_label,
    read_config,
    read_pooling,
    resolve_model_dir,
    source_files,
)
from sluice.errors import CompileError

if TYPE_CHECKING:
    import torch

__all__ = [
    "EXPORT_VERSION",
    "ExportKind",
    "ExportReport",
    "cache_key",
    "detect_reranker_kind",
    "export_cached",
    "export_cross_encoder",
    "export_embedding",
    "resolve_model_dir",
]

# Bump whenever a change here or in export_graph / export_check / export_source could change an exported file:
# it is part of every cache key, so old cache entries are then ignored rather than served.
EXPORT_VERSION = 1
OPSET = 17
MODEL_FILE, MANIFEST_FILE = "model.onnx", "export.json"

ExportKind = Literal["embedding", "cross_encoder"]
Progress = Callable[[str], None]
_TRACE_TEXTS = ("hello world", "a somewhat longer example sentence to trace the graph with")


@dataclass(frozen=True)
class ExportReport:
    """What one export produced and how long its steps took (seconds, by step: load, export, check)."""

    kind: ExportKind
    out_dir: Path
    input_names: tuple[str, ...]
    output_name: str
    output_shape: tuple[str | int, ...]
    max_length: int
    pooling: PoolingMode | None
    normalized: bool
    check: str
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def onnx_path(self) -> Path:
        return self.out_dir / MODEL_FILE

    def manifest(self) -> dict[str, Any]:
        """The export.json contents: only settings, no timings or figures, so equal exports give equal files."""
        data = asdict(self)
        for volatile in ("out_dir", "seconds", "check"):
            data.pop(volatile)
        return {"export_version": EXPORT_VERSION, "opset": OPSET, **data}


def export_embedding(
    model_dir: Path, out_dir: Path, *, max_length: int, progress: Progress | None = None
) -> ExportReport:
    """Export a sentence-embedding model (a BERT-like AutoModel) to ``out_dir``; see the module docstring."""
    from transformers import AutoModel

    from compiler import export_check, export_graph

    say = progress or _silent
    pooling = read_pooling(model_dir)
    steps: dict[str, float] = {}
    with _timed(steps, "load"):
        say(f"loading {model_label(model_dir)}")
        model, tokenizer = _load(AutoModel, model_dir, max_length)
        input_names = _input_names(model, tokenizer)
        graph = export_graph.EmbeddingGraph(model, pooling).eval()
        example = _encode(tokenizer, input_names, (list(_TRACE_TEXTS),))
    with _timed(steps, "export"):
        say(f"exporting {model_label(model_dir)} to ONNX")
        dim = int(_run(graph, example).shape[-1])
        out_dir.mkdir(parents=True, exist_ok=True)
        export_graph.write_onnx(graph, example, export_graph.EMBEDDING_OUTPUT, (dim,), out_dir / MODEL_FILE, OPSET)

    def reference(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        # The model's own forward with the plain 2D mask: transformers' masking, not the graph's.
        hidden = model(**batch).last_hidden_state
        pooled = export_graph.pool(hidden, batch[export_graph.ATTENTION_MASK], pooling)
        return export_graph.normalize(pooled)

    with _timed(steps, "check"):
        say(f"checking {model_label(model_dir)} ONNX against PyTorch")
        batches = export_check.embedding_batches(tokenizer, input_names, max_length)
        check = export_check.check_embeddings(out_dir / MODEL_FILE, reference, batches)
    report = ExportReport(
        kind="embedding",
        out_dir=out_dir,
        input_names=input_names,
        output_name=export_graph.EMBEDDING_OUTPUT,
        output_shape=("batch", dim),
        max_length=max_length,
        pooling=pooling,
        normalized=True,
        check=str(check),
        seconds=steps,
    )
    _finish(model_dir, out_dir, tokenizer, report)
    return report


def export_cross_encoder(
    model_dir: Path, out_dir: Path, *, max_length: int, progress: Progress | None = None
) -> ExportReport:
    """Export a ``*ForSequenceClassification`` model to ``out_dir``; see the module docstring."""
    from transformers import AutoModelForSequenceClassification

    from compiler import export_check, export_graph

    say = progress or _silent
    num_labels = _num_labels(model_dir)
    steps: dict[str, float] = {}
    with _timed(steps, "load"):
        say(f"loading {model_label(model_dir)}")
        model, tokenizer = _load(AutoModelForSequenceClassification, model_dir, max_length)
        input_names = _input_names(model, tokenizer)
        graph = export_graph.ScoreGraph(model, num_labels).eval()
        queries, documents = zip(*[(text, text[::-1]) for text in _TRACE_TEXTS], strict=True)
        example = _encode(tokenizer, input_names, (list(queries), list(documents)))
    with _timed(steps, "export"):
        say(f"exporting {model_label(model_dir)} to ONNX")
        out_dir.mkdir(parents=True, exist_ok=True)
        export_graph.write_onnx(graph, example, export_graph.SCORE_OUTPUT, (), out_dir / MODEL_FILE, OPSET)

    def reference(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return export_graph.relevance(model(**batch).logits, num_labels)

    with _timed(steps, "check"):
        say(f"checking {model_label(model_dir)} ONNX against PyTorch")
        batches = export_check.pair_batches(tokenizer, input_names, max_length)
        check = export_check.check_scores(out_dir / MODEL_FILE, reference, batches)
    report = ExportReport(
        kind="cross_encoder",
        out_dir=out_dir,
        input_names=input_names,
        output_name=export_graph.SCORE_OUTPUT,
        output_shape=("batch",),
        max_length=max_length,
        pooling=None,
        normalized=False,
        check=str(check),
        seconds=steps,
    )
    _finish(model_dir, out_dir, tokenizer, report)
    return report


_EXPORTERS: dict[str, Callable[..., ExportReport]] = {
    "embedding": export_embedding,
    "cross_encoder": export_cross_encoder,
}


def export_cached(
    kind: ExportKind, model_dir: Path, *, max_length: int, cache_root: Path, progress: Progress | None = None
) -> tuple[Path, bool]:
    """The export directory for ``model_dir`` (exporting it on a miss) and whether it was a cache hit.

    Entries live at ``cache_root/<kind>-<key>``, key = sha256 of the model's weight, config and tokenizer bytes,
    the export settings, EXPORT_VERSION and the torch/transformers versions. An entry is built in a temporary
    directory beside it and renamed into place, so a crash never leaves a half entry under a real key.
    """
    if kind not in _EXPORTERS:
        raise CompileError(f"unknown export kind {kind!r}; expected one of {sorted(_EXPORTERS)}")
    key = cache_key(kind, model_dir, max_length=max_length)
    final = cache_root / f"{kind}-{key[:32]}"
    if (final / MANIFEST_FILE).is_file():
        (progress or _silent)(f"{model_label(model_dir)}: using cached {kind} export {final.name}")
        return final, True
    cache_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache_root))
    try:
        _EXPORTERS[kind](model_dir, staging, max_length=max_length, progress=progress)
        _update_manifest(staging, {"cache_key": key})
        staging.chmod(0o755)  # mkdtemp makes it 0700; the served repository may be read by another user
        return _publish(staging, final), False
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful rename


def cache_key(kind: str, model_dir: Path, *, max_length: int) -> str:
    """sha256 over the export settings and every source file's relative path and bytes."""
    settings = {
        "export_version": EXPORT_VERSION,
        "kind": kind,
        "max_length": max_length,
        "opset": OPSET,
        # Versions from package metadata, not imports: a cache hit must not import torch (about 3 s).
        "torch": metadata.version("torch"),
        "transformers": metadata.version("transformers"),
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    files = source_files(model_dir)
    if not files:
        raise CompileError(f"{model_dir} holds no model files (config.json, *.safetensors, ...)")
    for path in files:
        with path.open("rb") as handle:
            file_hash = hashlib.file_digest(handle, "sha256").digest()
        digest.update(path.relative_to(model_dir).as_posix().encode() + b"\0" + file_hash)
    return digest.hexdigest()


def _publish(staging: Path, final: Path) -> Path:
    try:
        staging.rename(final)
    except OSError as exc:
        # Another process published the same key first: its entry is equally good.
        if (final / MANIFEST_FILE).is_file():
            return final
        raise CompileError(f"could not move the export into the cache at {final}: {exc}") from exc
    return final


def _load(auto_class: Any, model_dir: Path, max_length: int) -> tuple[Any, Any]:
    """Model (float32, eager attention: plain ops that trace cleanly) and tokenizer, checked for completeness."""
    import torch
    from transformers import AutoTokenizer

    try:
        with _quiet_transformers():
            model, info = auto_class.from_pretrained(
                model_dir,
                dtype=torch.float32,
                attn_implementation="eager",
                local_files_only=True,
                output_loading_info=True,
            )
            tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CompileError(f"could not load {model_dir} with transformers: {exc}") from exc
    # Weights missing from the checkpoint would be initialised at random and the export would be garbage (the
    # unused BERT pooler excepted).
    missing = sorted(k for k in info["missing_keys"] if "pooler" not in k)
    if missing:
        raise CompileError(f"{model_dir}: checkpoint lacks weights {missing[:5]} (of {len(missing)} missing)")
    _check_max_length(model_dir, model.config, tokenizer, max_length)
    return model.eval(), tokenizer


def _check_max_length(model_dir: Path, config: Any, tokenizer: Any, max_length: int) -> None:
    limits = [getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    # Tokenizers without a limit report a huge sentinel (1e30); RoBERTa-style models reserve two positions, which
    # their tokenizer's model_max_length (512 for 514 positions) already accounts for.
    limit = min(int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000)
    if not 2 <= max_length <= limit:
        raise CompileError(f"{model_dir}: max_length {max_length} is outside 2..{limit} for this model")


def _num_labels(model_dir: Path) -> int:
    config = read_config(model_dir)
    num_labels = int(config.get("num_labels") or len(config.get("id2label") or {}) or 2)
    if num_labels not in (1, 2):
        raise CompileError(
            f"{model_dir}: a cross-encoder needs 1 relevance logit (or 2 for a binary head), it has {num_labels}"
        )
    return num_labels


def _input_names(model: Any, tokenizer: Any) -> tuple[str, ...]:
    """input_ids and attention_mask, plus token_type_ids only when both the model and its tokenizer use them."""
    import inspect

    takes_types = "token_type_ids" in inspect.signature(model.forward).parameters
    makes_types = "token_type_ids" in getattr(tokenizer, "model_input_names", ())
    return ("input_ids", "attention_mask", *(("token_type_ids",) if takes_types and makes_types else ()))


def _encode(tokenizer: Any, input_names: tuple[str, ...], texts: tuple[list[str], ...]) -> dict[str, torch.Tensor]:
    encoded = tokenizer(*texts, padding=True, truncation=True, return_tensors="pt")
    return {name: encoded[name].long() for name in input_names}


def _run(graph: torch.nn.Module, example: dict[str, torch.Tensor]) -> torch.Tensor:
    import torch

    with torch.no_grad():
        out: torch.Tensor = graph(*example.values())
    return out


def _finish(model_dir: Path, out_dir: Path, tokenizer: Any, report: ExportReport) -> None:
    """Tokenizer files beside the graph, then export.json (written last: its presence marks a finished export)."""
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out_dir / name)
    if not (out_dir / "tokenizer.json").is_file() and hasattr(tokenizer, "backend_tokenizer"):
        # Models shipping only vocab.txt: write the fast tokenizer transformers built, so the runtime can use the
        # `tokenizers` library alone.
        tokenizer.backend_tokenizer.save(str(out_dir / "tokenizer.json"))
    _update_manifest(out_dir, report.manifest())


def _update_manifest(out_dir: Path, values: dict[str, Any]) -> None:
    path = out_dir / MANIFEST_FILE
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    data.update(values)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@contextmanager
def _timed(steps: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        steps[name] = round(time.perf_counter() - start, 3)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' "Loading weights" progress bar (noise in compiler output), restoring the setting after."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def _silent(_: str) -> None:
    return None
