"""LLMRegressor: pooling under padding, the last-layer shortcut, what trains, the loss, save/load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import modeling.llama_shortcut as llama_shortcut
import modeling.shared_prefix as shared_prefix
from modeling.backbones.common import load_tokenizer
from modeling.inference import (
    MIN_BATCHES_PER_WORKER,
    cpu_workers,
    encode_prompts,
    merged_adapters,
    pad_batch,
    predict_ids,
    predict_prompts,
)
from modeling.losses import pointwise_loss, weighted_loss
from modeling.model import (
    HeadConfig,
    LoraSettings,
    RegressionHead,
    RegressorConfig,
    build_regressor,
    is_right_padded,
    last_token_index,
    load_regressor,
    save_regressor,
)
from modeling.prompt import PromptBuilder
from tests.conftest import make_training_set


@pytest.fixture(scope="module")
def prompts(tiny_base_model: Path) -> list[str]:
    rows = make_training_set().head(6)
    return PromptBuilder().render_batch(rows, load_tokenizer(tiny_base_model))


def _model(base: Path, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_regressor(base, RegressorConfig(**kwargs))
    # LoRA B starts at zero (adapters are a no-op at init): make them matter for these tests
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model.eval()


def test_last_token_index_under_left_and_right_padding() -> None:
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 3, 0]
    assert last_token_index(left).tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match="no tokens"):
        last_token_index(torch.tensor([[0, 0]]))


@pytest.mark.parametrize("shortcut", [True, False])
@pytest.mark.parametrize("side", ["left", "right"])
def test_pooled_hidden_of_a_padded_batch_matches_the_unpadded_rows(
    tiny_base_model: Path, prompts: list[str], shortcut: bool, side: str
) -> None:
    model = _model(tiny_base_model, last_layer_shortcut=shortcut)
    tok = load_tokenizer(tiny_base_model)
    tok.padding_side = side
    ids = encode_prompts(tok, prompts)
    ids[1] = ids[1][:-17]  # lengths differ: real padding in the batch
    assert len({len(x) for x in ids}) > 1
    with torch.no_grad():
        alone = torch.cat(
            [model.pooled_hidden(torch.tensor([x]), torch.ones(1, len(x), dtype=torch.long)) for x in ids]
        )
        batch = pad_batch(tok, ids)
        padded = model.pooled_hidden(batch["input_ids"], batch["attention_mask"])
    assert (batch["attention_mask"] == 0).any()
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)


def test_is_right_padded() -> None:
    assert is_right_padded(torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]))
    assert not is_right_padded(torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]]))  # left padding
    assert not is_right_padded(torch.tensor([[1, 0, 1, 0]]))  # a hole


def test_a_right_padded_batch_builds_no_mask_and_equals_the_masked_forward(
    tiny_base_model: Path, prompts: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model(tiny_base_model)
    tok = load_tokenizer(tiny_base_model)
    tok.padding_side = "right"
    ids = encode_prompts(tok, prompts)
    ids[1] = ids[1][:-17]
    batch = pad_batch(tok, ids)
    assert (batch["attention_mask"] == 0).any() and is_right_padded(batch["attention_mask"])
    monkeypatch.setattr(shared_prefix, "SCORING_MIN_SHARED_FRACTION", 2.0)  # every row's whole prompt
    built: list[torch.Tensor | None] = []
    real = llama_shortcut._padding_causal_mask
    spy = lambda *a: built.append(real(*a)) or built[-1]  # noqa: E731
    monkeypatch.setattr(llama_shortcut, "_padding_causal_mask", spy)
    with torch.no_grad():
        causal = model(**batch)
        assert not built  # SDPA's own causal path: no [B, 1, T, T] mask
        monkeypatch.setattr(llama_shortcut, "is_right_padded", lambda mask: False)
        masked = model(**batch)
    assert len(built) == 1 and built[0] is not None
    torch.testing.assert_close(causal, masked, atol=1e-6, rtol=0)


def test_last_layer_shortcut_equals_the_full_forward(tiny_base_model: Path, prompts: list[str]) -> None:
    fast, full = _model(tiny_base_model), _model(tiny_base_model, last_layer_shortcut=False)
    tok = load_tokenizer(tiny_base_model)
    batch = pad_batch(tok, encode_prompts(tok, prompts))
    with torch.no_grad():
        torch.testing.assert_close(fast(**batch), full(**batch), atol=1e-5, rtol=0)


def test_only_lora_and_head_train_and_the_backbone_stays_frozen(
    tiny_base_model: Path, prompts: list[str]
) -> None:
    model = _model(tiny_base_model).train()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    # "all-linear": every attention and MLP projection of every layer has an adapter
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable if "lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("lm_head" in n for n, _ in model.named_parameters())  # never loaded
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    tok = load_tokenizer(tiny_base_model)
    batch = pad_batch(tok, encode_prompts(tok, prompts))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = ((model(**batch) - torch.ones(len(prompts))) ** 2).mean()
    loss.backward()
    optimizer.step()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())
    assert any(not torch.equal(after[n], v) for n, v in lora.items())


def test_lora_in_the_last_layers_only_adapts_those_layers_and_survives_save_and_load(
    tiny_base_model: Path, prompts: list[str], tmp_path: Path
) -> None:
    def adapted(model, trainable: bool = True) -> set[tuple[int, str]]:  # (layer, projection) of each LoRA A
        names = [
            n for n, p in model.named_parameters() if "lora_A" in n and (p.requires_grad or not trainable)
        ]
        return {
            (int(n.split(".layers.")[1].split(".")[0]), n.split(".lora_A")[0].rsplit(".", 1)[-1])
            for n in names
        }

    projections = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert adapted(_model(tiny_base_model)) == {(i, p) for i in (0, 1) for p in projections}  # 2 layers
    last = _model(tiny_base_model, lora=LoraSettings(last_layers=1))
    assert adapted(last) == {(1, p) for p in projections}  # attention and MLP, the last layer only
    named = _model(tiny_base_model, lora=LoraSettings(last_layers=1, target_modules=("q_proj", "down_proj")))
    assert adapted(named) == {(1, "q_proj"), (1, "down_proj")}
    assert adapted(_model(tiny_base_model, lora=LoraSettings(last_layers=5))) == adapted(
        _model(tiny_base_model)
    )
    with pytest.raises(ValueError, match="last_layers"):
        LoraSettings(last_layers=0)
    with pytest.raises(ValueError, match="backbone"):
        LoraSettings(last_layers=1).peft_config()
    # every adapter of the last layer learns; the saved model reloads with the same adapters and forecasts
    tok = load_tokenizer(tiny_base_model)
    batch = pad_batch(tok, encode_prompts(tok, prompts))
    last.train()
    (last(**batch) ** 2).mean().backward()
    grads = [p.grad for n, p in last.named_parameters() if p.requires_grad and "lora_" in n]
    assert len(grads) == 14 and all(g is not None and g.abs().sum() > 0 for g in grads)
    last.eval()
    expected = predict_prompts(last, tok, prompts)
    loaded = load_regressor(save_regressor(last, tmp_path / "saved", PromptBuilder().settings()))
    loaded_layers = {
        n.split(".layers.")[1].split(".")[0] for n, _ in loaded.named_parameters() if "lora_A" in n
    }
    assert loaded_layers == {"1"} and loaded.config.lora.last_layers == 1
    np.testing.assert_allclose(predict_prompts(loaded, tok, prompts), expected, atol=1e-6)


def test_checkpointing_the_first_layers_only_frees_their_activations_and_keeps_the_gradients(
    tiny_base_model: Path, prompts: list[str]
) -> None:
    tok = load_tokenizer(tiny_base_model)
    tok.padding_side = "right"
    batch = pad_batch(tok, encode_prompts(tok, prompts))
    variants = {
        "none": {},
        "first": {"gradient_checkpointing": True, "gradient_checkpointing_layers": 1},
        "every": {"gradient_checkpointing": True},
    }
    flags, saved, grads = {}, {}, {}
    for name, kwargs in variants.items():
        # the full forward: the shortcut runs the last layer's parts itself, around its checkpoint wrapper
        model = _model(tiny_base_model, lora=LoraSettings(dropout=0.0), last_layer_shortcut=False, **kwargs)
        model.train()
        model.head.eval()  # no head dropout: the three must agree
        flags[name] = [layer.gradient_checkpointing for layer in model.base.layers]
        kept = []  # bytes autograd keeps for backward outside the checkpointed layers

        def pack(tensor: torch.Tensor, kept: list = kept) -> torch.Tensor:
            kept.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            pred = model(**batch)
        pred.sum().backward()
        saved[name] = sum(kept)
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert flags == {"none": [False, False], "first": [True, False], "every": [True, True]}
    assert saved["none"] > saved["first"] > saved["every"]
    assert grads["none"] and grads["first"].keys() == grads["none"].keys() == grads["every"].keys()
    for n, grad in grads["none"].items():
        torch.testing.assert_close(grads["first"][n], grad, atol=1e-6, rtol=1e-5, msg=n)
        torch.testing.assert_close(grads["every"][n], grad, atol=1e-6, rtol=1e-5, msg=n)
    with pytest.raises(ValueError, match="needs gradient_checkpointing=True"):
        RegressorConfig(gradient_checkpointing_layers=1)
    with pytest.raises(ValueError, match="int >= 1"):
        RegressorConfig(gradient_checkpointing=True, gradient_checkpointing_layers=0)


def test_loss_falls_when_overfitting_a_tiny_batch(tiny_base_model: Path, prompts: list[str]) -> None:
    torch.manual_seed(0)
    model = build_regressor(tiny_base_model, RegressorConfig(head=HeadConfig(dropout=0.0))).train()
    tok = load_tokenizer(tiny_base_model)
    batch = pad_batch(tok, encode_prompts(tok, prompts))
    target = torch.linspace(-1.5, 1.5, len(prompts))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(60):
        loss = weighted_loss(model(**batch), target, torch.ones(len(prompts)), "mse")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.1 * losses[0], losses[::10]


def test_weighted_loss_equals_a_manual_computation() -> None:
    pred = torch.tensor([0.5, -1.0, 2.0, 0.0])
    target = torch.tensor([1.0, -1.5, -1.0, 0.25])
    weight = torch.tensor([1.0, 2.0, 0.5, 3.0])
    manual_mse = sum(w * (p - t) ** 2 for p, t, w in zip(pred, target, weight, strict=True)) / weight.sum()
    assert float(weighted_loss(pred, target, weight, "mse")) == pytest.approx(float(manual_mse))
    err = (pred - target).abs()
    huber = torch.where(err <= 1.0, 0.5 * err**2, err - 0.5)
    assert float(weighted_loss(pred, target, weight, "huber", 1.0)) == pytest.approx(
        float((weight * huber).sum() / weight.sum())
    )
    # DDP: two halves, each divided by the global weight sum and multiplied by 2, average to the global mean
    halves = [
        weighted_loss(pred[s], target[s], weight[s], "mse", weight_total=weight.sum(), n_processes=2)
        for s in (slice(0, 2), slice(2, 4))
    ]
    assert float(sum(halves) / 2) == pytest.approx(float(manual_mse))
    assert torch.equal(pointwise_loss(pred, target, "mse"), (pred - target) ** 2)


def test_head_is_an_mlp_in_fp32_that_starts_near_zero() -> None:
    head = RegressionHead(32, HeadConfig(hidden_sizes=(64, 16), activation="silu", dropout=0.2))
    linears = [m for m in head.net if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(32, 64), (64, 16), (16, 1)]
    assert sum(isinstance(m, torch.nn.SiLU) for m in head.net) == 2
    assert all(p.dtype == torch.float32 for p in head.parameters())
    head.eval()
    assert head(torch.randn(5, 32)).shape == (5,)
    assert float(head(torch.randn(256, 32)).abs().mean()) < 0.2
    with pytest.raises(ValueError, match="activation"):
        HeadConfig(activation="swish")


def test_save_and_load_round_trip_without_pickle(
    tiny_base_model: Path, prompts: list[str], tmp_path: Path
) -> None:
    model = _model(
        tiny_base_model, lora=LoraSettings(r=4, alpha=8, use_rslora=True), head=HeadConfig(hidden_sizes=(48,))
    )
    tok = load_tokenizer(tiny_base_model)
    expected = predict_prompts(model, tok, prompts)
    prompt = PromptBuilder().settings()
    out = save_regressor(model, tmp_path / "saved", prompt, {"note": "x"})
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == [
        "adapter/README.md",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "head.safetensors",
        "regressor.json",
    ]
    info = json.loads((out / "regressor.json").read_text())
    assert info["prompt"] == prompt and info["config"]["lora"]["use_rslora"] is True
    assert info["base_model"]["path"] == str(tiny_base_model.resolve())
    loaded = load_regressor(out)
    assert not loaded.training
    np.testing.assert_allclose(predict_prompts(loaded, tok, prompts), expected, atol=1e-6)


def test_scoring_with_merged_adapters_matches_the_unmerged_forward_and_restores_the_weights(
    tiny_base_model: Path, prompts: list[str]
) -> None:
    model = _model(tiny_base_model)
    tok = load_tokenizer(tiny_base_model)
    batch = pad_batch(tok, encode_prompts(tok, prompts))
    with torch.no_grad():
        unmerged = model(batch["input_ids"], batch["attention_mask"]).numpy()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert model.adapters_mergeable()
    with merged_adapters(model):
        assert all(layer.merged for layer in model.lora_layers())
        with torch.no_grad():
            merged = model(batch["input_ids"], batch["attention_mask"]).numpy()
    np.testing.assert_allclose(merged, unmerged, atol=1e-5)
    assert not any(layer.merged for layer in model.lora_layers())
    for name, param in model.named_parameters():  # bit for bit: training goes on from the same weights
        assert torch.equal(param, before[name]), name
    # predict_ids (merged, length batches) gives the same forecasts in the rows' own order
    np.testing.assert_allclose(predict_prompts(model, tok, prompts, batch_size=4), unmerged, atol=1e-5)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_forked_workers_score_every_row_in_order_as_this_process_does(
    tiny_base_model: Path, prompts: list[str]
) -> None:
    model = _model(tiny_base_model)
    tok = load_tokenizer(tiny_base_model)
    ids = encode_prompts(tok, prompts) * 3  # 18 rows, 9 batches of 2: both workers get several
    ids = [row[: len(row) - i % 5] for i, row in enumerate(ids)]  # different lengths, length-sorted batches
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    alone = predict_ids(model, tok, ids, batch_size=2, workers=1)
    forked = predict_ids(model, tok, ids, batch_size=2, workers=2)
    assert alone.shape == forked.shape == (18,) and np.isfinite(forked).all()
    np.testing.assert_allclose(forked, alone, atol=1e-6)  # the same rows, in the caller's order
    assert len(set(np.round(alone, 6))) > 10  # the rows differ, so an order mix-up would show
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the parent's unmerged again
    # a failure in a worker reaches the caller (a token id the embedding does not have)
    with pytest.raises(IndexError):
        predict_ids(model, tok, [*ids[:-1], [10**7] * 5], batch_size=2, workers=2)


def test_forked_pools_of_two_threads_each_run_their_own_task() -> None:
    """A scoring server calls the model from several threads of one process: each call's forked workers
    must run that call's task (they once shared one module global, and a call could get another's rows)."""
    import threading

    from modeling.inference import run_forked

    got: dict[str, list] = {"a": [], "b": []}

    def caller(tag: str) -> None:
        for i in range(12):
            got[tag].append((i, run_forked(lambda k, n, tag=tag, i=i: (tag, i, k, n), 2)))

    threads = [threading.Thread(target=caller, args=(tag,)) for tag in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for tag, calls in got.items():
        assert [parts for _, parts in calls] == [[(tag, i, 0, 2), (tag, i, 1, 2)] for i, _ in calls]
        assert len(calls) == 12


def test_cpu_workers_one_per_core_only_on_the_cpu_and_with_enough_batches(monkeypatch) -> None:
    import modeling.inference as inference

    monkeypatch.setattr(inference.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert cpu_workers(100, "cpu") == 3
    assert cpu_workers(2 * MIN_BATCHES_PER_WORKER, "cpu") == 2  # a worker gets at least MIN batches
    assert cpu_workers(MIN_BATCHES_PER_WORKER - 1, "cpu") == 1
    assert cpu_workers(100, "meta") == 1  # not the CPU: the caller's device does the work
    monkeypatch.setattr(inference.multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    assert cpu_workers(100, "cpu") == 1  # no fork (macOS, Windows): this process


def test_load_refuses_a_different_base_model(tiny_base_model: Path, tmp_path: Path) -> None:
    import shutil

    out = save_regressor(_model(tiny_base_model), tmp_path / "saved", PromptBuilder().settings())
    other = tmp_path / "other_base"
    shutil.copytree(tiny_base_model, other)
    config = json.loads((other / "config.json").read_text())
    config["rms_norm_eps"] = 1e-6  # a different checkpoint under the same layout
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not the one this regressor was trained on"):
        load_regressor(out, base_model_dir=other)


def test_the_fingerprint_sees_a_change_in_the_middle_tensors(tiny_base_model: Path, tmp_path: Path) -> None:
    """A checkpoint rewritten under the same layout (a merged fine-tune keeps the header, embeddings and
    last norms) must not pass as the base model a regressor was trained on; a regressor saved under the
    first scheme (each file's first and last MiB) still loads on its unchanged base model."""
    import shutil

    from safetensors.torch import load_file as load_tensors
    from safetensors.torch import save_file as save_tensors

    from modeling.backbones.files import _edges_fingerprint, fingerprint_matches, model_fingerprint

    out = save_regressor(_model(tiny_base_model), tmp_path / "saved", PromptBuilder().settings())
    other = tmp_path / "other_base"
    shutil.copytree(tiny_base_model, other)
    weights = load_tensors(other / "model.safetensors")
    name = next(n for n in sorted(weights) if "layers.0.mlp.down_proj" in n)
    weights[name] = weights[name] * 1.5  # same shape, same file size, other bytes in the middle
    save_tensors(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    assert model_fingerprint(other).startswith("v3:") and model_fingerprint(other) != model_fingerprint(
        tiny_base_model
    )
    with pytest.raises(ValueError, match="not the one this regressor was trained on"):
        load_regressor(out, base_model_dir=other)
    # the old scheme is still honoured for what it was saved with
    legacy = _edges_fingerprint(tiny_base_model)
    assert fingerprint_matches(tiny_base_model, legacy) and not fingerprint_matches(tiny_base_model, "0" * 64)
    info = json.loads((out / "regressor.json").read_text())
    info["base_model"]["fingerprint"] = legacy
    (out / "regressor.json").write_text(json.dumps(info))
    load_regressor(out, base_model_dir=tiny_base_model)
    # a large weight file is sampled, not read whole: a tensor of 16 MiB rewritten in the middle of 80 MiB
    # is still seen, and the first scheme misses it
    big = tmp_path / "big"
    shutil.copytree(tiny_base_model, big, ignore=shutil.ignore_patterns("*.safetensors"))
    blob = bytearray(np.random.default_rng(0).integers(0, 256, 80 << 20, dtype=np.uint8).tobytes())
    (big / "model.safetensors").write_bytes(bytes(blob))
    before, edges = model_fingerprint(big), _edges_fingerprint(big)
    blob[(37 << 20) : (53 << 20)] = bytes(16 << 20)
    (big / "model.safetensors").write_bytes(bytes(blob))
    assert model_fingerprint(big) != before and _edges_fingerprint(big) == edges


def test_the_fingerprint_sees_the_chat_template_and_every_tensor_and_honours_v2(
    tiny_base_model: Path, tmp_path: Path, monkeypatch
) -> None:
    """v3 hashes the tokenizer and chat template (the same weights under another template read other
    prompts) and samples the start of every tensor of a sampled file (v2's 16 MiB stride skipped every
    tensor between two samples: all of SmolLM2's decoder layers); a regressor saved with a v2 fingerprint
    still loads on its unchanged base model."""
    import shutil

    from safetensors.torch import save_file as save_tensors

    from modeling.backbones import files
    from modeling.backbones.files import _checkpoint_hash, fingerprint_matches, model_fingerprint

    other = tmp_path / "templated"
    shutil.copytree(tiny_base_model, other)
    template = other / "chat_template.jinja"
    if not template.is_file():  # the template inside tokenizer_config.json
        template = other / "tokenizer_config.json"
    v2 = f"v2:{_checkpoint_hash(other, sampled=True, whole=files._FINGERPRINT_WHOLE_BYTES, v3=False)}"
    before = model_fingerprint(other)
    assert fingerprint_matches(other, v2) and fingerprint_matches(other, before)
    template.write_text(template.read_text() + "\n")  # one more character, nothing else
    assert model_fingerprint(other) != before and not fingerprint_matches(other, before)
    assert fingerprint_matches(other, v2)  # what v2 could not see
    # a file of 48 tensors of 1 MiB, sampled (threshold lowered): one tensor rewritten between two strides
    many = tmp_path / "many"
    shutil.copytree(tiny_base_model, many, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = {f"t{i:02d}": torch.full((1 << 18,), float(i)) for i in range(48)}
    save_tensors(tensors, str(many / "model.safetensors"))
    monkeypatch.setattr(files, "_FINGERPRINT_WHOLE_BYTES_V3", 1 << 20)
    sampled = model_fingerprint(many)
    v2_many = _checkpoint_hash(many, sampled=True, whole=1 << 20, v3=False)
    tensors["t20"] = tensors["t20"] * 1.5
    save_tensors(tensors, str(many / "model.safetensors"))
    assert model_fingerprint(many) != sampled
    assert _checkpoint_hash(many, sampled=True, whole=1 << 20, v3=False) == v2_many


def test_dora_builds_and_4bit_needs_a_gpu(tiny_base_model: Path) -> None:
    dora = _model(tiny_base_model, lora=LoraSettings(use_dora=True, target_modules=("q_proj", "v_proj")))
    names = [n for n, p in dora.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in names)
    assert not any("k_proj" in n for n in names)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            build_regressor(tiny_base_model, RegressorConfig(quantization="4bit"))
    with pytest.raises(ValueError, match="quantization"):
        RegressorConfig(quantization="8bit")
