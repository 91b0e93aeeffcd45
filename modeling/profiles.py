"""Named training profiles: what `regressor` trains with unless its config or the search overrides it.

- `cpu`: the demo on 2 CPU cores. Bounded so that `make demo` finishes in minutes: a seeded sample of
  the train rows drawn per date, two passes, LoRA in the last decoder layer (every layer when a run
  samples more than the demo's 24k rows: `LoraSettings.last_layers_max_samples`), a head that forecasts
  from the feature probe's 16 readouts (the probe's loss at weight 3, at 10 above 24k rows:
  `TrainConfig.aux_feature_weight_max_samples`), the per-date IC loss on date-grouped batches, periodic
  validation on a few evenly spaced dates (monitoring), the final comparison on every validation and
  test date.
  The embedded tiny Llama trains at about 300-440 samples/s with it (the 2-core machine varies).
- `gpu`: Llama 3 8B (or any large `BASE_MODEL`) on GPUs: the cpu profile's recipe on every train row
  (two passes, LoRA in every layer, the probe at weight 10), bf16, one process per GPU, the final
  comparison on every validation and test date.

The recipe is the learning curve's (BENCHMARKS.md): on the embedded backbone it rises from 24k to 96k to
every train row, and on every row it scores above ridge on the same rows, where the original one (raw
labels, MSE, no probe) fell to zero at 96k rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from modeling.feature_registry import FEATURE_NAMES
from modeling.job import HeadConfig, LoraSettings, RegressorConfig, TrainConfig

IC_DATE_GROUP = 16
"""Rows of one date per group under the per-date IC loss: the cpu profile's groups, and a search trial's
when it takes that loss (`modeling.search.with_date_groups`)."""


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    regressor: RegressorConfig = field(default_factory=RegressorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    final_eval_max_dates: int | None = None
    """Validation and test dates of the final comparison (evenly spaced; None = all)."""
    final_test_max_dates: int | None = None
    """A tighter cap on the test dates of the final comparison (None = as validation)."""
    num_processes: int | None = 1
    """Training processes (None = one per visible GPU)."""


RECIPE = {
    # what the learning curve (BENCHMARKS.md, `bench/bench_regressor.py curve` and `routes`) showed to
    # learn more from more data: rank-gaussian targets per date (a vendor jump no longer sets a whole
    # step's direction); the auxiliary probe that teaches the adapters the prompt's numbers is in both
    # profiles at its own weight (`aux_feature_weight`)
    "target_transform": "cs_rank",
    # the final weights: evaluations on a few dates pick the luckiest checkpoint, not the best one
    "early_stopping_patience": None,
    "select_best": False,
}
"""Training choices both profiles share."""

CPU = Profile(
    name="cpu",
    description="2 CPU cores, fp32: 24k train rows drawn per date, two passes, LoRA in the last "
    "layer, a head on the feature probe's readouts, per-date IC loss",
    # LoRA r=32: +0.010 +- 0.004 RankIC over r=8 at 24k rows, at the same speed (routes, BENCHMARKS.md).
    # Adapters in every projection of the last decoder layer only: -0.0022 +- 0.0023 validation RankIC
    # against both layers (mean of 3 seeds, 90 dates, t -1.0: within noise) at 2.5-3x the training
    # samples/s, because backward stops at the last layer; the time pays for every test date below.
    # That holds for the demo's 24k rows only: at 96k rows (two passes, 2 seeds, the same rows) every
    # layer's adapters score +0.0028 +- 0.0012 validation RankIC (179 dates; test +0.0029 +- 0.0009,
    # 240 dates; all 4 seed-splits positive) over the last layer's at 2.6x the training time, so a
    # larger sample adapts every layer (`last_layers_max_samples`; candidate section, BENCHMARKS.md)
    # The feature bottleneck (the head forecasts from the probe's 16 readouts): +0.0015 +- 0.0024
    # validation RankIC over 6 seeds (test +0.0011 +- 0.0016), a tie in the mean, but the seeds' spread
    # falls from sd 0.0068 to 0.0011 (F test p 0.0005; test 0.0043 -> 0.0012): the worst of 6 retrains
    # scores 0.0320 where the plain head's scored 0.0196 (candidate section, BENCHMARKS.md)
    regressor=RegressorConfig(
        lora=LoraSettings(r=32, alpha=64.0, last_layers=1, last_layers_max_samples=24_000),
        head=HeadConfig(hidden_sizes=(256,), feature_bottleneck=len(FEATURE_NAMES)),
    ),
    train=TrainConfig(
        learning_rate=1e-3,
        batch_size=32,
        max_train_samples=24_000,
        # a second pass over the same rows: +0.0030 +- 0.0013 validation RankIC (t 2.4, 179 dates,
        # mean of 3 seeds; test +0.0020 +- 0.0010, t 2.1), which brings the LLM within noise of ridge
        # on the same rows; batch 16 for one pass instead lost 0.013 (routes and quality, BENCHMARKS.md)
        epochs=2,
        # the per-date correlation loss on batches of two dates' 16-stock groups (rows drawn per date):
        # +0.0080 +- 0.0021 validation RankIC over MSE on the same rows and batches (3 seeds, 90
        # dates), level with ridge on its rows where MSE trails it (routes and quality, BENCHMARKS.md)
        loss="ic",
        date_group_size=IC_DATE_GROUP,
        # a guard, not a schedule: two passes take 110-280 s on 2 cores with the last-layer adapters
        # (280 s, periodic evaluations included, in the slowest demo measured)
        time_budget_s=420.0,
        eval_every_steps=375,
        eval_max_dates=16,
        checkpoint_every_steps=250,
        # the probe's loss at 3x the forecast's: +0.0030 +- 0.0011 validation RankIC over weight 1 (6
        # seeds, t 2.8, 179 dates each; test +0.0019 +- 0.0009, t 2.2), since what the 24k gap to ridge
        # is made of is the readouts' precision (candidate section, BENCHMARKS.md)
        aux_feature_weight=3.0,
        # above the demo's 24k rows at 10x: weight 10 - weight 3 +0.0032 +- 0.0011 validation RankIC at
        # 96k rows (3 seeds, each +0.0031 to +0.0033; test +0.0022 +- 0.0008), where weight 3 trailed
        # ridge on the same rows by -0.0028 +- 0.0025 and weight 10 leads it by +0.0004 +- 0.0018; a tie
        # at every row (two passes, seed 1: -0.0003 +- 0.0008, test -0.0000 +- 0.0006; one pass, 2 seeds:
        # -0.0009 +- 0.0007) and at 24k (-0.0009 +- 0.0016 over 3 seeds), where the demo keeps weight 3
        aux_feature_weight_max_samples=24_000,
        aux_feature_weight_above=10.0,
        **RECIPE,
    ),
    # every validation date (179 on the default market, SE about 0.005: what the gate decides on) and
    # every test date (240, SE about 0.004)
    final_eval_max_dates=None,
    final_test_max_dates=None,
    num_processes=1,
)
"""The demo's profile, and the recipe the learning curve measures."""

PROFILES: dict[str, Profile] = {
    "cpu": CPU,
    "gpu": Profile(
        name="gpu",
        description="GPU(s), bf16: the cpu profile's recipe on every train row (two passes, LoRA in every "
        "layer), full evaluation",
        # The recipe the learning curve measured, on every row (BENCHMARKS.md): the cpu profile on all 376,528
        # train rows scores 0.0580 +- 0.0056 validation RankIC (179 dates), +0.0037 +- 0.0012 over ridge on
        # the same rows (t 3.05; test 0.0493, -0.0010 +- 0.0011; seed 1: +0.0028 +- 0.0012, test +0.0001
        # +- 0.0009; +0.0032 +- 0.0005 over the two seeds), risen from 96k rows (3 seeds) by +0.0096
        # +- 0.0025; one pass there ties with two (-0.0022 +- 0.0015 validation, -0.0001 +- 0.0011 test).
        # Those runs had the probe at weight 3; the profile's rule gives every row 10, which ties them on
        # the same rows (seed 1: 0.0575, -0.0003 +- 0.0008 validation, -0.0000 +- 0.0006 test; +0.0024
        # +- 0.0010 over ridge) and pays at 96k (the cpu profile's comment above).
        # At 96k rows this recipe beat the profile's former settings (r=16, lr 2e-4, MSE on uniform rows,
        # batch 64, one pass, a 1024-256 head on the pooled state) by +0.0136 +- 0.0022 validation RankIC
        # (179 dates; +- 0.0056 over 2 seeds; test +0.0122 +- 0.0018), which trailed ridge by 0.020
        # (BENCHMARKS.md, "The gpu profile takes the curve's recipe").
        # Only the GPU side differs: bf16 (an H200's bf16 run and this CPU's fp32 run of the same 24k rows
        # agree to +0.0000 +- 0.0003), no time guard, validation every 2,000 steps on 60 dates (about 12 over
        # the run; monitoring), scoring batches of 256, one process per GPU up to as many as the batch has
        # date groups (`pipeline.training_process`; a larger `batch_size` for more GPUs is unmeasured).
        # Unmeasured on an 8B backbone: the learning rate (1e-3, the embedded backbone's; `learning_rate`
        # overrides it), the rank and the head; the GPU session's 8B step measured speed, not quality.
        regressor=CPU.regressor.sized_for(None),
        train=replace(
            CPU.train,
            max_train_samples=None,
            time_budget_s=None,
            eval_every_steps=2_000,
            eval_max_dates=60,
            checkpoint_every_steps=500,
            eval_batch_size=256,
        ).sized(),  # the probe's weight on every row: 10
        final_eval_max_dates=None,
        num_processes=None,
    ),
}


SIZED_OVERRIDES = ("lora_last_layers", "aux_feature_weight")
"""The flat settings a profile sizes by the sample (`LoraSettings.last_layers_max_samples`,
`TrainConfig.aux_feature_weight_max_samples`): what a search pins for its own sample size."""

OVERRIDABLE = {
    # flat name -> (section, field); section "lora" / "head" are parts of the regressor config
    "learning_rate": ("train", "learning_rate"),
    "head_learning_rate": ("train", "head_learning_rate"),
    "weight_decay": ("train", "weight_decay"),
    "ema_decay": ("train", "ema_decay"),
    "batch_size": ("train", "batch_size"),
    "grad_accum_steps": ("train", "grad_accum_steps"),
    "epochs": ("train", "epochs"),
    "max_train_samples": ("train", "max_train_samples"),
    "max_steps": ("train", "max_steps"),
    "time_budget_s": ("train", "time_budget_s"),
    "loss": ("train", "loss"),
    "huber_delta": ("train", "huber_delta"),
    "ic_mse_weight": ("train", "ic_mse_weight"),
    "target_transform": ("train", "target_transform"),
    "target_clip": ("train", "target_clip"),
    "weight_power": ("train", "weight_power"),
    "aux_feature_weight": ("train", "aux_feature_weight"),
    "aux_feature_weight_max_samples": ("train", "aux_feature_weight_max_samples"),
    "aux_feature_weight_above": ("train", "aux_feature_weight_above"),
    "date_group_size": ("train", "date_group_size"),
    "lr_reference_steps": ("train", "lr_reference_steps"),
    "warmup_ratio": ("train", "warmup_ratio"),
    "eval_every_steps": ("train", "eval_every_steps"),
    "eval_max_dates": ("train", "eval_max_dates"),
    "early_stopping_patience": ("train", "early_stopping_patience"),
    "select_best": ("train", "select_best"),
    "checkpoint_every_steps": ("train", "checkpoint_every_steps"),
    "seed": ("train", "seed"),
    "lora_r": ("lora", "r"),
    "lora_alpha": ("lora", "alpha"),
    "lora_dropout": ("lora", "dropout"),
    "target_modules": ("lora", "target_modules"),
    "use_rslora": ("lora", "use_rslora"),
    "use_dora": ("lora", "use_dora"),
    "lora_last_layers": ("lora", "last_layers"),
    "lora_last_layers_max_samples": ("lora", "last_layers_max_samples"),
    "head_hidden_sizes": ("head", "hidden_sizes"),
    "head_activation": ("head", "activation"),
    "head_dropout": ("head", "dropout"),
    "head_feature_bottleneck": ("head", "feature_bottleneck"),
    "quantization": ("regressor", "quantization"),
    "gradient_checkpointing": ("regressor", "gradient_checkpointing"),
    "gradient_checkpointing_layers": ("regressor", "gradient_checkpointing_layers"),
    "last_layer_shortcut": ("regressor", "last_layer_shortcut"),
}
"""Settings a run may override by flat name (asset config, the search's best parameters)."""


def apply_overrides(
    regressor: RegressorConfig, train: TrainConfig, overrides: dict[str, object]
) -> tuple[RegressorConfig, TrainConfig]:
    """New configs with `overrides` applied (validated again by the dataclasses); unknown names refused."""
    from dataclasses import replace

    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; known: {sorted(OVERRIDABLE)}")
    parts: dict[str, dict[str, object]] = {"train": {}, "lora": {}, "head": {}, "regressor": {}}
    if "lora_last_layers" in overrides:  # an explicit choice of layers holds at any sample size
        parts["lora"]["last_layers_max_samples"] = None
    for name, value in overrides.items():
        section, field_name = OVERRIDABLE[name]
        if isinstance(value, list):
            value = tuple(value)
        parts[section][field_name] = value
    lora = replace(regressor.lora, **parts["lora"])
    head = replace(regressor.head, **parts["head"])
    # an explicit probe weight holds at any sample size too (`TrainConfig.replaced` clears its size rule)
    return replace(regressor, lora=lora, head=head, **parts["regressor"]), train.replaced(**parts["train"])
