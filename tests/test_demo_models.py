"""sluice/demo_models.py: the demo models are built locally, load offline, and are labelled for what they are."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub: never reach a hub

import pytest
import torch

from sluice.demo_models import LABEL_FILE, materialise, minilm_source
from sluice.errors import CompileError

NAMES = ["all-MiniLM-L6-v2", "tiny-cross-encoder", "tiny-llm"]


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="session")
def models(demo_models: dict[str, Path]) -> dict[str, Path]:
    return demo_models


def test_materialise_creates_labelled_models_when_directory_is_empty(models: dict[str, Path]) -> None:
    assert sorted(models) == NAMES
    labels = {name: (path / LABEL_FILE).read_text() for name, path in models.items()}
    assert "Real model" in labels["all-MiniLM-L6-v2"]
    assert "Random-weight test model" in labels["tiny-cross-encoder"]
    assert "meaningless" in labels["tiny-llm"]
    assert "manual_seed(0)" in labels["tiny-llm"]


def test_materialise_keeps_files_and_returns_fast_when_models_are_present(models: dict[str, Path]) -> None:
    mtimes = {name: (path / LABEL_FILE).stat().st_mtime_ns for name, path in models.items()}
    started = time.perf_counter()
    again = materialise(models["tiny-llm"].parent)
    assert time.perf_counter() - started < 0.5
    assert again == models
    assert {name: (path / LABEL_FILE).stat().st_mtime_ns for name, path in again.items()} == mtimes


def test_materialise_raises_compile_error_when_unlabelled_directory_is_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "all-MiniLM-L6-v2").mkdir()
    (tmp_path / "all-MiniLM-L6-v2" / "mine.txt").write_text("a user's own file")
    with pytest.raises(CompileError, match=r"all-MiniLM-L6-v2 exists but is not a Sluice demo model"):
        materialise(tmp_path)
    assert (tmp_path / "all-MiniLM-L6-v2" / "mine.txt").is_file()


def test_materialise_copies_real_minilm_when_built(models: dict[str, Path]) -> None:
    copied = _digests(models["all-MiniLM-L6-v2"])
    assert {k: v for k, v in copied.items() if k != LABEL_FILE} == _digests(minilm_source())


def test_materialise_builds_identical_random_weights_when_built_twice(models: dict[str, Path], tmp_path: Path) -> None:
    # Build only the tiny models a second time: the MiniLM copy is checked above.
    (tmp_path / "all-MiniLM-L6-v2").symlink_to(models["all-MiniLM-L6-v2"], target_is_directory=True)
    rebuilt = materialise(tmp_path)
    for name in ("tiny-cross-encoder", "tiny-llm"):
        assert _digests(rebuilt[name]) == _digests(models[name]), name


def test_tiny_llm_generates_tokens_from_chat_template_when_loaded_offline(models: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models["tiny-llm"], local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(models["tiny-llm"], local_files_only=True).eval()
    messages = [{"role": "user", "content": "Say something about sluice gates."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    started = time.perf_counter()
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    elapsed = time.perf_counter() - started
    new_tokens = output[0, prompt["input_ids"].shape[1] :]
    assert len(new_tokens) == 16
    assert tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "[PAD]")
    assert elapsed < 5.0  # tiny on purpose: about 0.1 s here


def test_tiny_cross_encoder_scores_one_logit_per_pair_when_loaded_offline(models: dict[str, Path]) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models["tiny-cross-encoder"], local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(models["tiny-cross-encoder"], local_files_only=True)
    pairs = tokenizer(["what is a sluice?", "hi"], ["A gate.", "Hello there."], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model.eval()(**pairs).logits
    assert logits.shape == (2, 1)
    assert model.config.architectures == ["BertForSequenceClassification"]
