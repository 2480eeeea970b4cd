"""Encoder runtimes without Triton: tokenise, run one ONNX model, and score.

Used by the embedding and reranker models (``embedding_model.py``, ``reranker_model.py``). The ONNX graphs come
from ``compiler/export.py``: inputs ``input_ids``, ``attention_mask`` (and ``token_type_ids`` where the model
takes it); output ``embedding`` [batch, dim] (pooled and normalised in the graph) or ``score`` [batch].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tokenizers import Encoding, Tokenizer

# Rows whose padded length would exceed this multiple of their own length start a new onnxruntime call:
# sorting by length and bucketing keeps padding (wasted compute) small when short and long texts share a batch.
PADDING_RATIO = 2.0


@dataclass(frozen=True)
class Encoded:
    """Model outputs for a list of rows, in the rows' order."""

    values: npt.NDArray[np.float32]  # [rows, dim] embeddings or [rows] scores
    tokens: npt.NDArray[np.int32]  # [rows]: tokens the model saw
    truncated: npt.NDArray[np.bool_]  # [rows]: the input was longer than max_length


def open_session(model_path: Path, threads: int, device_id: int | None = None) -> ort.InferenceSession:
    """An onnxruntime session tuned for sharing few cores with Triton's Python backend; ``threads``: intra-op
    threads, from ``RuntimeParameters.threads`` (runtimes/parameters.py) inside Triton."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Spinning threads starve the backend's IPC on small machines: measured 16 -> 118 req/s on 2 cores
    # (shared/ENVIRONMENT.md).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    providers: list[str | tuple[str, dict[str, str]]] = ["CPUExecutionProvider"]
    if device_id is not None and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": str(device_id)}))
    return ort.InferenceSession(str(model_path), sess_options=options, providers=providers)


class OnnxEncoder:
    """A tokenizer and an ONNX graph; encodes texts or (query, document) pairs in length-sorted buckets."""

    def __init__(self, artifacts: Path, max_length: int, session: ort.InferenceSession) -> None:
        self.tokenizer = Tokenizer.from_file(str(artifacts / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length)
        self.max_length = max_length
        self.session = session
        self.input_names = {graph_input.name for graph_input in session.get_inputs()}
        self.output_name = session.get_outputs()[0].name
        self.pad_id = self.tokenizer.token_to_id("[PAD]") or 0

    def encode_texts(self, texts: Sequence[str]) -> Encoded:
        return self._run(self.tokenizer.encode_batch(list(texts)))

    def encode_pairs(self, pairs: Sequence[tuple[str, str]]) -> Encoded:
        return self._run(self.tokenizer.encode_batch(list(pairs)))

    def _run(self, encodings: list[Encoding]) -> Encoded:
        lengths = np.array([len(encoding.ids) for encoding in encodings], dtype=np.int32)
        truncated = np.array([bool(encoding.overflowing) for encoding in encodings], dtype=bool)
        order = np.argsort(lengths, kind="stable")
        outputs: list[npt.NDArray[np.float32]] = []
        for bucket in _buckets(lengths[order]):
            rows = [encodings[i] for i in order[bucket]]
            outputs.append(self.session.run([self.output_name], self._feed(rows))[0])
        if not outputs:
            return Encoded(np.zeros((0,), np.float32), lengths, truncated)
        stacked = np.concatenate(outputs)
        values = np.empty_like(stacked)
        values[order] = stacked  # back to the callers' order
        return Encoded(values.astype(np.float32, copy=False), lengths, truncated)

    def _feed(self, rows: list[Encoding]) -> dict[str, npt.NDArray[np.int64]]:
        width = max(len(row.ids) for row in rows)
        feed = {
            "input_ids": np.full((len(rows), width), self.pad_id, dtype=np.int64),
            "attention_mask": np.zeros((len(rows), width), dtype=np.int64),
            "token_type_ids": np.zeros((len(rows), width), dtype=np.int64),
        }
        for i, row in enumerate(rows):
            n = len(row.ids)
            feed["input_ids"][i, :n] = row.ids
            feed["attention_mask"][i, :n] = 1
            feed["token_type_ids"][i, :n] = row.type_ids
        return {name: array for name, array in feed.items() if name in self.input_names}


def _buckets(sorted_lengths: npt.NDArray[np.int32]) -> list[slice]:
    """Split ascending lengths into runs whose longest row is at most PADDING_RATIO x the shortest."""
    buckets, start = [], 0
    for i in range(1, len(sorted_lengths) + 1):
        if i == len(sorted_lengths) or sorted_lengths[i] > PADDING_RATIO * max(int(sorted_lengths[start]), 8):
            buckets.append(slice(start, i))
            start = i
    return buckets


def long_texts(count: int, max_length: int, prefix: str = "") -> list[str]:
    """``count`` distinct texts that each tokenize to at least ``max_length`` tokens (truncation cuts them to it):
    the longest rows a request can bring, for the warm-up. Distinct, so that cosine_scores embeds every one."""
    return [f"{prefix}{i} " + "warm " * max_length for i in range(count)]


def cosine_scores(encoder: OnnxEncoder, pairs: Sequence[tuple[str, str]]) -> Encoded:
    """Rerank with a sentence-embedding model: cosine similarity of query and document embeddings.

    Embeddings are normalised in the graph, so the cosine is a dot product. Each distinct text is embedded once.
    """
    if not pairs:  # every request of the batch refused: the einsum below needs [rows, dim] embeddings
        return Encoded(np.zeros((0,), np.float32), np.zeros((0,), np.int32), np.zeros((0,), np.bool_))
    texts = sorted({text for pair in pairs for text in pair})
    index = {text: i for i, text in enumerate(texts)}
    embedded = encoder.encode_texts(texts)
    queries = np.array([index[query] for query, _ in pairs], dtype=np.int64)
    documents = np.array([index[document] for _, document in pairs], dtype=np.int64)
    scores = np.einsum("ij,ij->i", embedded.values[queries], embedded.values[documents])
    tokens = embedded.tokens[queries] + embedded.tokens[documents]
    truncated = embedded.truncated[queries] | embedded.truncated[documents]
    return Encoded(scores.astype(np.float32), tokens, truncated)
