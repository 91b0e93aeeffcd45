"""The frozen-trunk cache (`modeling.trunk_cache`): cached states give the forecasts and gradients of the
recomputed forward, land on the batch's real positions, are built only where the trunk is frozen and the
states fit, and leave training and evaluation where the recomputing trainer leaves them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from modeling.backbones.common import load_tokenizer
from modeling.inference import encode_prompts, pad_batch, predict_ids
from modeling.job import HeadConfig, LoraSettings, RegressorConfig, TrainConfig, TrainJob
from modeling.prompt import PromptBuilder
from modeling.train import RegressorTrainer, train_regressor
from modeling.trunk_cache import TrunkCache, trunk_bytes, trunk_frozen
from tests.conftest import make_training_set, regressor_with_live_adapters

LAST_LAYER = RegressorConfig(
    lora=LoraSettings(r=4, alpha=8.0, last_layers=1), head=HeadConfig(hidden_sizes=(16,), dropout=0.0)
)
"""Adapters in the last layer only (the trunk frozen, as in the cpu profile); no dropout, so that two
forwards of the same rows are comparable."""


@pytest.fixture(scope="module")
def ids(tiny_base_model: Path) -> list[list[int]]:
    tok = load_tokenizer(tiny_base_model)
    ids = encode_prompts(tok, PromptBuilder().render_batch(make_training_set().head(10), tok))
    ids[1], ids[4] = ids[1][:-17], ids[4][:-5]  # rows of different lengths: real padding in a batch
    return ids


def _model(base: Path, config: RegressorConfig = LAST_LAYER) -> torch.nn.Module:
    return regressor_with_live_adapters(base, config)


def test_batch_lays_each_row_on_its_real_positions_by_hand() -> None:
    states = torch.arange(12, dtype=torch.float32).reshape(6, 2)  # rows of 1, 3 and 2 tokens
    cache = TrunkCache(states, np.array([0, 1, 4, 6]))
    right = cache.batch([2, 0], torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert right.tolist() == [[[8, 9], [10, 11], [0, 0]], [[0, 1], [0, 0], [0, 0]]]
    left = cache.batch([1, 2], torch.tensor([[1, 1, 1], [0, 1, 1]]))
    assert left.tolist() == [[[2, 3], [4, 5], [6, 7]], [[0, 0], [8, 9], [10, 11]]]
    with pytest.raises(ValueError, match="lengths"):
        cache.batch([1], torch.tensor([[1, 1, 0]]))  # row 1 has 3 tokens, the mask 2
    with pytest.raises(ValueError, match="offsets"):
        TrunkCache(states, np.array([0, 1, 5]))


def test_only_a_frozen_trunk_is_cached(tiny_base_model: Path) -> None:
    assert trunk_frozen(_model(tiny_base_model))
    assert not trunk_frozen(_model(tiny_base_model, RegressorConfig()))  # adapters in every layer
    no_shortcut = replace(LAST_LAYER, last_layer_shortcut=False)
    assert not trunk_frozen(_model(tiny_base_model, no_shortcut))
    with pytest.raises(ValueError, match="not frozen"):
        TrunkCache.build(_model(tiny_base_model, RegressorConfig()), None, [[1, 2]])


@pytest.mark.parametrize("side", ["right", "left"])
def test_cached_states_give_the_recomputed_forecasts_and_gradients(
    tiny_base_model: Path, ids: list[list[int]], side: str
) -> None:
    tok = load_tokenizer(tiny_base_model)
    tok.padding_side = side
    model = _model(tiny_base_model).train()
    cache = TrunkCache.build(model, tok, ids)
    lengths = [len(x) for x in ids]
    assert len(cache) == len(ids) and cache.states.shape == (sum(lengths), 32)
    assert cache.nbytes == trunk_bytes(sum(lengths), model)
    rows = [4, 0, 1, 7]
    batch = pad_batch(tok, [ids[i] for i in rows])

    def forecast_and_grads(trunk: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        pred = model(batch["input_ids"], batch["attention_mask"], trunk=trunk)
        (pred * torch.arange(1.0, 5.0)).sum().backward()
        return pred.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    plain, plain_grads = forecast_and_grads(None)
    cached, cached_grads = forecast_and_grads(cache.batch(rows, batch["attention_mask"]))
    torch.testing.assert_close(cached, plain, rtol=0, atol=1e-5)
    assert len(plain_grads) == len(cached_grads) > 0
    for a, b in zip(cached_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="do not fit"):
        model(
            batch["input_ids"][:, :-1],
            batch["attention_mask"][:, :-1],
            trunk=cache.batch(rows, batch["attention_mask"]),
        )


def test_forked_workers_build_the_states_this_process_builds(
    tiny_base_model: Path, ids: list[list[int]]
) -> None:
    """Two forked one-thread workers write into a shared mapping that this process reads: the same states
    as an in-process build (a zero-filled or private mapping would leave zeros here)."""
    tok = load_tokenizer(tiny_base_model)
    model = _model(tiny_base_model).train()
    many = ids * 8  # 80 rows: 3 build batches of 32, shared out to two workers
    here = TrunkCache.build(model, tok, many, workers=1)
    forked = TrunkCache.build(model, tok, many, workers=2)
    assert model.training  # restored after the build
    assert forked.states.shape == here.states.shape and np.array_equal(forked.offsets, here.offsets)
    assert bool((here.states.abs().sum(dim=1) > 0).all())  # every token has states to compare
    torch.testing.assert_close(forked.states, here.states, rtol=0, atol=1e-6)


def test_scoring_reads_the_cache_in_process_and_forked(tiny_base_model: Path, ids: list[list[int]]) -> None:
    tok = load_tokenizer(tiny_base_model)
    model = _model(tiny_base_model).eval()
    many = ids * 4  # 40 rows in batches of 4: 10 batches, two forked workers
    cache = TrunkCache.build(model, tok, many)
    plain = predict_ids(model, tok, many, batch_size=4, workers=1)
    for workers in (1, 2):
        cached = predict_ids(model, tok, many, batch_size=4, workers=workers, trunk=cache)
        np.testing.assert_allclose(cached, plain, rtol=0, atol=1e-5)


def _trunk_job(base: Path, corpus: Path, out: Path, **train) -> TrainJob:
    config = TrainConfig(
        batch_size=8,
        learning_rate=3e-3,
        epochs=2,
        eval_every_steps=10,
        eval_max_dates=4,
        checkpoint_every_steps=0,
        early_stopping_patience=None,
        select_best=False,
        progress=False,
        seed=3,
    )
    return TrainJob(
        base_model_dir=str(base),
        corpus_path=str(corpus),
        output_dir=str(out),
        prompt=PromptBuilder().settings(),
        regressor=LAST_LAYER,
        train=replace(config, **train),
    )


def test_training_with_the_cache_ends_where_recomputing_ends(
    tiny_base_model, tiny_data, tmp_path: Path
) -> None:
    _, corpus = tiny_data
    quiet = lambda _: None  # noqa: E731
    cached = train_regressor(_trunk_job(tiny_base_model, corpus, tmp_path / "cached"), log=quiet)
    plain = train_regressor(
        _trunk_job(tiny_base_model, corpus, tmp_path / "plain", trunk_cache_gb=0), log=quiet
    )
    assert cached.state.step == plain.state.step > 10
    a = load_file(cached.model_dir / "head.safetensors")
    b = load_file(plain.model_dir / "head.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-4)
    scores = [[h["val_rank_ic"] for h in r.state.history] for r in (cached, plain)]
    np.testing.assert_allclose(scores[0], scores[1], rtol=0, atol=1e-3)


def test_the_trainer_caches_what_fits_its_budget(tiny_base_model, tiny_data, tmp_path: Path) -> None:
    _, corpus = tiny_data
    trainer = RegressorTrainer(_trunk_job(tiny_base_model, corpus, tmp_path / "a"), lambda _: None)
    trainer.setup()
    assert trainer.train_trunk is not None and trainer.val_trunk is not None
    assert len(trainer.train_trunk) == len(trainer.train_rows) and len(trainer.val_trunk) == len(
        trainer.val_rows
    )
    # a budget that holds the validation rows' states but not the train rows': only those are cached
    need_val = trunk_bytes(int(trainer.val_rows.n_tokens.sum()), trainer.unwrapped)
    need_train = trunk_bytes(int(trainer.train_rows.n_tokens.sum()), trainer.unwrapped)
    assert need_val < need_train
    small = RegressorTrainer(
        _trunk_job(tiny_base_model, corpus, tmp_path / "b", trunk_cache_gb=(need_val + 1) / 1e9),
        lambda _: None,
    )
    small.setup()
    assert small.train_trunk is None and small.val_trunk is not None
    every_layer = replace(_trunk_job(tiny_base_model, corpus, tmp_path / "c"), regressor=RegressorConfig())
    unfrozen = RegressorTrainer(every_layer, lambda _: None)
    unfrozen.setup()
    assert unfrozen.train_trunk is None and unfrozen.val_trunk is None
