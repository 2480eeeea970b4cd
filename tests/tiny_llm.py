"""A tiny random-weight Llama with a byte-level BPE tokenizer built here (no downloads), and helpers to run and
collect generations; shared by the LLM tests (the ``model_dir`` and ``generator`` fixtures in conftest.py build it
once per session)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from runtimes.llm import BatchGenerator, GenerationEvent, GenerationRequest

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a café serves crème brûlée and naïve tea",
    "hello world, how are you today?",
    "streaming tokens one by one is fun to watch",
]
# Rejects unknown roles the way real templates do, through jinja's raise_exception.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role') }}{% endif %}"
    "<s>{{ m['role'] }}: {{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
PROMPTS = ["the quick brown fox", "hello", "a café serves crème brûlée and naïve tea today, 日本", "fun"]


def build_tokenizer() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    # Byte-level, as in GPT-2 and Llama 3: characters outside the merges span several tokens.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(CORPUS * 5, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny_llm(
    directory: Path, *, max_positions: int = 256, layers: int = 2, attention_scale: float = 1.0, can_end: bool = True
) -> Path:
    """Saves the tiny Llama + tokenizer into ``directory`` (created); returns it. ``attention_scale``: see
    ``sharpen_attention``; ``can_end`` False zeroes the end-of-sequence token's output row too, so that greedy
    generations run to max_tokens (otherwise some prompts end within a hundred tokens)."""
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    steer_to_printable_text(model, tokenizer)
    sharpen_attention(model, attention_scale)
    if not can_end:
        with torch.no_grad():
            model.lm_head.weight[tokenizer.eos_token_id] = 0
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def steer_to_printable_text(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    """Zeroes the output rows of tokens that are not printable ASCII (lone UTF-8 bytes, specials), so greedy
    text is readable and stop strings can be picked from it; random weights alone emit mostly stray bytes."""
    unreadable = [
        token
        for token in range(len(tokenizer))
        if not (text := tokenizer.decode([token])) or not (text.isascii() and text.isprintable())
    ]
    with torch.no_grad():
        model.lm_head.weight[unreadable] = 0


def sharpen_attention(model: LlamaForCausalLM, scale: float) -> None:
    """Scales every layer's query and key projections. At random init they are so small that attention is nearly
    uniform, so the greedy text does not depend on positions: a row shifted by a few positions when merged into a
    running batch writes the same text. Scaled by 8, attention picks tokens by content and position, and a merge or
    trim that misplaces a row changes its text."""
    if scale != 1:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight *= scale
                layer.self_attn.k_proj.weight *= scale


def variant(generator: BatchGenerator, **overrides: Any) -> BatchGenerator:
    """A generator over the same loaded model with other settings."""
    settings: dict[str, Any] = {"max_length": 128, "default_max_tokens": 12} | overrides
    return BatchGenerator(generator.model, generator.tokenizer, **settings)


@dataclass
class Outcome:
    pieces: list[str] = field(default_factory=list)
    final: GenerationEvent | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def collect(events: Iterable[GenerationEvent]) -> dict[int, Outcome]:
    """Groups events by request, checking that nothing follows a request's final event."""
    outcomes: dict[int, Outcome] = {}
    for event in events:
        outcome = outcomes.setdefault(event.index, Outcome())
        assert outcome.final is None, f"event after the final one: {event}"
        if event.final:
            assert event.text == ""
            outcome.final = event
        else:
            outcome.pieces.append(event.text)
    return outcomes


def greedy(prompt: str, **kwargs: Any) -> GenerationRequest:
    return GenerationRequest(text_input=prompt, temperature=0.0, **kwargs)


def run_alone(generator: BatchGenerator, request: GenerationRequest) -> Outcome:
    return collect(generator.generate([request]))[0]
