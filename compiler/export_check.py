"""Proof that an exported graph computes what the PyTorch model computes: sample batches of different lengths (one
padded batch, one text truncated at max_length) run through onnxruntime and PyTorch, compared row by row."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import torch

from sluice.errors import CompileError

# Read at call time (not bound as defaults) so a test can tighten them and watch the check fail.
EMBEDDING_MIN_COSINE = 0.9999
SCORE_MAX_ABS_DIFF = 1e-3

# Different lengths in one batch exercise padding; the batch size differs from the tracing example (2).
SAMPLE_TEXTS: tuple[str, ...] = (
    "Hi.",
    "Triton batches requests from many clients into one model call.",
    "A sluice is a sliding gate that controls how much water flows through a channel; opening it a little lets "
    "a steady stream through, opening it wide drains the reservoir in minutes.",
)
SAMPLE_PAIRS: tuple[tuple[str, str], ...] = (
    ("what is a sluice?", "A sluice is a water channel controlled at its head by a gate."),
    ("how are requests batched?", "Hi."),
    ("capital of France", "Paris is the capital and most populous city of France, on the Seine, in the north."),
)
# Longer than any max_length once repeated, so the check also covers the last position embedding.
_LONG_TEXT = " ".join(SAMPLE_TEXTS) * 40

Batch = dict[str, npt.NDArray[np.int64]]
Rows = npt.NDArray[np.float64]
Reference = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class CheckResult:
    """The worst figure over every sample row: ``min row cosine`` (embeddings) or ``max abs diff`` (scores)."""

    metric: str
    value: float
    rows: int

    def __str__(self) -> str:
        return f"{self.metric} {self.value:.9g} over {self.rows} rows"


def embedding_batches(tokenizer: Any, input_names: Sequence[str], max_length: int) -> list[Batch]:
    """One padded batch of texts of different lengths, and one text truncated at ``max_length``."""
    return [
        _encode(tokenizer, (list(SAMPLE_TEXTS),), input_names, max_length),
        _encode(tokenizer, ([_LONG_TEXT],), input_names, max_length),
    ]


def pair_batches(tokenizer: Any, input_names: Sequence[str], max_length: int) -> list[Batch]:
    """One padded batch of (query, document) pairs, and one pair truncated at ``max_length``."""
    queries, documents = zip(*SAMPLE_PAIRS, strict=True)
    return [
        _encode(tokenizer, (list(queries), list(documents)), input_names, max_length),
        _encode(tokenizer, (["a long document"], [_LONG_TEXT]), input_names, max_length),
    ]


def _encode(tokenizer: Any, texts: tuple[list[str], ...], input_names: Sequence[str], max_length: int) -> Batch:
    encoded = tokenizer(*texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    return {name: np.asarray(encoded[name], dtype=np.int64) for name in input_names}


def check_embeddings(onnx_path: Path, reference: Reference, batches: Sequence[Batch]) -> CheckResult:
    """Raise CompileError unless every row's cosine to PyTorch is at least EMBEDDING_MIN_COSINE."""
    ours, theirs = _run_both(onnx_path, reference, batches)
    cosines = np.sum(ours * theirs, axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1) + 1e-12)
    result = CheckResult("min row cosine", float(cosines.min()), len(cosines))
    if not result.value >= EMBEDDING_MIN_COSINE:  # "not >=" so a NaN fails too
        raise CompileError(
            f"ONNX export {onnx_path} does not match PyTorch: {result}, "
            f"required >= {EMBEDDING_MIN_COSINE} (row cosines {np.round(cosines, 6).tolist()})"
        )
    return result


def check_scores(onnx_path: Path, reference: Reference, batches: Sequence[Batch]) -> CheckResult:
    """Raise CompileError unless every score is within SCORE_MAX_ABS_DIFF of PyTorch's logit."""
    ours, theirs = _run_both(onnx_path, reference, batches)
    diffs = np.abs(ours - theirs)
    result = CheckResult("max abs diff", float(diffs.max()), len(diffs))
    if not result.value <= SCORE_MAX_ABS_DIFF:
        raise CompileError(
            f"ONNX export {onnx_path} does not match PyTorch: {result}, required <= {SCORE_MAX_ABS_DIFF} "
            f"(onnx {np.round(ours, 5).tolist()} vs torch {np.round(theirs, 5).tolist()})"
        )
    return result


def _run_both(onnx_path: Path, reference: Reference, batches: Sequence[Batch]) -> tuple[Rows, Rows]:
    """Every batch through onnxruntime and through PyTorch; rows of all batches stacked."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (output,) = [o.name for o in session.get_outputs()]
    ours, theirs = [], []
    for batch in batches:
        ours.append(np.asarray(session.run([output], batch)[0], dtype=np.float64))
        with torch.no_grad():
            expected = reference({name: torch.from_numpy(ids) for name, ids in batch.items()})
        theirs.append(expected.to(torch.float64).numpy())
    return np.concatenate(ours), np.concatenate(theirs)
