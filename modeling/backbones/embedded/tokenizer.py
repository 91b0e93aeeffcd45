"""The embedded backbone's tokenizer: Llama 3's special tokens and chat template, and a byte-level BPE
trained on the prompt corpus (digits split one by one)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from modeling.backbones.common import (
    PAD_TOKEN,
)

LLAMA3_CHAT_TEMPLATE: str = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
"""The chat template of Meta-Llama-3-8B-Instruct, verbatim (the string is only split for line length).

The embedded model carries the same template as the real checkpoint so that a prompt renders to the same
text, and hence the same token structure, whichever base model is used."""

BOS_TOKEN = "<|begin_of_text|>"
"""Start of every sequence; the chat template and the tokenizer's post-processor both emit it."""
END_OF_TEXT_TOKEN = "<|end_of_text|>"
"""End of a document in pre-training (Llama 3's base-model eos)."""
START_HEADER_TOKEN = "<|start_header_id|>"
"""Opens a message's role header in the chat format."""
END_HEADER_TOKEN = "<|end_header_id|>"
"""Closes a message's role header in the chat format."""
EOT_TOKEN = "<|eot_id|>"
"""End of a chat turn; the eos of the Instruct model."""

LLAMA3_SPECIAL_TOKENS: tuple[str, ...] = (
    BOS_TOKEN,
    END_OF_TEXT_TOKEN,
    START_HEADER_TOKEN,
    END_HEADER_TOKEN,
    EOT_TOKEN,
    PAD_TOKEN,
)
"""The Llama-3 special tokens the embedded tokenizer defines (each encodes to exactly one token)."""

_N_BYTE_SYMBOLS = 256
"""Size of the byte-level alphabet: the smallest vocabulary that can encode any text."""

MAX_POSITION_EMBEDDINGS = 2048
"""Context length of the embedded model (and its tokenizer's model_max_length)."""


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    model_max_length: int = MAX_POSITION_EMBEDDINGS,
) -> PreTrainedTokenizerBase:
    """Train a Llama-3-style byte-level BPE tokenizer on `texts`, locally, and wrap it for transformers.

    Byte-level BPE (as in Llama 3) can encode any string without an unknown token. The pre-tokenizer
    splits every digit on its own before the byte-level split, so a number always tokenizes digit by
    digit, independently of the merges learnt from the corpus. The special tokens are the Llama-3 ones;
    bos is `<|begin_of_text|>`, eos `<|eot_id|>` (the Instruct model's end of turn), pad
    `<|finetune_right_pad_id|>`. Like Llama 3's tokenizer, plain encoding prepends bos; text already
    rendered by the chat template (which writes bos itself) must be encoded with
    `add_special_tokens=False`, exactly as with the real checkpoint.

    Deterministic: the same texts (in the same order) and vocab_size give the same tokenizer.
    """
    corpus = [texts] if isinstance(texts, str) else list(texts)
    if not corpus:
        raise ValueError("train_tokenizer needs at least one text to learn merges from")
    bad = next((t for t in corpus if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"train_tokenizer expects str texts, got {type(bad).__name__}")
    min_vocab = _N_BYTE_SYMBOLS + len(LLAMA3_SPECIAL_TOKENS)
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size must be at least {min_vocab}, got {vocab_size}")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(LLAMA3_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    # Merges were learnt inside GPT-2 regex words (letters, punctuation runs, whitespace), so the vocabulary
    # is made of word pieces as in Llama 3. Encoding then skips the regex split, which is about 3x faster:
    # a learnt merge can only join pieces of one class, so words still tokenize as words (a run of
    # newlines may now take one token instead of two). The digit split stays, so numbers always
    # tokenize digit by digit, and byte-level encoding keeps it lossless (both tested).
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bos_id = tok.token_to_id(BOS_TOKEN)
    # Llama 3's post-processor: byte-level offsets, then bos in front of each sequence.
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN} $A",
                pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B:1",
                special_tokens=[(BOS_TOKEN, bos_id)],
            ),
        ]
    )

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOT_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
    )
    wrapped.chat_template = LLAMA3_CHAT_TEMPLATE
    return wrapped


def _texts_fingerprint(texts: list[str]) -> str:
    """SHA-256 over the texts (length-prefixed, so boundaries count): identifies the tokenizer corpus."""
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()
