"""The shared-prefix forward (`modeling.shared_prefix`): the batch's common leading tokens run once give
the same states, forecasts and gradients as the plain forward."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

import modeling.shared_prefix as shared_prefix
from modeling.backbones.common import load_tokenizer
from modeling.inference import encode_prompts, pad_batch
from modeling.model import RegressorConfig
from modeling.prompt import PromptBuilder
from modeling.shared_prefix import own_tokens_causal_mask, shared_prefix_length
from tests.conftest import make_training_set, regressor_with_live_adapters


@pytest.fixture(scope="module")
def batch(tiny_base_model: Path) -> dict[str, torch.Tensor]:
    tok = load_tokenizer(tiny_base_model)
    tok.padding_side = "right"
    ids = encode_prompts(tok, PromptBuilder().render_batch(make_training_set().head(6), tok))
    ids[1] = ids[1][:-17]  # rows of different lengths: real padding in the batch
    out = pad_batch(tok, ids)
    assert (out["attention_mask"] == 0).any()
    return out


def _model(base: Path, **kwargs) -> torch.nn.Module:
    return regressor_with_live_adapters(base, RegressorConfig(**kwargs))


def test_shared_prefix_length_by_hand() -> None:
    ids = torch.tensor([[5, 6, 7, 8, 9, 1], [5, 6, 7, 8, 2, 0], [5, 6, 7, 3, 3, 3]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    assert shared_prefix_length(ids, mask, minimum=1, min_fraction=0) == 3  # rows 0 and 2 part at 3
    assert shared_prefix_length(ids, mask, minimum=4, min_fraction=0) == 0  # too few tokens to pay
    assert shared_prefix_length(ids, mask, minimum=1, min_fraction=0.5) == 3  # 3 of 6
    assert shared_prefix_length(ids, mask, minimum=1, min_fraction=0.51) == 0  # too small a share
    same = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8]])
    # identical rows keep their last token to themselves (the head reads its state)
    assert shared_prefix_length(same, torch.ones_like(same), minimum=1, min_fraction=0) == 3
    short = torch.tensor([[5, 6, 0, 0], [5, 6, 7, 8]])
    short_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert shared_prefix_length(short, short_mask, minimum=1, min_fraction=0) == 1
    assert shared_prefix_length(ids[:1], mask[:1], minimum=1, min_fraction=0) == 0  # one row


def test_own_tokens_mask_sees_the_prefix_and_is_causal_after_it() -> None:
    mask = own_tokens_causal_mask(2, 3, torch.device("cpu"))[0, 0]
    assert mask.tolist() == [
        [True, True, True, False, False],
        [True, True, True, True, False],
        [True, True, True, True, True],
    ]


def test_the_real_prompts_share_their_system_turn(batch: dict[str, torch.Tensor]) -> None:
    n = shared_prefix_length(batch["input_ids"], batch["attention_mask"], min_fraction=0)
    assert n >= shared_prefix.MIN_SHARED_PREFIX
    assert (batch["input_ids"][:, :n] == batch["input_ids"][0, :n]).all()
    assert not (batch["input_ids"][:, n] == batch["input_ids"][0, n]).all()


@pytest.mark.parametrize("last_layers", [None, 1])
def test_shared_prefix_forward_equals_the_plain_one_with_gradients(
    tiny_base_model: Path,
    batch: dict[str, torch.Tensor],
    last_layers: int | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from modeling.job import LoraSettings

    model = _model(tiny_base_model, lora=LoraSettings(last_layers=last_layers)).eval()  # no dropout
    target = torch.linspace(-1, 1, batch["input_ids"].shape[0])
    results = []
    for fraction in (0.0, 2.0):  # shared prefix (any share), then plain (none can reach 2x the width)
        monkeypatch.setattr(shared_prefix, "MIN_SHARED_FRACTION", fraction)
        model.zero_grad()
        pred = model(**batch)
        ((pred - target) ** 2).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((pred.detach(), grads))
    (shared_pred, shared_grads), (plain_pred, plain_grads) = results
    torch.testing.assert_close(shared_pred, plain_pred, atol=1e-5, rtol=0)
    assert shared_grads.keys() == plain_grads.keys()
    assert any("lora_" in n and g.abs().sum() > 0 for n, g in plain_grads.items())
    for name, grad in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_gradient_checkpointing_keeps_the_plain_forward(
    tiny_base_model: Path, batch: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    # transformers drops a checkpointed layer's cache: the prefix's keys would silently go missing
    monkeypatch.setattr(shared_prefix, "MIN_SHARED_FRACTION", 0.0)
    plain = _model(tiny_base_model).eval()
    checkpointed = _model(tiny_base_model, gradient_checkpointing=True).eval()
    assert shared_prefix.prefix_sharable(plain.base)
    checkpointed.base.layers[0].train()  # checkpointing acts in training mode only
    assert not shared_prefix.prefix_sharable(checkpointed.base)
    with torch.no_grad():  # no backward to replay: the cache is kept, and the prefix shared again
        assert shared_prefix.prefix_sharable(checkpointed.base)
    checkpointed.train()
    checkpointed.head.eval()  # no head dropout: the two models must agree
    pred = checkpointed(**batch)
    pred.sum().backward()
    torch.testing.assert_close(pred.detach(), plain(**batch).detach(), atol=1e-5, rtol=0)


def test_legend_prompts_take_the_shared_prefix_by_default_and_inline_ones_do_not(
    tiny_base_model: Path, batch: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    from modeling.inference import predict_ids

    tok = load_tokenizer(tiny_base_model)
    rows = make_training_set().head(40)
    legend_ids = encode_prompts(tok, PromptBuilder(layout="legend").render_batch(rows, tok))
    legend = pad_batch(tok, legend_ids)
    n_legend = shared_prefix_length(legend["input_ids"], legend["attention_mask"])
    assert n_legend > 0.5 * legend["input_ids"].shape[1]  # the system turn with the task and the legend
    assert shared_prefix_length(batch["input_ids"], batch["attention_mask"]) == 0  # inline: too small a share
    assert shared_prefix_length(batch["input_ids"], batch["attention_mask"], min_fraction=0) > 0
    model = _model(tiny_base_model).eval()
    shared = predict_ids(model, tok, legend_ids, batch_size=16)
    monkeypatch.setattr(shared_prefix, "SCORING_MIN_SHARED_FRACTION", 2.0)  # plain
    plain = predict_ids(model, tok, legend_ids, batch_size=16)
    np.testing.assert_allclose(shared, plain, atol=1e-5, rtol=0)


def test_scoring_shares_the_inline_system_turn_and_training_does_not(
    tiny_base_model: Path, batch: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    import modeling.llama_shortcut as shortcut
    from modeling.inference import predict_ids

    calls: list[int] = []

    def counting(model, input_ids, position_ids, n_prefix):
        calls.append(n_prefix)
        return shared_prefix.run_with_shared_prefix(model, input_ids, position_ids, n_prefix)

    monkeypatch.setattr(shortcut, "run_with_shared_prefix", counting)
    with torch.no_grad():  # scoring: the system turn's tokens are enough, whatever their share
        assert (
            shared_prefix_length(batch["input_ids"], batch["attention_mask"])
            >= shared_prefix.MIN_SHARED_PREFIX
        )
    assert (
        shared_prefix_length(batch["input_ids"], batch["attention_mask"]) == 0
    )  # training: too small a share
    tok = load_tokenizer(tiny_base_model)
    ids = encode_prompts(tok, PromptBuilder().render_batch(make_training_set().head(40), tok))
    model = _model(tiny_base_model).eval()
    shared = predict_ids(model, tok, ids, batch_size=16, workers=1)
    assert len(calls) == 3 and min(calls) >= shared_prefix.MIN_SHARED_PREFIX  # every batch of 16, 16, 8
    monkeypatch.setattr(shared_prefix, "SCORING_MIN_SHARED_FRACTION", 2.0)  # plain
    plain = predict_ids(model, tok, ids, batch_size=16, workers=1)
    assert len(calls) == 3
    np.testing.assert_allclose(shared, plain, atol=1e-5, rtol=0)
    model.train()(**batch).sum().backward()  # a training step: the plain forward
    assert len(calls) == 3


class _LayerOf517(torch.nn.Module):  # transformers <= 5.1x: the cache is `past_key_values`
    def forward(self, hidden_states, attention_mask=None, past_key_values=None, **kwargs): ...


class _LayerOf525(torch.nn.Module):  # transformers 5.2x: renamed `cache`
    def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs): ...


class _LayerWithoutCache(torch.nn.Module):
    def forward(self, hidden_states, attention_mask=None, **kwargs): ...


def test_the_prefix_cache_goes_under_the_name_the_installed_layer_takes(tiny_base_model: Path) -> None:
    # under the other name a layer swallows it in **kwargs and attends over its own tokens only (on the
    # GPU image's transformers 5.17 the scoring forward then failed with a [213, 240] mask mismatch)
    assert shared_prefix.cache_argument(_LayerOf517().forward) == "past_key_values"
    assert shared_prefix.cache_argument(_LayerOf525().forward) == "cache"
    with pytest.raises(TypeError, match="no key/value cache argument"):
        shared_prefix.cache_argument(_LayerWithoutCache().forward)
    layer = next(m for m in _model(tiny_base_model).modules() if type(m).__name__ == "LlamaDecoderLayer")
    assert shared_prefix.cache_argument(layer.forward) in inspect.signature(layer.forward).parameters
