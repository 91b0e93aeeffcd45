"""Shared fixtures: a locally trained Llama-3-style tokenizer (built once per session)."""

import pytest

from modeling.base_model import train_tokenizer
from modeling.prompt import PromptBuilder, tokenizer_training_texts


@pytest.fixture(scope="session")
def prompt_tokenizer():
    """The embedded tokenizer recipe at a small size: trained on prompt-like text, digits split."""
    return train_tokenizer(tokenizer_training_texts(PromptBuilder(), n_rows=3000, seed=1), vocab_size=1024)
