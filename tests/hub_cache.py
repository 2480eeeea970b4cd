"""A Hugging Face cache laid out by hand, as huggingface_hub lays out a download, for tests that cannot download."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def lay_out_in_hub_cache(cache: Path, repo_id: str, source: Path) -> Path:
    """Copy ``source``'s files into ``cache`` the way a download leaves them: each file's content once under
    ``models--org--name/blobs/``, ``snapshots/<commit>/<path>`` relative symlinks to the blobs, and ``refs/main``
    naming the commit. Returns the snapshot directory."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode(), usedforsecurity=False).hexdigest()
    snapshot = repo / "snapshots" / commit
    for path in sorted(source.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        blob = repo / "blobs" / _sha256(path)
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit, encoding="utf-8")
    return snapshot


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
