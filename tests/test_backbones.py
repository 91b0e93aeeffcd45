"""Tests of `modeling.backbones`: the embedded tiny Llama is a real HF checkpoint, loaded like Llama 3."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from modeling.backbones import common, resolve_base_model
from modeling.backbones import embedded as bm
from modeling.backbones.common import (
    EMBEDDED_MODEL_INFO_FILE,
    PAD_TOKEN,
    describe_base_model,
    load_backbone,
    load_causal_lm,
    load_frozen_backbone,
    load_tokenizer,
)
from modeling.backbones.embedded import (
    BOS_TOKEN,
    EOT_TOKEN,
    LLAMA3_CHAT_TEMPLATE,
    LLAMA3_SPECIAL_TOKENS,
    TinyLlamaSpec,
    build_embedded_base_model,
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
    real_save = transformers.LlamaForCausalLM.save_pretrained

    def capture_save(self: torch.nn.Module, *args: object, **kwargs: object) -> object:
        built_model.append(self)
        return real_save(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transformers.LlamaForCausalLM, "save_pretrained", capture_save)
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


def test_frozen_backbone_is_frozen_cacheless_sdpa_and_4bit_needs_a_gpu(model_dir: Path) -> None:
    backbone = load_frozen_backbone(model_dir, "none", torch.float32)
    assert not any(p.requires_grad for p in backbone.parameters())
    assert backbone.config.use_cache is False
    assert backbone.config._attn_implementation == "sdpa"
    assert not hasattr(backbone, "lm_head")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            load_frozen_backbone(model_dir, "4bit", None)


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
    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "save_pretrained", boom)
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

    # a tokenizer of another model beside these weights: refused here, not at the first forward
    other = tmp_path / "other_tokenizer"
    shutil.copytree(model_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "vocab_size": len(tok) - 10}))
    with pytest.raises(
        ValueError, match=f"has {len(tok)} tokens, the model's embedding {len(tok) - 10} rows"
    ):
        describe_base_model(other)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        describe_base_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        describe_base_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        describe_base_model(tmp_path / "missing")


def test_resolve_base_model(tmp_path: Path, model_dir: Path) -> None:
    for blank in (None, "  "):
        source = resolve_base_model(blank, tmp_path)
        expected = ("embedded", tmp_path / "models" / "base_model", False)
        assert (source.kind, source.path, source.user_supplied) == expected
    source = resolve_base_model(str(model_dir), tmp_path)
    assert (source.kind, source.path, source.user_supplied) == ("directory", model_dir.resolve(), True)
    smol = resolve_base_model("SmolLM2-135M-Instruct", tmp_path)
    assert (smol.kind, smol.path) == ("smollm2", tmp_path / "models" / "smollm2-135m-instruct")
    gguf_file = tmp_path / "Meta-Llama-3-8B-Instruct.Q4_K_M.gguf"
    gguf_file.write_bytes(b"GGUF")
    gguf = resolve_base_model(str(gguf_file), tmp_path)
    assert (gguf.kind, gguf.source_file) == ("gguf", gguf_file.resolve())
    assert gguf.path == tmp_path / "models" / "gguf-Meta-Llama-3-8B-Instruct.Q4_K_M"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_base_model("meta-llama/Meta-Llama-3-8B-Instruct", tmp_path)
    with pytest.raises(FileNotFoundError, match="GGUF file"):
        resolve_base_model(str(tmp_path / "missing.gguf"), tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_base_model(str(tmp_path), tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        resolve_base_model(str(tmp_path / "weights.bin"), tmp_path)
    # a `model.gguf` link to a model store's blob (no suffix) is a GGUF file by the name it is given as
    from pipeline.settings import Settings

    blob = tmp_path / "blobs" / "sha256-0123abcd"
    blob.parent.mkdir()
    blob.write_bytes(b"GGUF")
    (tmp_path / "model.gguf").symlink_to(blob)
    settings = Settings.from_env({"DATA_DIR": str(tmp_path), "BASE_MODEL": str(tmp_path / "model.gguf")})
    linked = resolve_base_model(settings.base_model, settings.data_dir)
    assert (linked.kind, linked.source_file, linked.path.name) == ("gguf", blob.resolve(), "gguf-model")


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
    assert common.ensure_pad_token(tok) == "eos"
    assert tok.pad_token == "</s>"
    assert common.ensure_pad_token(tok) == "tokenizer"  # idempotent


# --- pretraining --------------------------------------------------------------------------------------------
def _training_set(n_dates: int = 24, n_symbols: int = 6, seed: int = 0):
    """A small training-set frame: features, split, label, weight, bucket, labels of the future."""
    import numpy as np
    import pandas as pd

    from modeling.feature_registry import FEATURE_NAMES

    rng = np.random.default_rng(seed)
    dates = pd.bdate_range("2021-01-04", periods=n_dates)
    frame = pd.DataFrame(
        [(d, f"S{i:02d}") for d in dates for i in range(n_symbols)], columns=["date", "symbol"]
    )
    frame["sector"] = "Technology"
    for name in FEATURE_NAMES:
        frame[name] = rng.normal(0, 0.02, len(frame))
    frame["rsi_14d"] = rng.uniform(20, 80, len(frame))
    cut = np.searchsorted(dates, dates[[12, 17, 22]])
    position = np.searchsorted(dates, frame["date"])
    frame["split"] = np.select(
        [position < cut[0], position < cut[1], position < cut[2]], ["train", "validation", "test"], "live"
    )
    frame["label"] = rng.normal(size=len(frame))
    frame["fwd_ret"] = frame["label"] * 0.01
    frame["weight"], frame["bucket"] = 1.0, "zero"
    return frame


PRETRAIN = bm.PretrainSpec(
    max_rows=48, epochs=4, batch_size=8, eval_rows=12, warmup_steps=2, learning_rate=1e-2
)
PRETRAIN_SPEC = TinyLlamaSpec(**{**SPEC.__dict__, "vocab_size": 600, "max_position_embeddings": 1024})


@pytest.fixture(scope="module")
def prompt_texts() -> list[str]:
    from modeling.prompt import PromptBuilder, tokenizer_training_texts

    return tokenizer_training_texts(PromptBuilder(), n_rows=400)


def test_pretraining_rows_are_train_rows_without_labels() -> None:
    frame = _training_set()
    resampled = __import__("pandas").concat([frame, frame[frame["split"] == "train"].head(5)])  # repeats
    train, evaluation = bm.select_pretraining_rows(resampled, PRETRAIN)
    assert len(train) == 48 and (train["split"] == "train").all()
    assert not train.duplicated(["date", "symbol"]).any()
    assert train["date"].max() < frame.loc[frame["split"] == "validation", "date"].min()
    assert len(evaluation) == 12 and (evaluation["split"] == "validation").all()
    for column in ("label", "weight", "bucket", "fwd_ret"):
        assert column not in train.columns and column not in evaluation.columns
    again, _ = bm.select_pretraining_rows(frame, PRETRAIN)
    assert again.equals(bm.select_pretraining_rows(frame, PRETRAIN)[0])
    other, _ = bm.select_pretraining_rows(frame, bm.PretrainSpec(**{**PRETRAIN.__dict__, "seed": 1}))
    assert not other[["date", "symbol"]].equals(again[["date", "symbol"]])


def _pretrained(out: Path, spec: bm.PretrainSpec, texts: list[str], seen: list | None = None) -> Path:
    from modeling.prompt import PromptBuilder

    builder = PromptBuilder()
    train, evaluation = bm.select_pretraining_rows(_training_set(), spec)

    def render(tok):
        if seen is not None:
            seen.append((train.copy(), evaluation.copy()))
        return builder.render_batch(train, tok), builder.render_batch(evaluation, tok)

    return build_embedded_base_model(out, texts, PRETRAIN_SPEC, pretraining=render, pretrain_spec=spec)


def test_pretraining_is_seeded_and_lowers_validation_loss(tmp_path: Path, prompt_texts: list[str]) -> None:
    seen: list = []
    first = _pretrained(tmp_path / "a", PRETRAIN, prompt_texts, seen)
    info = bm.read_embedded_info(first)
    report = info["pretraining"]
    assert info["pretrained"] is True
    assert (report["rows"], report["steps"], report["samples"]) == (48, 24, 192)
    assert report["stopped_by"] == "data" and report["tokens"] > 192 * 100
    # a wide margin: from ~ln(vocab) nats per token at random init to well under half of it
    assert report["val_loss_after"] < 0.5 * report["val_loss_before"], report
    # the loss really is that of the saved weights on the held-out (validation) prompts
    train_rows, eval_rows = seen[0]
    assert set(train_rows["split"]) == {"train"} and set(eval_rows["split"]) == {"validation"}
    from modeling.prompt import PromptBuilder

    tok = load_tokenizer(first)
    texts = PromptBuilder().render_batch(eval_rows, tok)
    assert bm.lm_loss_per_token(load_causal_lm(first), tok, texts) == pytest.approx(
        report["val_loss_after"], rel=1e-5
    )
    from modeling.backbones.embedded.pretrain import value_vocabulary

    numbers = value_vocabulary(tok)
    assert bm.lm_loss_per_token(load_causal_lm(first), tok, texts, vocabulary=numbers) == pytest.approx(
        report["val_value_loss_after"], rel=1e-5
    )
    assert report["val_value_loss_after"] < 0.5 * report["val_value_loss_before"], report

    again = _pretrained(tmp_path / "b", PRETRAIN, prompt_texts)
    assert _dir_digest(again)["model.safetensors"] == _dir_digest(first)["model.safetensors"]
    other = _pretrained(tmp_path / "c", bm.PretrainSpec(**{**PRETRAIN.__dict__, "seed": 5}), prompt_texts)
    assert _dir_digest(other)["model.safetensors"] != _dir_digest(first)["model.safetensors"]


def test_the_value_token_loss_is_the_causal_lm_loss_on_the_numbers_tokens_only(
    tmp_path: Path, prompt_texts: list[str]
) -> None:
    """`loss_tokens="values"`: the cross-entropy of the full LM head's logits, averaged over the targets
    that are part of a number (hand-computed here from `model(...).logits`), and a pretraining with it
    still learns the held-out prompts."""
    import torch

    from modeling.backbones.embedded.pretrain import _lm_batch, value_token_loss, value_vocabulary
    from modeling.inference import encode_prompts

    with pytest.raises(ValueError, match="loss_tokens"):
        bm.PretrainSpec(loss_tokens="numbers")
    spec = bm.PretrainSpec(**{**PRETRAIN.__dict__, "loss_tokens": "values"})
    built = _pretrained(tmp_path / "v", spec, prompt_texts)
    report = bm.read_embedded_info(built)["pretraining"]
    # what it trains: the held-out prompts' number tokens, from ~ln(vocab) to well under half of it
    assert report["steps"] == 24, report
    assert report["val_value_loss_after"] < 0.5 * report["val_value_loss_before"], report
    tok, model = load_tokenizer(built), load_causal_lm(built)
    vocabulary = value_vocabulary(tok)
    decoded = {tok.decode([i]): bool(vocabulary[i]) for i in range(len(tok))}
    assert all(decoded[d] for d in "0123456789." if d in decoded) and decoded.get(".", True)
    assert not any(flag for text, flag in decoded.items() if text.strip() in ("return", "Stock", "vol"))
    batch = _lm_batch(tok, encode_prompts(tok, prompt_texts[:6]))
    with torch.no_grad():
        ours = value_token_loss(model, batch, vocabulary)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets.clamp(min=0), reduction="none"
    )
    kept = (targets != -100) & vocabulary[targets.clamp(min=0)]
    assert 0.2 < float(kept.sum() / (targets != -100).sum()) < 0.8  # numbers, not the whole prompt
    assert float(ours) == pytest.approx(float(per_token[kept].mean()), rel=1e-5)
    # the full loss averages the template's tokens in: it is another number
    assert float(ours) != pytest.approx(float(per_token[targets != -100].mean()), rel=1e-2)


def test_pretraining_caps_and_the_random_ablation(tmp_path: Path, prompt_texts: list[str]) -> None:
    capped = bm.read_embedded_info(
        _pretrained(tmp_path / "a", bm.PretrainSpec(**{**PRETRAIN.__dict__, "max_steps": 3}), prompt_texts)
    )
    assert (capped["pretraining"]["steps"], capped["pretraining"]["stopped_by"]) == (3, "max_steps")
    random_init = bm.read_embedded_info(
        _pretrained(tmp_path / "b", bm.PretrainSpec(max_rows=0, eval_rows=4), prompt_texts)
    )
    assert random_init["pretrained"] is False and random_init["pretraining"]["steps"] == 0
    assert random_init["pretraining"]["val_loss_after"] == random_init["pretraining"]["val_loss_before"]


def test_reuse_decision_rebuilds_only_when_needed() -> None:
    info = {"build_key": "k1", "pretrain_train_dates": ["2020-01-02", "2021-06-30"]}
    assert bm.reuse_decision(None, "k1", "2021-06-30")[0] is False
    assert bm.reuse_decision(info, "k1", "2021-06-30")[0] is True
    assert bm.reuse_decision(info, "k1", "2021-07-30")[0] is True  # a new day moved the train end later
    assert bm.reuse_decision(info, "k2", "2021-07-30") == (False, "its config or code version changed")
    keep, why = bm.reuse_decision(info, "k1", "2021-05-31")  # the split moved earlier: would leak
    assert keep is False and "after the current train end" in why


# --- GGUF ------------------------------------------------------------------------------------------------
def test_gguf_converts_and_round_trips_with_the_same_logits(tmp_path: Path, model_dir: Path) -> None:
    from modeling.backbones.common import SOURCE_INFO_FILE, file_sha256
    from modeling.backbones.gguf import convert_gguf
    from tests.gguf_writer import write_llama_gguf

    gguf_file = write_llama_gguf(model_dir, tmp_path / "tiny.gguf")
    out = tmp_path / "converted"
    info = convert_gguf(gguf_file, out)
    assert (info["quantisation"], info["architecture"], info["source_file"]) == (
        "ALL_F32",
        "llama",
        "tiny.gguf",
    )
    assert info["source_sha256"] == file_sha256(gguf_file)
    assert json.loads((out / SOURCE_INFO_FILE).read_text()) == info
    # a plain checkpoint: no quantisation config survives into config.json
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    ids = torch.randint(0, SPEC.vocab_size - 10, (2, 24))
    with torch.no_grad():
        expected = load_causal_lm(model_dir).eval()(ids).logits
        got = load_causal_lm(out).eval()(ids).logits
    assert torch.equal(expected, got)
    tok, ref = load_tokenizer(out), load_tokenizer(model_dir)
    assert tok.chat_template == ref.chat_template
    prompt = ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert (
        tok(prompt, add_special_tokens=False)["input_ids"]
        == ref(prompt, add_special_tokens=False)["input_ids"]
    )
    # converted once: a second call with the same file leaves the directory untouched
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    convert_gguf(gguf_file, out)
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_llama31_gguf_keeps_its_rope_scaling(tmp_path: Path, model_dir: Path) -> None:
    """llama.cpp keeps Llama 3.1/3.2's "llama3" RoPE scaling only as the `rope_freqs.weight` tensor, which
    transformers drops: the converted config must carry the parameters that reproduce it (a plain RoPE is
    another model), and a tensor no known parameter set reproduces is refused."""
    from modeling.backbones.gguf import convert_gguf, llama3_rope_factors
    from tests.gguf_writer import write_llama_gguf

    config = json.loads((model_dir / "config.json").read_text())
    theta = float(config.get("rope_parameters", {}).get("rope_theta", config.get("rope_theta")))
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    factors = llama3_rope_factors(theta, head_dim, 32.0, 1.0, 4.0, 8192)  # Llama 3.2's
    assert 1.0 in factors and 32.0 in factors  # precondition: both ends of the scaling are in play
    out = tmp_path / "converted"
    convert_gguf(write_llama_gguf(model_dir, tmp_path / "llama32.gguf", rope_freqs=factors), out)
    rope = json.loads((out / "config.json").read_text())["rope_parameters"]
    assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == (
        "llama3",
        32.0,
        8192,
    )
    assert rope["rope_theta"] == theta
    plain = tmp_path / "plain"
    convert_gguf(write_llama_gguf(model_dir, tmp_path / "plain.gguf"), plain)
    assert json.loads((plain / "config.json").read_text())["rope_parameters"]["rope_type"] == "default"
    odd = write_llama_gguf(model_dir, tmp_path / "odd.gguf", rope_freqs=[2.0] * len(factors))
    with pytest.raises(ValueError, match="no known Llama 3 parameter set reproduces"):
        convert_gguf(odd, tmp_path / "odd")


def test_quantised_gguf_is_dequantised_exactly(tmp_path: Path, model_dir: Path) -> None:
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    from modeling.backbones.gguf import convert_gguf
    from tests.gguf_writer import write_llama_gguf

    info = convert_gguf(write_llama_gguf(model_dir, tmp_path / "q8.gguf", q8_tensors=True), tmp_path / "q8")
    assert info["quantisation"] == "Q8_0" and info["tensor_types"]["Q8_0"] == 3 * SPEC.num_hidden_layers
    original = load_file(model_dir / "model.safetensors")
    converted = load_file(tmp_path / "q8" / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    q8 = gguf.GGMLQuantizationType.Q8_0
    expected = gguf.quants.dequantize(gguf.quants.quantize(original[name].numpy(), q8), q8)
    assert np.array_equal(converted[name].numpy(), expected)
    assert not torch.equal(converted[name], original[name])  # it really was quantised
    assert torch.equal(
        converted["model.layers.0.self_attn.v_proj.weight"],
        original["model.layers.0.self_attn.v_proj.weight"],
    )


# --- SmolLM2 -------------------------------------------------------------------------------------------
def test_smollm2_is_a_real_pretrained_model(smollm2_dir: Path) -> None:
    from modeling.backbones.common import SOURCE_INFO_FILE

    facts = describe_base_model(smollm2_dir)
    assert (facts["model_type"], facts["num_hidden_layers"], facts["hidden_size"]) == ("llama", 30, 576)
    assert facts["vocab_size"] == 49152 and facts["has_chat_template"]
    source = json.loads((smollm2_dir / SOURCE_INFO_FILE).read_text())
    assert source["quantisation"] == "Q4_1" and source["source_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = load_tokenizer(smollm2_dir)
    model = load_causal_lm(smollm2_dir).eval()
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**chat, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, chat["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "5" in answer, answer  # real pretrained weights survived the dequantisation


def test_smollm2_renders_the_prompt_corpus_with_its_own_template(smollm2_dir: Path) -> None:
    from modeling.prompt import PromptBuilder, count_tokens

    tok = load_tokenizer(smollm2_dir)
    rows = _training_set().head(20)
    prompts = PromptBuilder().render_batch(rows, tok)
    assert prompts[0].startswith("<|im_start|>system\nYou are a quantitative equity analyst")
    assert prompts[0].endswith("<|im_start|>assistant\n")
    n_tokens = count_tokens(tok, prompts)
    assert 150 < n_tokens.mean() < 600
    from modeling.inference import encode_prompts

    assert encode_prompts(tok, prompts) == tok(prompts, add_special_tokens=False)["input_ids"]


def test_pretraining_uses_the_trainers_parameter_groups_and_schedule() -> None:
    """One `param_groups` and one `lr_factor` (modeling.optim) for the regressor and backbone pretraining:
    decay on the matrices only; warm-up then cosine to the floor, step by step."""
    import math

    from modeling.backbones.embedded.pretrain import PretrainSpec, _optimizer_and_schedule

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    spec = PretrainSpec(learning_rate=2e-3, warmup_steps=4, min_lr_ratio=0.1, weight_decay=0.05)
    optimizer, scheduler = _optimizer_and_schedule(model, spec, total_steps=20)
    decay = {g["name"]: (g["weight_decay"], len(g["params"])) for g in optimizer.param_groups}
    assert decay == {"adapter": (0.05, 1), "adapter_no_decay": (0.0, 3)}  # the weight; biases and norm
    lrs = []
    for _ in range(21):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(1e-3) and lrs[4] == pytest.approx(2e-3)
    cosine_mid = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))  # halfway through the decay: step 12
    assert lrs[12] == pytest.approx(2e-3 * cosine_mid) and lrs[20] == pytest.approx(2e-4)
