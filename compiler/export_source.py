"""Where a model comes from and what its files say: resolving ``model_name``, reading the sentence-transformers
pipeline (``modules.json`` + pooling config), picking the reranker kind, and listing the files an export depends on.

Nothing here imports torch, so the compiler can plan without paying for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from sluice.errors import CompileError

from .hub import find_cached, hub_cache_dir, is_hub_id

PoolingMode = Literal["mean", "cls", "max"]
RerankerKind = Literal["cross_encoder", "cosine"]

# What the runtime needs to tokenize without a hub: every file any common tokenizer family saves, plus config.json
# (model_type, max_position_embeddings). Only those present are copied.
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "spiece.model",
    "config.json",
)

# sentence-transformers module types (modules.json "type", matched by class name so both the old
# ``sentence_transformers.models.Pooling`` and the newer module paths are understood).
_TRANSFORMER, _POOLING, _NORMALIZE = "Transformer", "Pooling", "Normalize"
_SUPPORTED_POOLING: tuple[PoolingMode, ...] = ("mean", "cls", "max")
# The legacy boolean keys of 1_Pooling/config.json, in sentence-transformers' own order.
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


def resolve_model_dir(
    model_name: str, base_dir: Path, *, hf_cache_dir: Path | None = None, config_file: Path | None = None
) -> Path:
    """Turn a config's ``model_name`` into a local model directory, never touching the network.

    ``model_name`` is a path (relative ones are relative to ``base_dir``, the config file's directory) or a
    Hugging Face id already in the local HF cache (``hf_cache_dir``, default: the hub's own cache location).
    ``config_file`` only names the config in the error's advice.
    """
    candidate = base_dir / Path(model_name).expanduser()
    if candidate.is_dir():
        return candidate.resolve()
    if is_hub_id(model_name):
        snapshot = find_cached(model_name, hf_cache_dir)
        if snapshot is not None:
            return snapshot
    raise CompileError(not_found_message(model_name, candidate, hf_cache_dir or hub_cache_dir(), config_file))


def model_label(model_dir: Path) -> str:
    """How messages name a model directory: a Hugging Face cache snapshot (``models--org--name/snapshots/<commit>``)
    by its repo id, any other directory by its name."""
    repo = model_dir.parent.parent.name
    if model_dir.parent.name == "snapshots" and repo.startswith("models--"):
        return repo.removeprefix("models--").replace("--", "/")
    return model_dir.name


def not_found_message(model_name: str, candidate: Path, cache_dir: Path, config_file: Path | None) -> str:
    """Why ``model_name`` was not found, and each way to get it."""
    if not is_hub_id(model_name):
        return (
            f"model {model_name!r} was not found locally: {candidate} is not a directory. model_name is a model "
            "directory (relative to the config file's directory) or a Hugging Face id (org/name)."
        )
    config = str(config_file) if config_file is not None else "CONFIG"
    local = f"models/{model_name.rsplit('/', 1)[-1]}"
    return (
        f"model {model_name!r} was not found locally: {candidate} is not a directory, and the Hugging Face cache "
        f"({cache_dir}) has no snapshot of it. Compiling never downloads; get the files with one of:\n"
        f"    sluice pull {config}    # every Hub model the config names, into that cache\n"
        f"    hf download {model_name}    # this one, into that cache (HF_HUB_CACHE or HF_HOME move it)\n"
        f"    hf download {model_name} --local-dir {local}    # into a directory; then model_name: {local}\n"
        "  A local directory works too: model_name is then its path, relative to the config file's directory "
        "(`sluice models` makes the demo models under models/)."
    )


def read_config(model_dir: Path) -> dict[str, Any]:
    """The model's config.json, or a CompileError naming the directory."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise CompileError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    return _read_json_object(path)


def detect_reranker_kind(model_dir: Path) -> RerankerKind:
    """``cross_encoder`` when config.json names a ``*ForSequenceClassification`` architecture; otherwise the model
    is a plain sentence-embedding model that reranks by cosine similarity (and is exported as an embedding)."""
    architectures = read_config(model_dir).get("architectures") or []
    if any(str(name).endswith("ForSequenceClassification") for name in architectures):
        return "cross_encoder"
    return "cosine"


def read_pooling(model_dir: Path) -> PoolingMode:
    """The pooling the model was trained with, from its sentence-transformers config; ``mean`` when it has none.

    A pipeline with modules Sluice cannot put in the graph (Dense, a second Pooling, ...) is refused rather than
    exported without them: the embeddings would be silently different from the model's own.
    """
    modules = _read_modules(model_dir)
    if not modules:
        return "mean"
    unsupported = [m["type"] for m in modules if _module_class(m) not in (_TRANSFORMER, _POOLING, _NORMALIZE)]
    if unsupported:
        raise CompileError(
            f"{model_dir}/modules.json has modules Sluice cannot export: {', '.join(unsupported)} "
            "(supported: Transformer, Pooling, Normalize)"
        )
    pooling = [m for m in modules if _module_class(m) == _POOLING]
    if not pooling:
        return "mean"
    config_path = model_dir / str(pooling[0].get("path", "")) / "config.json"
    if not config_path.is_file():
        return "mean"
    return _pooling_mode(_read_json_object(config_path), config_path)


def _pooling_mode(config: dict[str, Any], source: Path) -> PoolingMode:
    if "pooling_mode" in config:  # sentence-transformers >= 5: "mean" or a list of modes
        raw = config["pooling_mode"]
        modes = [raw] if isinstance(raw, str) else [str(mode) for mode in raw]
    else:
        modes = [mode for key, mode in _LEGACY_POOLING_KEYS.items() if config.get(key)]
    if not modes:
        return "mean"
    if len(modes) == 1 and modes[0] in _SUPPORTED_POOLING:
        return modes[0]  # narrowed to PoolingMode by the membership test
    raise CompileError(f"{source}: pooling {'+'.join(modes)} is not supported (supported: mean, cls, max)")


def _read_modules(model_dir: Path) -> list[dict[str, Any]]:
    path = model_dir / "modules.json"
    if not path.is_file():
        return []
    try:
        modules = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CompileError(f"{path}: unreadable: {exc}") from exc
    if not isinstance(modules, list) or not all(isinstance(m, dict) and "type" in m for m in modules):
        raise CompileError(f"{path}: expected a list of {{'type', 'path'}} objects")
    return modules


def _module_class(module: dict[str, Any]) -> str:
    return str(module["type"]).rsplit(".", 1)[-1]


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CompileError(f"{path}: unreadable: {exc}") from exc
    if not isinstance(data, dict):
        raise CompileError(f"{path}: expected a JSON object")
    return data


def source_files(model_dir: Path) -> list[Path]:
    """Every file an export's result depends on, sorted: weights, configs, the pooling config, tokenizer files.

    Other files a hub snapshot may carry (onnx/, openvino/, README.md, ...) are left out so they neither slow the
    cache key down nor change it.
    """
    # generation_config.json and chat_template.jinja matter to an LLM served from its directory (cache_key("llm", ...)).
    names = {"modules.json", "sentence_bert_config.json", "generation_config.json", "chat_template.jinja"}
    names.update(TOKENIZER_FILES)
    files = {model_dir / name for name in names}
    files.update(model_dir.glob("*.safetensors"))
    files.update(model_dir.glob("*.safetensors.index.json"))
    files.update(model_dir.glob("pytorch_model*.bin"))
    files.update(model_dir.glob("pytorch_model.bin.index.json"))
    files.update(model_dir / str(m.get("path", "")) / "config.json" for m in _read_modules(model_dir) if m.get("path"))
    return sorted(path for path in files if path.is_file())
