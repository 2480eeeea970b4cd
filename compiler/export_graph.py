"""The PyTorch modules that become the ONNX graphs, and the one call that writes them.

Pooling, normalisation and the cross-encoder's score column are part of the graph, so the runtime only tokenizes,
runs the session and returns the output.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import onnx
import torch

from compiler.export_source import PoolingMode
from sluice.errors import CompileError

INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS = "input_ids", "attention_mask", "token_type_ids"
EMBEDDING_OUTPUT, SCORE_OUTPUT = "embedding", "score"
# sentence-transformers' own value for padded positions in max pooling.
_MAX_POOLING_FILL = -1e9


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[batch, seq] 0/1 -> [batch, 1, 1, seq] additive bias (0 to attend, dtype min to ignore).

    Why: transformers passes a 4D mask through untouched (masking_utils: "returned as-is"), so the graph holds
    only this arithmetic instead of transformers' own mask builder: 467 instead of 532 nodes for MiniLM, and no
    dependence on mask-building code whose trace-time branches have changed between transformers releases.
    The reference side of the export check uses the plain 2D mask, so a model that ignored a 4D mask would fail it.
    """
    keep = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - keep) * torch.finfo(dtype).min


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: PoolingMode) -> torch.Tensor:
    """[batch, seq, dim] -> [batch, dim], as sentence-transformers' Pooling module does it."""
    if mode == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(mask == 0, _MAX_POOLING_FILL).max(dim=1).values
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def normalize(pooled: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 length (sentence-transformers' Normalize)."""
    return torch.nn.functional.normalize(pooled, p=2.0, dim=1)


def relevance(logits: torch.Tensor, num_labels: int) -> torch.Tensor:
    """[batch, num_labels] -> [batch]: the one logit, or for two labels the log-odds of label 1 over label 0."""
    if num_labels == 1:
        return logits[:, 0]
    return logits[:, 1] - logits[:, 0]


class EmbeddingGraph(torch.nn.Module):
    """encoder -> pooling -> L2 normalisation: token ids in, one unit vector per row out."""

    def __init__(self, encoder: torch.nn.Module, pooling: PoolingMode) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling: PoolingMode = pooling

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        extra = {} if token_type_ids is None else {TOKEN_TYPE_IDS: token_type_ids}
        bias = additive_mask(attention_mask, torch.float32)
        hidden = self.encoder(input_ids=input_ids, attention_mask=bias, **extra).last_hidden_state
        return normalize(pool(hidden, attention_mask, self.pooling))


class ScoreGraph(torch.nn.Module):
    """A sequence classifier reduced to one relevance logit per (query, document) row."""

    def __init__(self, classifier: torch.nn.Module, num_labels: int) -> None:
        super().__init__()
        self.classifier = classifier
        self.num_labels = num_labels

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        extra = {} if token_type_ids is None else {TOKEN_TYPE_IDS: token_type_ids}
        bias = additive_mask(attention_mask, torch.float32)
        logits = self.classifier(input_ids=input_ids, attention_mask=bias, **extra).logits
        return relevance(logits, self.num_labels)


def write_onnx(
    graph: torch.nn.Module,
    example: Mapping[str, torch.Tensor],
    output: str,
    output_dims: tuple[int, ...],
    path: Path,
    opset: int,
) -> None:
    """Trace ``graph`` on ``example`` (input name -> int64 tensor) into ``path``: batch and sequence axes dynamic,
    output ``output`` of shape [batch, *output_dims].

    The legacy TorchScript exporter (``dynamo=False``) is used: it exports these encoders in about 2 s and gives
    byte-identical files for the same weights; the dynamo exporter is slower and newer.
    """
    names = list(example)
    dynamic_axes = {name: {0: "batch", 1: "sequence"} for name in names}
    dynamic_axes[output] = {0: "batch"}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # Expected noise: the legacy exporter's deprecation notice and tracer notes about Python-level shape
            # checks inside transformers; the export check against PyTorch is what proves the graph right.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # type: ignore[attr-defined]
            torch.onnx.export(
                graph,
                tuple(example.values()),
                str(path),
                input_names=names,
                output_names=[output],
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    except (RuntimeError, ValueError, TypeError) as exc:
        raise CompileError(f"torch.onnx.export failed for {path.parent}: {exc}") from exc
    finally:
        # The legacy exporter restores the wrapper's training flag with train(flag), which recurses: a wrapper
        # left in training mode would switch the wrapped model's dropout back on for the PyTorch reference
        # (seen here: row cosines of 0.83-0.97, different each run).
        graph.eval()
    _name_output_dims(path, output, output_dims)


def _name_output_dims(path: Path, output: str, dims: tuple[int, ...]) -> None:
    # The tracer leaves the output's shape blank; writing [batch, dim] lets onnxruntime and readers of the file
    # see the embedding width without running it.
    model = onnx.load(str(path))
    (graph_output,) = [o for o in model.graph.output if o.name == output]
    shape = graph_output.type.tensor_type.shape
    shape.ClearField("dim")
    shape.dim.add().dim_param = "batch"
    for size in dims:
        shape.dim.add().dim_value = size
    onnx.save(model, str(path))
