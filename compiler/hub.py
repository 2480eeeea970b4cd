"""Models on the Hugging Face Hub: finding a downloaded one in the local cache, and downloading it (`sluice pull`).

Compiling never touches the network: a ``model_name`` that is a Hub id must already be in the Hugging Face cache,
``$HF_HUB_CACHE`` (default ``$HF_HOME/hub``, default ``~/.cache/huggingface/hub``), in the cache's own layout
(``models--org--name/refs/main`` naming a commit, ``models--org--name/snapshots/<commit>/<files>``). ``sluice pull``
and ``hf download <id>`` both put it there.

huggingface_hub is imported inside the functions: it reads the HF_* environment variables when it is imported, and
only these paths need it.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from sluice.errors import SluiceError

Progress = Callable[[str], None]

# A Hugging Face repo id: "name" or "owner/name" (letters, digits, "-", "_", ".").
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")

# What Sluice reads from a model repository: configs, tokenizer files, chat templates and the weights. A pull
# fetches only these, so a repository's ONNX, OpenVINO, TensorFlow or Flax copies stay on the Hub.
CONFIG_PATTERNS = ("*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken")
SAFETENSORS_PATTERNS = ("*.safetensors",)
# PyTorch pickles, fetched only from a repository that has no safetensors (older models).
PYTORCH_PATTERNS = ("pytorch_model*.bin",)
# What a cached snapshot must hold for Sluice to use it. huggingface_hub checks a snapshot against the file list it
# saved beside it, so a lookup without patterns would call a pull's snapshot incomplete (the ONNX copies and the
# like stayed on the Hub). Pickles are left out: a repository with safetensors was pulled without them, and one
# without safetensors has nothing here to miss.
LOOKUP_PATTERNS = (*CONFIG_PATTERNS, *SAFETENSORS_PATTERNS)


def is_hub_id(model_name: str) -> bool:
    """Whether ``model_name`` is spelled like a Hugging Face repo id (``org/name`` or ``name``)."""
    return bool(_HUB_ID.match(model_name)) and ".." not in model_name


def hub_cache_dir() -> Path:
    """The Hugging Face cache this process uses: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else the default."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def find_cached(repo_id: str, cache_dir: Path | None = None) -> Path | None:
    """The cached snapshot of ``repo_id`` (its ``refs/main``), or None; never a network request."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        # local_files_only: a cache lookup, never a request, whatever HF_HUB_OFFLINE says. An incomplete snapshot
        # (an interrupted download) raises a LocalEntryNotFoundError too: a pull completes it.
        found = snapshot_download(
            repo_id, local_files_only=True, cache_dir=cache_dir, allow_patterns=list(LOOKUP_PATTERNS)
        )
    except (LocalEntryNotFoundError, HFValidationError):
        return None
    path = Path(found)
    return path if (path / "config.json").is_file() else None


@dataclass(frozen=True)
class Pulled:
    repo_id: str
    path: Path
    fetched: tuple[str, ...]  # files downloaded now (empty: everything was cached already)
    fetched_bytes: int


def pull(repo_id: str, progress: Progress, cache_dir: Path | None = None) -> Pulled:
    """Download the files Sluice reads of ``repo_id`` into the Hugging Face cache; raise PullError saying why
    not (offline, no network, no such repository, gated)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    every = [*CONFIG_PATTERNS, *SAFETENSORS_PATTERNS, *PYTORCH_PATTERNS]
    try:
        # A dry run lists the repository's files and which of them the cache lacks, downloading nothing.
        listing = snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=every, dry_run=True)
        patterns = weights_patterns(info.filename for info in listing)
        wanted = [info for info in listing if _matches(info.filename, patterns)]
        missing = [info for info in wanted if info.will_download]
        size = sum(info.file_size or 0 for info in missing)
        if missing:
            progress(f"{repo_id}: fetching {len(missing)} of {len(wanted)} files ({_megabytes(size)}) into "
                     f"{cache_dir or hub_cache_dir()}")
        path = snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=list(patterns))
    except (OSError, HFValidationError) as error:  # huggingface_hub's errors are OSErrors (HTTP, offline, dry run)
        raise PullError(_why_not(repo_id, error)) from None
    return Pulled(repo_id, Path(path), tuple(sorted(info.filename for info in missing)), size)


def weights_patterns(filenames: Iterable[str]) -> tuple[str, ...]:
    """The patterns to fetch for a repository holding ``filenames``: safetensors when it has any (a repository
    that also carries ``pytorch_model.bin`` would otherwise be fetched twice over), else PyTorch pickles."""
    names = list(filenames)
    has_safetensors = any(_matches(name, SAFETENSORS_PATTERNS) for name in names)
    return (*CONFIG_PATTERNS, *(SAFETENSORS_PATTERNS if has_safetensors else PYTORCH_PATTERNS))


def _matches(filename: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(filename, pattern) for pattern in patterns)


def _megabytes(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"


class PullError(SluiceError):
    """A model could not be downloaded."""


def _why_not(repo_id: str, error: BaseException) -> str:
    """One sentence for each way a download fails; huggingface_hub wraps the first cause (a dry run's error
    carries the Hub's as its ``__cause__``)."""
    from huggingface_hub.errors import GatedRepoError, HFValidationError, OfflineModeIsEnabled, RepositoryNotFoundError

    causes = []
    seen: BaseException | None = error
    while seen is not None:
        causes.append(seen)
        seen = seen.__cause__ or seen.__context__
    elsewhere = (
        f"download it where there is a network (`hf download {repo_id}`) and copy the cache directory, or the "
        "model's directory (then point model_name at it)"
    )
    for cause in causes:
        if isinstance(cause, OfflineModeIsEnabled):
            return (f"cannot download {repo_id!r}: HF_HUB_OFFLINE is set, so huggingface_hub makes no requests; "
                    f"unset it, or {elsewhere}")
        if isinstance(cause, GatedRepoError):
            return (f"{repo_id!r} is gated: accept its terms on https://huggingface.co/{repo_id}, then log in "
                    "(`hf auth login`, or HF_TOKEN) and pull again")
        if isinstance(cause, RepositoryNotFoundError):
            return (f"{repo_id!r} is not a model on the Hugging Face Hub (or it is private: `hf auth login`, or "
                    "HF_TOKEN); if it is meant as a directory, it does not exist (`sluice models` makes the demo "
                    "models under models/)")
        if isinstance(cause, HFValidationError):
            return f"{repo_id!r} is not a valid Hugging Face repo id: {cause}"
    from huggingface_hub import constants

    reason = f"{type(causes[-1]).__name__}: {causes[-1]}"
    return f"cannot download {repo_id!r}: {constants.ENDPOINT} could not be reached ({reason}); {elsewhere}"
