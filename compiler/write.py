"""Stage 6, the only one that touches the disk: write a repository aside, then swap it in.

A failed compile leaves the previous repository as it was; a directory that Sluice did not create is never
overwritten (its marker file says who owns it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from sluice.errors import CompileError

from .render import MARKER_NAME

# A file's content: text, bytes, or an existing file to copy (large model artifacts).
Content = str | bytes | Path

# Files a fresh checkout may hold in an output directory that Sluice has not written yet.
_TRACKED_PLACEHOLDERS = frozenset({"README.md"})


def write_repository(files: Mapping[str, Content], out: Path) -> None:
    """Write ``files`` (relative path -> content) as the directory ``out``, replacing it whole."""
    out = out.resolve()
    ensure_owned(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for relative, content in sorted(files.items()):
            _write_file(staging, relative, content)
        _swap_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def ensure_owned(out: Path) -> None:
    """Raise unless ``out`` is absent, empty, a fresh checkout's placeholder, or Sluice's own output."""
    if not out.exists():
        return
    if not out.is_dir():
        raise CompileError(f"refusing to overwrite {out}: it is a file, not a model repository")
    entries = {entry.name for entry in out.iterdir()}
    if MARKER_NAME in entries or entries <= _TRACKED_PLACEHOLDERS:
        return
    raise CompileError(
        f"refusing to overwrite {out}: it was not created by `sluice compile` (no {MARKER_NAME} file); "
        "choose another --output or remove it yourself"
    )


def _write_file(root: Path, relative: str, content: Content) -> None:
    if Path(relative).is_absolute() or ".." in Path(relative).parts:
        raise CompileError(f"refusing to write outside the repository: {relative}")
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, Path):
        _link_or_copy(content, path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")


_LINK_ABOVE_BYTES = 1 << 20


def _link_or_copy(source: Path, target: Path) -> None:
    # Model files are large and the repository is replaced whole, never edited in place: a hard link to the
    # export cache costs nothing. Small files (runtime code) are copied, so editing the source tree in place
    # never reaches into a compiled repository.
    if source.stat().st_size > _LINK_ABOVE_BYTES:
        try:
            # resolve(): a Hugging Face cache snapshot's files are symlinks to its blobs, and link(2) would link
            # the symlink itself (a relative one, dangling in the repository), not the file.
            os.link(source.resolve(), target)
            return
        except OSError:
            pass  # another filesystem: copy instead
    shutil.copyfile(source, target)


def _swap_in(staging: Path, out: Path) -> None:
    if not out.exists():
        staging.rename(out)
        return
    if _exchange(staging, out):
        return  # staging now holds the old repository; the caller removes it
    # No atomic exchange (not Linux, or an old kernel): two renames, restoring the old one on failure.
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    out.rename(old)
    try:
        staging.rename(out)
    except OSError:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux renameat2(RENAME_EXCHANGE); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return bool(result == 0)
