"""Encoder runtimes without Triton: tokenise, run one ONNX model, and score.

Used by the embedding and reranker models (``embedding_model.py``, ``reranker_model.py``). The ONNX graphs come
from ``compiler/export.py``: inputs ``input_ids``, ``attention_mask`` (and ``token_type_ids`` where the model
takes it); output ``embedding`` [batch, dim] (pooled and normalised in the graph) or ``score`` [batch].

A batch may be watched (``Watchdog``): each onnxruntime call then gets its own ``RunOptions``, which the instance's
watchdog thread terminates when the batch has computed for the service's inference_timeout (onnxruntime checks the
flag between graph nodes); and between length buckets the batch asks whether every one of its requests was
cancelled by its client. Either way it raises ``RunStopped``.

Cancellation is asked by the thread running ``execute``, never by the watchdog: Triton 2.51's Python backend
answers a request's is-cancelled message from another thread only after ``execute`` returns, when the request may
be freed (tritonserver died of SIGSEGV in TRITONBACKEND_ResponseFactoryIsCancelled), and waiting for that answer
inside ``execute`` stalled every batch that asked (4 clients: 48 embeddings/s instead of 130).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tokenizers import Encoding, Tokenizer

# Rows whose padded length would exceed this multiple of their own length start a new onnxruntime call:
# sorting by length and bucketing keeps padding (wasted compute) small when short and long texts share a batch.
PADDING_RATIO = 2.0

# Why a watched batch stopped: the labels of sluice_runs_stopped_total (runtimes/_triton.py).
INFERENCE_TIMEOUT, CANCELLED = "inference_timeout", "cancelled"
STOP_REASONS = (INFERENCE_TIMEOUT, CANCELLED)
# How often a running batch asks, between its length buckets, whether its clients are still there, the first time
# one period after the batch began (most batches are over by then and never ask). Each ask is a round trip to
# Triton's process for one request (the first not yet seen cancelled: see all_cancelled), so not much more often.
CANCEL_POLL_S = 0.01


@dataclass(frozen=True)
class Encoded:
    """Model outputs for a list of rows, in the rows' order."""

    values: npt.NDArray[np.float32]  # [rows, dim] embeddings or [rows] scores
    tokens: npt.NDArray[np.int32]  # [rows]: tokens the model saw
    truncated: npt.NDArray[np.bool_]  # [rows]: the input was longer than max_length


class RunStopped(Exception):
    """A watched batch was stopped before its end: ``reason`` is INFERENCE_TIMEOUT or CANCELLED."""

    def __init__(self, reason: str, seconds: float) -> None:
        super().__init__(f"stopped ({reason}) after {seconds:.3f} s")
        self.reason, self.seconds = reason, seconds


class Run:
    """One batch's onnxruntime calls, as one watchdog watches them. ``options()`` gives each call a fresh
    ``RunOptions`` (a terminated one stays terminated, so it is never reused); ``stop`` terminates the current one
    and refuses the next."""

    def __init__(self, started: float, deadline: float, cancelled: Callable[[], bool],
                 poll_s: float = CANCEL_POLL_S) -> None:
        self.started, self.deadline = started, deadline
        self.cancelled, self.poll_s = cancelled, poll_s
        self.next_ask = started + poll_s  # when ``options`` next asks ``cancelled()``
        self.reason: str | None = None
        self._options: ort.RunOptions | None = None
        self._lock = threading.Lock()

    def options(self) -> ort.RunOptions:
        """The RunOptions of the next onnxruntime call; RunStopped once the batch is stopped, or when every client
        has left (asked here, in the thread running the batch, at most every poll period)."""
        now = time.monotonic()
        if now >= self.next_ask:
            self.next_ask = now + self.poll_s
            if _asked(self.cancelled):
                self.stop(CANCELLED)
        with self._lock:
            self._raise_if_stopped()
            self._options = ort.RunOptions()
            return self._options

    def stop(self, reason: str) -> None:
        with self._lock:
            if self.reason is None:
                self.reason = reason
                if self._options is not None:
                    self._options.terminate = True

    def stopped(self) -> RunStopped | None:
        """The RunStopped to raise when the batch was stopped (an onnxruntime call that failed was terminated)."""
        reason = self.reason
        return None if reason is None else RunStopped(reason, time.monotonic() - self.started)

    def _raise_if_stopped(self) -> None:
        if (stopped := self.stopped()) is not None:
            raise stopped


def all_cancelled(requests: Sequence[object], is_cancelled: Callable[[object], bool]) -> Callable[[], bool]:
    """Whether every request has been cancelled by its client, asked cheaply: a cancellation stays, so each ask
    checks the first request not yet seen cancelled, and goes further only while it finds more."""
    live = 0

    def ask() -> bool:
        nonlocal live
        while live < len(requests) and is_cancelled(requests[live]):
            live += 1
        return live == len(requests) > 0

    return ask


def _never() -> bool:
    return False


class Watchdog:
    """One thread per model instance that stops the batch it watches (``watch``) at ``timeout_s`` (0: never) after
    the batch began computing; the batch itself asks ``cancelled()`` between its length buckets (``Run.options``),
    at most every ``poll_s``. A thread for the instance's lifetime rather than a timer per batch: batches come
    hundreds a second.
    """

    def __init__(self, timeout_s: float, poll_s: float = CANCEL_POLL_S, name: str = "encoder-watchdog") -> None:
        self.timeout_s, self.poll_s = timeout_s, poll_s
        self._run: Run | None = None
        self._closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._watch, name=name, daemon=True)
        self._thread.start()

    @contextmanager
    def watch(self, cancelled: Callable[[], bool] = _never) -> Iterator[Run]:
        """Watches the block's onnxruntime calls (one batch at a time: an instance computes one)."""
        now = time.monotonic()
        run = Run(now, now + self.timeout_s if self.timeout_s > 0 else float("inf"), cancelled, self.poll_s)
        with self._changed:
            self._run = run
            self._changed.notify()
        try:
            yield run
        finally:
            with self._changed:
                self._run = None
                self._changed.notify()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join()

    def _watch(self) -> None:
        with self._changed:
            while not self._closed:
                run = self._run
                if run is None or run.reason is not None:
                    self._changed.wait()  # until a batch starts (or the stopped one ends)
                    continue
                if time.monotonic() >= run.deadline:
                    run.stop(INFERENCE_TIMEOUT)
                    continue
                # Woken early when the batch ends; the deadline is kept to the moment.
                left = run.deadline - time.monotonic()
                self._changed.wait(max(0.0, left) if left != float("inf") else None)


def _asked(cancelled: Callable[[], bool]) -> bool:
    """``cancelled()``, where a failure to ask counts as "not cancelled": the batch then runs to its end."""
    try:
        return cancelled()
    except Exception:  # noqa: BLE001 - the backend's IPC failing must not kill the watchdog thread
        return False


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

    def encode_texts(self, texts: Sequence[str], run: Run | None = None) -> Encoded:
        """``run``: the watched batch these texts belong to (RunStopped when it is stopped); None: not watched."""
        return self._run(self.tokenizer.encode_batch(list(texts)), run)

    def encode_pairs(self, pairs: Sequence[tuple[str, str]], run: Run | None = None) -> Encoded:
        return self._run(self.tokenizer.encode_batch(list(pairs)), run)

    def _run(self, encodings: list[Encoding], run: Run | None) -> Encoded:
        lengths = np.array([len(encoding.ids) for encoding in encodings], dtype=np.int32)
        truncated = np.array([bool(encoding.overflowing) for encoding in encodings], dtype=bool)
        order = np.argsort(lengths, kind="stable")
        outputs: list[npt.NDArray[np.float32]] = []
        for bucket in _buckets(lengths[order]):
            rows = [encodings[i] for i in order[bucket]]
            feed = self._feed(rows)
            if run is None:
                outputs.append(self.session.run([self.output_name], feed)[0])
                continue
            options = run.options()
            try:
                outputs.append(self.session.run([self.output_name], feed, options)[0])
            except Exception as error:
                if (stopped := run.stopped()) is None:
                    raise
                raise stopped from error  # onnxruntime's "Exiting due to terminate flag being set to true"
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


def cosine_scores(encoder: OnnxEncoder, pairs: Sequence[tuple[str, str]], run: Run | None = None) -> Encoded:
    """Rerank with a sentence-embedding model: cosine similarity of query and document embeddings.

    Embeddings are normalised in the graph, so the cosine is a dot product. Each distinct text is embedded once.
    """
    if not pairs:  # every request of the batch refused: the einsum below needs [rows, dim] embeddings
        return Encoded(np.zeros((0,), np.float32), np.zeros((0,), np.int32), np.zeros((0,), np.bool_))
    texts = sorted({text for pair in pairs for text in pair})
    index = {text: i for i, text in enumerate(texts)}
    embedded = encoder.encode_texts(texts, run)
    queries = np.array([index[query] for query, _ in pairs], dtype=np.int64)
    documents = np.array([index[document] for _, document in pairs], dtype=np.int64)
    scores = np.einsum("ij,ij->i", embedded.values[queries], embedded.values[documents])
    tokens = embedded.tokens[queries] + embedded.tokens[documents]
    truncated = embedded.truncated[queries] | embedded.truncated[documents]
    return Encoded(scores.astype(np.float32), tokens, truncated)
