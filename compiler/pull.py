"""`sluice pull`: download every Hugging Face model a config names that is not on this machine yet.

The one place Sluice reaches the network. A ``model_name`` that is a directory (relative to the config file) is
left alone; a Hub id already in the Hugging Face cache is not fetched again; any other Hub id is downloaded into
that cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``), where `sluice compile` then finds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sluice.errors import SluiceError

from .export_source import not_found_message
from .hub import Progress, PullError, find_cached, hub_cache_dir, is_hub_id, pull
from .pipeline import build_plan

Found = Literal["directory", "cached", "fetched"]


@dataclass(frozen=True)
class PulledModel:
    model_name: str
    models: tuple[str, ...]  # the config's model keys that name it
    found: Found
    path: Path
    fetched: tuple[str, ...] = ()
    fetched_bytes: int = 0


def pull_models(
    config_path: str | Path, progress: Progress, *, cache_dir: Path | None = None
) -> list[PulledModel]:
    """Make every model of ``config_path`` available locally; raise a PullError naming each one that could not
    be (after trying the others)."""
    config = build_plan(config_path).plan.config
    config_dir = Path(config_path).resolve().parent
    keys: dict[str, list[str]] = {}
    for key, model in sorted(config.models.items()):
        keys.setdefault(model.model_name, []).append(key)
    pulled: list[PulledModel] = []
    failures: list[str] = []
    for model_name, models in keys.items():
        try:
            pulled.append(_pull_one(model_name, tuple(models), config_dir, Path(config_path), progress, cache_dir))
        except SluiceError as error:
            failures.append(f"{', '.join(f'models.{key}' for key in models)}: {error}")
    if failures:
        raise PullError("\n".join(failures))
    return pulled


def _pull_one(
    model_name: str,
    models: tuple[str, ...],
    config_dir: Path,
    config_file: Path,
    progress: Progress,
    cache_dir: Path | None,
) -> PulledModel:
    candidate = config_dir / Path(model_name).expanduser()
    if candidate.is_dir():
        return PulledModel(model_name, models, "directory", candidate.resolve())
    if not is_hub_id(model_name):
        raise PullError(not_found_message(model_name, candidate, cache_dir or hub_cache_dir(), config_file))
    cached = find_cached(model_name, cache_dir)
    if cached is not None:
        return PulledModel(model_name, models, "cached", cached)
    done = pull(model_name, progress, cache_dir)
    if find_cached(model_name, cache_dir) is None:
        raise PullError(
            f"{model_name!r} was downloaded to {done.path} but has no config.json: not a transformers model "
            "Sluice can serve"
        )
    return PulledModel(model_name, models, "fetched", done.path, done.fetched, done.fetched_bytes)
