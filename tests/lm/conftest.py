"""A tiny randomly initialised Llama and its word-level tokenizer, built from a config (no
download). These tests need the optional extra `lm`: scripts/test.sh runs them with
.venv-interop's Python (tests/conftest.py leaves them out where torch is missing)."""

from __future__ import annotations

import re

import pytest
import torch
import transformers

N_LAYERS = 3
D_MODEL = 32

TEXT_A = """The quick brown fox jumps over the lazy dog.
A journey of a thousand miles begins with a single step.
All that glitters is not gold, and not all those who wander are lost.
""" * 6

TEXT_B = """In the beginning was the word, and the word was short.
Sparse autoencoders find features in the residual stream of a model.
""" * 8


def words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text)


@pytest.fixture(scope="session")
def n_layers():
    return N_LAYERS


@pytest.fixture(scope="session")
def texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    (root / "a.txt").write_text(TEXT_A)
    (root / "docs").mkdir()
    (root / "docs" / "b.rst.txt").write_text(TEXT_B)
    (root / "docs" / ".hidden").write_text("not read")
    return root


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Directory of a 3-layer Llama (d_model 32) with a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    out = tmp_path_factory.mktemp("tiny-llama")
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>",
                                         *sorted(set(words(TEXT_A + TEXT_B)))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(out)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(vocab), hidden_size=D_MODEL, intermediate_size=64,
        num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(out)
    return out
