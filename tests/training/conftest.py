"""Fixtures for the training tests: tiny models with a word-level tokenizer, built offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import VOCAB, tiny_llama

from mara_serve.engine.loading import LoadedModel

WORDS = ["<unk>", "</s>"] + [f"w{i}" for i in range(2, VOCAB)]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny tensors on a shared 2-core machine: a second thread only adds barrier waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def word_tokenizer():
    """A real (saveable) word-level tokenizer over the tiny vocabulary: 'wN' ↔ id N."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", pad_token="</s>"
    )


@pytest.fixture
def tiny_lm() -> LoadedModel:
    """A fresh tiny Llama (its runner fuses weights in place) with the word tokenizer."""
    lm = tiny_llama()
    lm.tokenizer = word_tokenizer()
    return lm


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny Llama and its tokenizer saved as a local HF model directory (for the CLI)."""
    d = tmp_path_factory.mktemp("tiny-model")
    tiny_llama().model.save_pretrained(d)
    word_tokenizer().save_pretrained(d)
    return d


def prompt_text(i: int, n: int = 5) -> str:
    """The i-th synthetic prompt: n in-vocabulary words."""
    return " ".join(f"w{2 + (i * 7 + j * 3) % (VOCAB - 2)}" for j in range(n))


@pytest.fixture
def make_tokenizer():
    return word_tokenizer


@pytest.fixture
def make_prompt_text():
    return prompt_text
