"""Batched, streaming text generation over a Hugging Face causal LM: the logic behind the LLM service's
``model.py``, kept free of Triton so it can be tested on its own.

A ``RunningBatch`` holds the sequences decoding together and their shared KV cache. Rows join it at any step
boundary (their left-padded prefill is merged into the cache) and leave it at once when they finish (EOS, stop
string, max_tokens), are cancelled or run past their deadline, so a finished row stops costing compute and a new
one need not wait for the longest (continuous batching; ``runtimes/llm_engine.py`` schedules it). The cache's
left padding is trimmed whenever rows leave, so it never holds more than rows x max_length tokens.

Imports nothing from the rest of Sluice: this package is copied next to the compiled ``1/model.py``.
"""

from __future__ import annotations

import inspect
import math
import random
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

FinishReason = Literal["stop", "length", "cancelled", "timeout"]
# Why a request ended in error: its input (INVALID_ARG), no room for it now (UNAVAILABLE: a client may retry),
# or the model failing (INTERNAL).
ErrorCode = Literal["invalid", "unavailable", "internal"]

# Tokens of the prompt's tail decoded with the first generated tokens, so a SentencePiece "▁word" token keeps
# its leading space (decoded alone it would lose it). The same window size as TGI and vLLM.
_DETOKENIZE_CONTEXT = 5


def _never_cancelled() -> bool:
    return False


@dataclass(frozen=True)
class GenerationRequest:
    """One generation request. Field names follow the LLM tensor contract (``runtimes/signatures.py``), so a
    validation error names the input a client got wrong.

    Exactly one of ``text_input`` (a prompt, tokenised as is) or ``messages`` (``[{"role", "content"}, ...]``,
    rendered with the tokenizer's chat template) is given. Defaults follow the OpenAI API: temperature 1 and
    top_p 1; temperature 0 means greedy. ``max_tokens`` None takes the generator's default.
    """

    text_input: str | None = None
    messages: Sequence[Mapping[str, str]] | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # Consulted before every decode step: the client went away (Triton's response_sender.is_cancelled).
    is_cancelled: Callable[[], bool] = field(default=_never_cancelled, compare=False, repr=False)

    def __post_init__(self) -> None:
        _check_prompt(self.text_input, self.messages)
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not -(2**63) <= self.seed < 2**64):
            raise ValueError(f"seed must fit in 64 bits, got {self.seed!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {list(self.stop)!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_prompt(text_input: str | None, messages: Sequence[Mapping[str, str]] | None) -> None:
    if (text_input is None) == (messages is None):
        raise ValueError("exactly one of text_input or messages must be given")
    if text_input is not None and (not isinstance(text_input, str) or not text_input):
        raise ValueError("text_input must be a non-empty string")
    if messages is None:
        return
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not all(
            isinstance(message.get(key), str) for key in ("role", "content")
        ):
            raise ValueError(f"messages[{i}] must be an object with string fields role and content")


@dataclass(frozen=True)
class GenerationEvent:
    """What the decode loop reports for the request named ``index`` (its position in the list given to
    ``generate``, or the id it was prepared with): a piece of text, or the final event (``finish_reason`` or
    ``error`` set, empty text). Token counts are running totals; ``code`` says what kind of error it is."""

    index: int
    text: str = ""
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    code: ErrorCode = "invalid"

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces that are safe to show.

    Each piece is the difference between decoding a small window with and without the newest tokens (the TGI
    and vLLM method), so byte-level BPE characters split over several tokens and wordpiece/SentencePiece
    spacing come out as a full decode would. Text ending in U+FFFD (half a UTF-8 character) is held back.
    """

    def __init__(self, tokenizer: Any, context_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._ids = list(context_ids[-_DETOKENIZE_CONTEXT:])
        self._prefix = 0  # start of the decode window
        self._read = len(self._ids)  # tokens before this were emitted already

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        piece = self._pending_text()
        if not piece or piece.endswith("\ufffd"):
            return ""  # nothing new yet, or half a character: wait for the next token
        # Drop what the window no longer needs, so decoding stays O(window) per token.
        del self._ids[: self._read]
        self._prefix, self._read = 0, len(self._ids)
        return piece

    def flush(self) -> str:
        """The text not emitted yet, incomplete characters included; call once, when the row ends."""
        return self._pending_text()

    def _pending_text(self) -> str:
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        # As vLLM: no startswith check, so a decoder that rewrites earlier text (clean-up of spaces) cannot
        # stall the stream for good.
        return after[len(before) :]

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))


class StopStringBuffer:
    """Cuts the streamed text at the first stop string. Text that might be the start of a stop string split
    over several tokens is held back until the next piece settles it; the stop string itself never leaves."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Returns the text safe to emit and whether a stop string was reached."""
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            safe, self._pending = self._pending[: min(hits)], ""
            return safe, True
        held = self._held_length()
        cut = len(self._pending) - held
        safe, self._pending = self._pending[:cut], self._pending[cut:]
        return safe, False

    def flush(self) -> str:
        text, self._pending = self._pending, ""
        return text

    def _held_length(self) -> int:
        """Length of the longest suffix of the pending text that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(stop[:size]):
                    longest = size
                    break
        return longest


@dataclass(eq=False)  # rows compare by identity
class _Row:
    """A request being decoded: its place in the caller's list, budget, sampler and text pipeline."""

    index: int
    request: GenerationRequest
    prompt_ids: list[int]
    max_new_tokens: int
    sampler: torch.Generator | None  # None: greedy
    detokenizer: IncrementalDetokenizer
    stops: StopStringBuffer
    completion_tokens: int = 0
    deadline: float = math.inf  # inference_timeout, counted from when the row joins a running batch

    def event(self, text: str = "", finish_reason: FinishReason | None = None) -> GenerationEvent:
        return GenerationEvent(self.index, text, finish_reason, len(self.prompt_ids), self.completion_tokens)


# A pass over the live rows: yields their events, returns the rows still generating.
_Stepper = Generator[GenerationEvent, None, list[_Row]]


class _Batch:
    """The decode state shared by the live rows: KV cache, attention mask and each row's next position.

    Rows are left-padded: each row's real tokens are the last ones of its mask, contiguous, so rows of any
    lengths line up on the newest column, and columns that are padding for every row can be cut from the left.
    """

    def __init__(self, cache: DynamicCache, attention_mask: torch.Tensor, next_position: torch.Tensor):
        self.cache = cache
        self.attention_mask = attention_mask
        self.next_position = next_position

    def keep(self, rows: torch.Tensor) -> None:
        """Keeps only the given batch rows, then drops the padding no remaining row needs. ``reorder_cache`` (an
        index_select on the batch dim) works for every cache layer type, unlike ``batch_select_indices``."""
        self.cache.reorder_cache(rows)  # type: ignore[arg-type]  # a LongTensor; the stubs want the legacy type
        self.attention_mask = self.attention_mask[rows]
        self.next_position = self.next_position[rows]
        padding = self.attention_mask.shape[1] - int(self.attention_mask.sum(-1).max())
        if padding > 0:
            self.attention_mask = self.attention_mask[:, padding:]
            _map_cache(self.cache, lambda t: t[:, :, padding:, :])

    def pad_left(self, columns: int) -> None:
        """Adds ``columns`` of padding before every row: zero keys and values under a zero mask, which attention
        gives exactly zero weight."""
        if columns > 0:
            self.attention_mask = torch.nn.functional.pad(self.attention_mask, (columns, 0))
            _map_cache(self.cache, lambda t: torch.nn.functional.pad(t, (0, 0, columns, 0)))

    def merge(self, other: _Batch) -> None:
        """Appends ``other``'s rows (a fresh prefill) after this batch's, left-padding the narrower of the two."""
        width = max(self.attention_mask.shape[1], other.attention_mask.shape[1])
        for batch in (self, other):
            batch.pad_left(width - batch.attention_mask.shape[1])
        self.attention_mask = torch.cat([self.attention_mask, other.attention_mask])
        self.next_position = torch.cat([self.next_position, other.next_position])
        for mine, theirs in zip(_cache_layers(self.cache), _cache_layers(other.cache), strict=True):
            mine.keys = torch.cat([mine.keys, theirs.keys])
            mine.values = torch.cat([mine.values, theirs.values])


def _cache_layers(cache: DynamicCache) -> list[Any]:
    """The cache's per-layer key/value holders. Only full-attention layers can be merged and trimmed this way
    (``check_mergeable`` refuses the rest at load)."""
    return list(cache.layers)


def _map_cache(cache: DynamicCache, change: Callable[[torch.Tensor], torch.Tensor]) -> None:
    for layer in _cache_layers(cache):
        layer.keys, layer.values = change(layer.keys), change(layer.values)


def check_mergeable(model: Any) -> None:
    """Refuses a model whose cache layers are not plain full-attention ``DynamicLayer``s (sliding windows,
    recurrent state): merging rows pads them on the left, which only those layers allow."""
    cache = DynamicCache(config=model.config)
    kinds = sorted({type(layer).__name__ for layer in _cache_layers(cache)} - {"DynamicLayer"})
    if kinds:
        raise ValueError(
            f"continuous batching needs full-attention cache layers; this model has {', '.join(kinds)}"
        )


class BatchGenerator:
    """A loaded model and tokenizer, and how to decode with them: ``prepare`` turns requests into rows, a
    ``RunningBatch`` decodes rows together, ``generate`` runs one static batch to the end.

    ``max_length`` is the context: a prompt must leave room for at least one token, and generation stops
    with ``length`` when prompt + completion reach it. ``timeout_s`` (None or 0: none) is each request's
    inference_timeout, counted from when it joins a running batch. ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_length: int,
        default_max_tokens: int,
        timeout_s: float | None = None,
        eos_token_ids: Sequence[int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        if default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be positive, got {default_max_tokens}")
        self.model = model.eval()
        self._device = next(model.parameters()).device
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.default_max_tokens = default_max_tokens
        self.timeout_s = timeout_s if timeout_s and timeout_s > 0 else None
        self.eos_token_ids = frozenset(_eos_ids(model, tokenizer) if eos_token_ids is None else eos_token_ids)
        self._pad_id = _pad_id(tokenizer, self.eos_token_ids)
        self._clock = clock
        forward_params = inspect.signature(model.forward).parameters
        # transformers 5.x renames past_key_values to cache (the old name goes in 5.40); 4.x has only the old.
        self._cache_kwarg = "cache" if "cache" in forward_params else "past_key_values"
        # logits_to_keep=1 spares the prefill a [batch, prompt, vocab] logits tensor; not every model has it.
        self._prefill_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in forward_params else {}

    def generate(self, requests: Sequence[GenerationRequest]) -> Iterator[GenerationEvent]:
        """Decodes ``requests`` together to the end (static batching: nothing joins once they start); yields text
        pieces as they become safe to show and exactly one final event per request."""
        batch = RunningBatch(self)
        rows: list[_Row] = []
        for index, request in enumerate(requests):
            row_or_error = self.prepare(index, request)
            if isinstance(row_or_error, GenerationEvent):
                yield row_or_error
            else:
                rows.append(row_or_error)
        yield from batch.join(rows)
        while batch:
            yield from batch.step()

    def prepare(self, index: int, request: GenerationRequest) -> _Row | GenerationEvent:
        """Tokenises a request into a row that can join a batch, or rejects it alone when its prompt cannot be
        used. ``index`` is the caller's name for the request: its events carry it."""
        try:
            prompt_ids = self._tokenize(request)
        except ValueError as exc:
            return GenerationEvent(index, error=str(exc))
        source = "messages" if request.messages is not None else "text_input"
        if not prompt_ids:
            return GenerationEvent(index, error=f"{source}: the prompt has no tokens")
        if len(prompt_ids) >= self.max_length:
            return GenerationEvent(
                index,
                prompt_tokens=len(prompt_ids),
                error=f"{source}: the prompt has {len(prompt_ids)} tokens; the context (max_length) is "
                f"{self.max_length}, which leaves no room to generate",
            )
        max_tokens = request.max_tokens or self.default_max_tokens
        return _Row(
            index=index,
            request=request,
            prompt_ids=prompt_ids,
            max_new_tokens=min(max_tokens, self.max_length - len(prompt_ids)),
            sampler=_sampler(request),
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_ids),
            stops=StopStringBuffer(request.stop),
        )

    def _tokenize(self, request: GenerationRequest) -> list[int]:
        if request.messages is not None:
            text = self._render_chat(request.messages)
            # The template writes its own special tokens, so none are added again.
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(request.text_input)["input_ids"])

    def _render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        # Rendered to text, not tokenize=True: transformers 5 returns a BatchEncoding there, 4.x a list.
        try:
            return str(
                self.tokenizer.apply_chat_template(
                    [dict(m) for m in messages], add_generation_prompt=True, tokenize=False
                )
            )
        # Re-raised as the request's own error: templates fail in many ways (jinja raise_exception, none set).
        except Exception as exc:
            raise ValueError(f"messages: the chat template rejected them: {exc}") from exc

    def _drop_interrupted(self, rows: list[_Row]) -> _Stepper:
        """Ends cancelled and expired rows before the next step; the generator returns the others."""
        now = self._clock()
        live = []
        for row in rows:
            if row.request.is_cancelled():
                yield row.event(finish_reason="cancelled")
            elif now >= row.deadline:
                yield from _finish(row, "timeout")
            else:
                live.append(row)
        return live

    @torch.inference_mode()
    def _prefill(self, rows: list[_Row]) -> tuple[_Batch, torch.Tensor]:
        """One forward over the left-padded prompts; left padding puts every row's last token in the same
        column, so the next token's logits are the last column for all rows."""
        width = max(len(row.prompt_ids) for row in rows)
        input_ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row.prompt_ids) :] = torch.tensor(row.prompt_ids)
            attention_mask[i, width - len(row.prompt_ids) :] = 1
        input_ids, attention_mask = input_ids.to(self._device), attention_mask.to(self._device)
        # Positions count real tokens only, so a padded row sees the same positions as when run alone.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        # The model fills this cache in place; _Batch keeps it between steps.
        cache = DynamicCache(config=self.model.config)
        output = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self._cache_kwarg: cache},
            **self._prefill_kwargs,
        )
        return _Batch(cache, attention_mask, attention_mask.sum(-1)), output.logits[:, -1, :]

    @torch.inference_mode()
    def _decode_step(self, batch: _Batch, tokens: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
        """One forward for the live rows; ``kept`` (when rows left) drops the others from the batch first."""
        if kept is not None:
            kept = kept.to(self._device)
            batch.keep(kept)
            tokens = tokens[kept]
        batch.attention_mask = torch.cat([batch.attention_mask, torch.ones_like(tokens)[:, None]], dim=-1)
        output = self.model(
            input_ids=tokens[:, None],
            attention_mask=batch.attention_mask,
            position_ids=batch.next_position[:, None],
            use_cache=True,
            **{self._cache_kwarg: batch.cache},
        )
        batch.next_position = batch.next_position + 1
        logits: torch.Tensor = output.logits[:, -1, :]
        return logits

    @torch.inference_mode()
    def _pick_tokens(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        tokens = logits.argmax(dim=-1)
        for i, row in enumerate(rows):
            if row.sampler is not None:
                # Sampled on the CPU, where each request's torch.Generator lives.
                probs_source = logits[i].float().cpu()
                tokens[i] = _sample(probs_source, row.request.temperature, row.request.top_p, row.sampler)
        return tokens

    def _advance(self, rows: list[_Row], tokens: torch.Tensor) -> _Stepper:
        """Feeds each row its new token; yields text and final events, returns the rows still generating."""
        live = []
        for row, token in zip(rows, tokens.tolist(), strict=True):
            row.completion_tokens += 1
            if token in self.eos_token_ids:
                yield from _finish(row, "stop")
                continue
            text, stopped = row.stops.push(row.detokenizer.push(token))
            if stopped:
                if text:
                    yield row.event(text)
                yield row.event(finish_reason="stop")
            elif row.completion_tokens >= row.max_new_tokens:
                if text:
                    yield row.event(text)
                yield from _finish(row, "length")
            else:
                if text:
                    yield row.event(text)
                live.append(row)
        return live


class RunningBatch:
    """The rows decoding together. ``join`` adds rows at a step boundary, ``step`` advances every row by one
    token; rows leave as they end. Between calls the batch holds, for each row, the logits of its next token.

    Not thread-safe: one thread (the engine's) drives it.
    """

    def __init__(self, generator: BatchGenerator) -> None:
        self._generator = generator
        self._rows: list[_Row] = []
        self._batch: _Batch | None = None
        self._logits: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def tokens_held(self) -> int:
        """Positions in the KV cache: rows x width, padding included (bounded by rows x max_length)."""
        return 0 if self._batch is None else int(self._batch.attention_mask.numel())

    def join(self, rows: Sequence[_Row]) -> Iterator[GenerationEvent]:
        """Prefills ``rows`` (cancelled ones end here) and merges them into the batch; their first token comes
        with the next ``step``. Their inference_timeout starts now."""
        generator = self._generator
        joining = yield from generator._drop_interrupted(list(rows))
        if not joining:
            return
        deadline = generator._clock() + generator.timeout_s if generator.timeout_s else math.inf
        for row in joining:
            row.deadline = deadline
        batch, logits = generator._prefill(joining)
        if self._batch is None or self._logits is None:
            self._batch, self._logits = batch, logits
        else:
            self._batch.merge(batch)
            self._logits = torch.cat([self._logits, logits])
        self._rows.extend(joining)

    def step(self) -> Iterator[GenerationEvent]:
        """Gives every row its next token (yielding text and final events), drops the rows that ended, were
        cancelled or ran out of time, and runs the forward that yields the next logits of the others."""
        if not self._rows or self._batch is None or self._logits is None:
            return
        generator, rows = self._generator, self._rows
        tokens = generator._pick_tokens(self._logits, rows)
        live = yield from generator._advance(rows, tokens)
        live = yield from generator._drop_interrupted(live)
        self._rows = live
        if not live:
            self._batch = self._logits = None
            return
        kept = _positions(rows, live) if len(live) < len(rows) else None
        self._logits = generator._decode_step(self._batch, tokens, kept)

    def abort(self) -> list[_Row]:
        """Empties the batch; returns the rows it held (each still owes its client a final event)."""
        rows, self._rows = self._rows, []
        self._batch = self._logits = None
        return rows


def _positions(rows: list[_Row], live: list[_Row]) -> torch.Tensor:
    """Batch positions of the live rows (``live`` is an ordered subset of ``rows``)."""
    live_ids = {id(row) for row in live}
    return torch.tensor([i for i, row in enumerate(rows) if id(row) in live_ids], dtype=torch.long)


def _finish(row: _Row, reason: FinishReason) -> Iterator[GenerationEvent]:
    """Emits what the row still holds back (no stop string can complete any more), then its final event."""
    rest, stopped = row.stops.push(row.detokenizer.flush())
    rest = rest if stopped else rest + row.stops.flush()
    if rest:
        yield row.event(rest)
    yield row.event(finish_reason="stop" if stopped else reason)


def _sampler(request: GenerationRequest) -> torch.Generator | None:
    """A generator per request, so its samples depend on its seed only, not on the batch it lands in."""
    if request.temperature == 0:
        return None
    seed = request.seed if request.seed is not None else random.SystemRandom().getrandbits(63)
    return torch.Generator().manual_seed(seed)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, sampler: torch.Generator) -> int:
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        probs, order = probs.sort(descending=True)
        # Keep the smallest head whose mass reaches top_p (the first token always stays).
        probs[(probs.cumsum(-1) - probs) >= top_p] = 0
        return int(order[torch.multinomial(probs, 1, generator=sampler)])
    return int(torch.multinomial(probs, 1, generator=sampler))


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids


def _pad_id(tokenizer: Any, eos_ids: frozenset[int]) -> int:
    """Any id will do: padded positions are masked out. The tokenizer's pad, else an EOS, else 0."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return min(eos_ids, default=0)


def load_generator(
    model_dir: str | Path,
    *,
    threads: int,
    max_length: int,
    device: str = "cpu",
    default_max_tokens: int,
    timeout_s: float | None = None,
) -> BatchGenerator:
    """Loads a model and tokenizer from a local directory (never the network) into a ``BatchGenerator``.

    ``threads`` > 0 sets torch's intra-op threads (process-wide); 0 leaves torch's default. ``device`` is a
    torch device ("cpu", "cuda:0").
    """
    if threads > 0:
        torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    model.to(torch.device(device))  # in place for modules
    context = _model_context(model.config)
    if context is not None and max_length > context:
        raise ValueError(f"max_length {max_length} exceeds the model's {context} positions ({model_dir})")
    return BatchGenerator(
        model, tokenizer, max_length=max_length, default_max_tokens=default_max_tokens, timeout_s=timeout_s
    )


def _model_context(config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None
