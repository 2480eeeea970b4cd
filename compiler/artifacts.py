"""The files that make a planned service runnable: its runtime code and its model, exported where needed.

- embedding: the model exported to ONNX (pooling and normalisation in the graph) + tokenizer files;
- reranker: a cross-encoder exported to ONNX (one logit per pair), or a sentence-embedding model exported as for
  embedding and scored by cosine; the runtime tells the two apart by the graph's output name;
- llm: the Hugging Face model directory as it is, run with transformers inside Triton.

Everything lands under ``<service>/1/``: ``model.py`` (a copy of ``runtimes/<type>_model.py``), the ``runtimes``
package beside it, and ``artifacts/``. Exports are cached by content (compiler/export.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import runtimes

from .export import ExportKind, cache_key, detect_reranker_kind, export_cached, resolve_model_dir
from .export_source import model_label
from .plan import ARTIFACTS_DIR, ServicePlan

Progress = Callable[[str], None]
RUNTIME_DIR = Path(runtimes.__file__).parent
RUNTIME_ENTRY = {"embedding": "embedding_model.py", "reranker": "reranker_model.py", "llm": "llm_model.py"}


@dataclass(frozen=True)
class ServiceArtifacts:
    files: dict[str, Path]  # repository-relative path -> file to copy
    fingerprint: str  # sha256 of the model's content and how it was exported: the gateway's cache key part


def service_artifacts(
    service: ServicePlan, config_dir: Path, cache_root: Path, progress: Progress, *, config_file: Path | None = None
) -> ServiceArtifacts:
    """Export (or find in the cache) the service's model and list every file its version directory needs.

    ``config_file`` only names the config in a model-not-found error's advice (`sluice pull CONFIG`)."""
    model = service.model
    model_dir = resolve_model_dir(model.model_name, config_dir, config_file=config_file)
    if model.type == "llm":
        source, fingerprint = model_dir, cache_key("llm", model_dir, max_length=model.max_length)
        progress(f"{service.name}: serving {model_label(model_dir)} with transformers (no export needed)")
    else:
        cross_encoder = model.type == "reranker" and detect_reranker_kind(model_dir) == "cross_encoder"
        kind: ExportKind = "cross_encoder" if cross_encoder else "embedding"
        source, hit = export_cached(
            kind, model_dir, max_length=model.max_length, cache_root=cache_root,
            progress=lambda line: progress(f"{service.name}: {line}"),
        )
        fingerprint = source.name
        if not hit:
            progress(f"{service.name}: exported {model_label(model_dir)} ({kind}) to {source}")
    version = f"{service.name}/1"
    files = {f"{version}/model.py": RUNTIME_DIR / RUNTIME_ENTRY[model.type]}
    files.update({f"{version}/runtimes/{module.name}": module for module in sorted(RUNTIME_DIR.glob("*.py"))})
    files.update({
        f"{version}/{ARTIFACTS_DIR}/{path.name}": path
        for path in sorted(source.iterdir())
        if path.is_file() and not path.name.startswith(".")
    })
    return ServiceArtifacts(files, fingerprint)


def repository_digest(texts: dict[str, str], artifacts: dict[str, ServiceArtifacts]) -> str:
    """One digest of everything a compile would write: equal digests mean the repository is current."""
    digest = hashlib.sha256()
    for name, text in sorted(texts.items()):
        digest.update(f"{name}\0{hashlib.sha256(text.encode()).hexdigest()}\n".encode())
    for service, found in sorted(artifacts.items()):
        digest.update(f"{service}\0{found.fingerprint}\n".encode())
        for name, path in sorted(found.files.items()):
            if path.suffix == ".py":  # runtime code: small, and it changes without the model changing
                digest.update(f"{name}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
            else:
                digest.update(f"{name}\n".encode())
    return digest.hexdigest()
