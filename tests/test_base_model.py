"""Tests of `modeling.base_model`: the embedded tiny Llama is a real HF checkpoint, loaded like Llama 3."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import torch

from modeling import base_model as bm
from modeling.base_model import (
    BOS_TOKEN,
    EMBEDDED_MODEL_INFO_FILE,
    EOT_TOKEN,
    LLAMA3_CHAT_TEMPLATE,
    LLAMA3_SPECIAL_TOKENS,
    PAD_TOKEN,
    TinyLlamaSpec,
    build_embedded_base_model,
    describe_base_model,
    load_backbone,
    load_causal_lm,
    load_tokenizer,
    resolve_base_model_dir,
    train_tokenizer,
)

SPEC = TinyLlamaSpec(
    vocab_size=512,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def _prompt_lines(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        symbol = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(rng.randint(2, 4)))
        date = f"20{rng.randint(10, 24)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        lines.append(
            f"Symbol: {symbol} | Date: {date}\n"
            f"1d return %: {rng.uniform(-6, 6):.2f}\n"
            f"20d daily vol %: {rng.uniform(0.3, 5):.2f}"
        )
    return lines


TEXTS = _prompt_lines()
MESSAGES = [
    {"role": "system", "content": "Predict the next 5-day return in percent."},
    {"role": "user", "content": TEXTS[0]},
]


def _dir_digest(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_embedded_base_model(tmp_path_factory.mktemp("base") / "base_model", TEXTS, SPEC)


def test_chat_template_is_llama3_verbatim() -> None:
    expected = (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
        "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
        "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
        "{{ content }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    )
    assert expected == LLAMA3_CHAT_TEMPLATE


def test_build_writes_a_standard_hf_checkpoint(model_dir: Path) -> None:
    names = {f.name for f in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", EMBEDDED_MODEL_INFO_FILE} <= names
    info = json.loads((model_dir / EMBEDDED_MODEL_INFO_FILE).read_text())
    assert info["spec"]["seed"] == SPEC.seed
    assert info["spec"]["hidden_size"] == SPEC.hidden_size
    assert info["n_training_texts"] == len(TEXTS)
    # No temporary build directories are left next to the model.
    assert [p.name for p in model_dir.parent.iterdir()] == [model_dir.name]


def test_round_trip_gives_same_logits_and_backbone_hidden_states(tmp_path: Path) -> None:
    out = tmp_path / "m"
    built_model: list[torch.nn.Module] = []
    real_save = bm.LlamaForCausalLM.save_pretrained

    def capture_save(self: torch.nn.Module, *args: object, **kwargs: object) -> object:
        built_model.append(self)
        return real_save(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bm.LlamaForCausalLM, "save_pretrained", capture_save)
        build_embedded_base_model(out, TEXTS, SPEC)
    (original,) = built_model

    tok = load_tokenizer(out)
    batch = tok([TEXTS[1], TEXTS[2][:30]], return_tensors="pt", padding=True)
    loaded = load_causal_lm(out).eval()
    assert loaded.dtype == torch.float32
    with torch.no_grad():
        expected = original(**batch).logits
        got = loaded(**batch).logits
    assert torch.equal(expected, got)

    backbone = load_backbone(out).eval()
    assert not hasattr(backbone, "lm_head")
    with torch.no_grad():
        hidden = backbone(**batch).last_hidden_state
    n, t = batch["input_ids"].shape
    assert hidden.shape == (n, t, SPEC.hidden_size)
    assert torch.isfinite(hidden).all()


def test_build_is_deterministic_under_the_seed(tmp_path: Path, model_dir: Path) -> None:
    again = build_embedded_base_model(tmp_path / "again", TEXTS, SPEC)
    # Bit-identical weights, tokenizer and config.
    assert _dir_digest(again) == _dir_digest(model_dir)
    a = load_causal_lm(model_dir).state_dict()
    b = load_causal_lm(again).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)

    other_seed = TinyLlamaSpec(**{**SPEC.__dict__, "seed": SPEC.seed + 1})
    c = load_causal_lm(build_embedded_base_model(tmp_path / "other", TEXTS, other_seed)).state_dict()
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_build_does_not_disturb_global_rng(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_embedded_base_model(tmp_path / "m", TEXTS[:50], SPEC)
    assert torch.equal(torch.rand(3), expected)


def test_chat_template_is_applied(model_dir: Path) -> None:
    tok = load_tokenizer(model_dir)
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    for special in LLAMA3_SPECIAL_TOKENS:
        ids = tok(special, add_special_tokens=False)["input_ids"]
        assert ids == [tok.convert_tokens_to_ids(special)], special
    # Like Llama 3: plain encoding prepends bos; the rendered chat already holds it, and tokenizing the
    # chat directly yields exactly one bos.
    assert tok("x")["input_ids"][0] == tok.bos_token_id
    chat_ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"]
    assert chat_ids == tok(text, add_special_tokens=False)["input_ids"]
    assert chat_ids.count(tok.bos_token_id) == 1
    assert tok.convert_tokens_to_ids([EOT_TOKEN]) == [tok.eos_token_id]


def test_digits_are_split_and_pad_differs_from_eos(model_dir: Path) -> None:
    tok = load_tokenizer(model_dir)
    ids = tok("12345", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["1", "2", "3", "4", "5"]
    # Digits inside a prompt line are split the same way, and text decodes back exactly.
    line = "1d return %: -10.25"
    tokens = tok.convert_ids_to_tokens(tok(line, add_special_tokens=False)["input_ids"])
    assert [t for t in tokens if any(c.isdigit() for c in t)] == ["1", "1", "0", "2", "5"]
    assert tok.decode(tok(line)["input_ids"], skip_special_tokens=True) == line
    assert tok.pad_token == PAD_TOKEN
    assert tok.bos_token == BOS_TOKEN
    assert tok.pad_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.model_max_length == SPEC.max_position_embeddings


def test_train_tokenizer_is_deterministic() -> None:
    a = train_tokenizer(TEXTS, 400)
    b = train_tokenizer(iter(TEXTS), 400)
    assert a.get_vocab() == b.get_vocab()
    assert len(a) <= 400
    with pytest.raises(ValueError, match="at least one text"):
        train_tokenizer([], 400)
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(TEXTS, 100)


def test_load_tokenizer_sets_missing_pad_and_requires_chat_template(tmp_path: Path, model_dir: Path) -> None:
    import shutil

    no_pad = tmp_path / "no_pad"
    shutil.copytree(model_dir, no_pad)
    cfg_file = no_pad / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.pop("pad_token", None)
    cfg_file.write_text(json.dumps(cfg))
    assert load_tokenizer(no_pad).pad_token == PAD_TOKEN  # real Llama 3 ships without a pad token

    no_template = tmp_path / "no_template"
    shutil.copytree(model_dir, no_template)
    for f in no_template.glob("chat_template*"):
        f.unlink()
    cfg_file = no_template / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.pop("chat_template", None)
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no chat template"):
        load_tokenizer(no_template)


def test_failed_build_leaves_previous_model_intact(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    out = tmp_path / "base_model"
    shutil.copytree(model_dir, out)
    before = _dir_digest(out)

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    # Fails after the weights were written to the temporary directory.
    monkeypatch.setattr(bm.PreTrainedTokenizerFast, "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        build_embedded_base_model(out, TEXTS, TinyLlamaSpec(**{**SPEC.__dict__, "seed": 7}))
    assert _dir_digest(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["base_model"]

    # A successful rebuild replaces the model and leaves nothing else behind.
    monkeypatch.undo()
    build_embedded_base_model(out, TEXTS, TinyLlamaSpec(**{**SPEC.__dict__, "seed": 7}))
    assert _dir_digest(out)["model.safetensors"] != before["model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["base_model"]


def test_describe_base_model(model_dir: Path, tmp_path: Path) -> None:
    facts = describe_base_model(model_dir)
    json.dumps(facts)  # JSON-serialisable
    model = load_causal_lm(model_dir)
    tok = load_tokenizer(model_dir)
    assert facts["model_type"] == "llama"
    assert facts["architectures"] == ["LlamaForCausalLM"]
    assert facts["hidden_size"] == SPEC.hidden_size
    assert facts["num_hidden_layers"] == SPEC.num_hidden_layers
    assert facts["vocab_size"] == len(tok) == model.config.vocab_size
    assert facts["n_parameters"] == sum(p.numel() for p in model.parameters())
    assert facts["n_parameters_source"] == "safetensors"
    assert facts["has_chat_template"] is True
    assert facts["pad_token"] == PAD_TOKEN
    assert facts["path"] == str(model_dir.resolve())

    with pytest.raises(FileNotFoundError, match="no config.json"):
        describe_base_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        describe_base_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        describe_base_model(tmp_path / "missing")


def test_resolve_base_model_dir(tmp_path: Path, model_dir: Path) -> None:
    assert resolve_base_model_dir(None, tmp_path) == (tmp_path / "models" / "base_model", False)
    assert resolve_base_model_dir("  ", tmp_path) == (tmp_path / "models" / "base_model", False)
    assert resolve_base_model_dir(str(model_dir), tmp_path) == (model_dir.resolve(), True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_base_model_dir("meta-llama/Meta-Llama-3-8B-Instruct", tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_base_model_dir(str(tmp_path), tmp_path)


@pytest.mark.parametrize(
    "override",
    [
        {"vocab_size": 100},
        {"hidden_size": 30},
        {"num_key_value_heads": 3},
        {"hidden_size": 12, "num_attention_heads": 4, "num_key_value_heads": 2},
        {"num_hidden_layers": 0},
        {"rope_theta": 0.0},
        {"seed": -1},
    ],
)
def test_spec_validation(override: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        TinyLlamaSpec(**{**SPEC.__dict__, **override})


def test_pad_falls_back_to_eos_without_llama31_pad_token() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    word_level = Tokenizer(models.WordLevel({"a": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=word_level, eos_token="</s>")
    assert tok.pad_token is None
    assert bm._ensure_pad_token(tok) == "eos"
    assert tok.pad_token == "</s>"
    assert bm._ensure_pad_token(tok) == "tokenizer"  # idempotent
