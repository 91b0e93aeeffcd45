"""The training job as data: what the orchestrator plans and the training process runs, as typed, validated
dataclasses with a docstring per field (litgpt's configs), saved as one JSON file.

- `RegressorConfig` (`LoraSettings`, `HeadConfig`): the model's shape;
- `TrainConfig`: how it is trained;
- `ExperimentSpec` (`modeling.experiment_spec`, re-exported): where the result is logged and how it is
  judged (`TrainJob.experiment`);
- `TrainJob`: all of it plus the input paths; nested parts are built and validated when the job is, so a
  typo fails at planning time, not an hour into training;
- `Outcome` (`modeling.outcome`, re-exported): what the training process reports back.

This module is torch-free (numpy, pandas, the standard library), so the orchestrator plans a run without
importing torch: `modeling.model`, `modeling.train` and `modeling.experiment` import from here.
"""

from __future__ import annotations

import json
import numbers
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from modeling.experiment_spec import ExperimentSpec, check_numbers  # noqa: F401 (ExperimentSpec re-exported)
from modeling.outcome import Outcome  # noqa: F401 (re-exported: what comes back)
from modeling.targets import TARGET_TRANSFORMS

ACTIVATIONS = ("gelu", "relu", "silu", "tanh")
"""Activations of the head (`modeling.model` maps them to torch modules)."""
LOSSES = ("mse", "huber", "ic")
"""Training losses (`modeling.losses`)."""


# --- the model's shape ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadConfig:
    """The MLP regression head."""

    hidden_sizes: tuple[int, ...] = (256,)
    """Widths of the hidden layers; () = a linear head."""
    activation: str = "gelu"
    """Activation between layers: gelu, relu, silu or tanh."""
    dropout: float = 0.1
    """Dropout after each hidden layer (training only)."""
    feature_bottleneck: int = 0
    """0: the MLP reads the pooled state. k > 0: it reads a linear readout of k numbers; under the auxiliary
    probe (k = the feature count) the readout is the probe, so it forecasts from the 16 numbers as read."""

    def __post_init__(self) -> None:
        check_numbers(self)
        object.__setattr__(self, "hidden_sizes", tuple(self.hidden_sizes))
        if any(isinstance(h, bool) or not isinstance(h, numbers.Integral) for h in self.hidden_sizes):
            raise ValueError(f"head hidden_sizes must be integers, got {self.hidden_sizes}")
        if any(h < 1 for h in self.hidden_sizes) or self.feature_bottleneck < 0:
            raise ValueError(
                f"head hidden_sizes must be positive and feature_bottleneck >= 0, got {self.hidden_sizes}, "
                f"{self.feature_bottleneck}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"head activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"head dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA adapters peft puts into the frozen backbone."""

    r: int = 8
    """Rank of each adapter."""
    alpha: float = 16.0
    """Scaling numerator: the update is (alpha / r) * B A (alpha / sqrt(r) with rsLoRA)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: tuple[str, ...] | str = "all-linear"
    """Module names to adapt, or "all-linear": every linear layer of the backbone, i.e. every attention
    and MLP projection (q, k, v, o, gate, up, down for Llama); the LM head is not loaded at all."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""
    last_layers: int | None = None
    """Adapt the last this many decoder layers only (None = all): backward stops at the first adapted one
    (2.5-2.8x the samples/s on the embedded backbone with 1 of 2; routes, BENCHMARKS.md)."""
    last_layers_max_samples: int | None = None
    """With `last_layers`: it holds for train samples of at most this many rows (`max_train_samples`); a
    larger sample, or every train row, adapts every decoder layer (`RegressorConfig.sized_for`, applied by
    `TrainJob`). None = `last_layers` at any size. The last-layer adapters are a speed choice for a small
    sample; with more rows the first layers' adapters pay (BENCHMARKS.md, the cpu profile at 96k rows)."""

    def __post_init__(self) -> None:
        check_numbers(self)
        if not isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
            if not self.target_modules:
                raise ValueError("LoRA target_modules must name at least one module (or be 'all-linear')")
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA needs r >= 1, alpha > 0, 0 <= dropout < 1; got {self}")
        if self.last_layers is not None and self.last_layers < 1:
            raise ValueError(f"LoRA last_layers must be >= 1 or None, got {self.last_layers}")
        limit = self.last_layers_max_samples
        if limit is not None and limit < 1:
            raise ValueError(f"LoRA last_layers_max_samples must be an int >= 1 or None, got {limit!r}")
        if limit is not None and self.last_layers is None:
            raise ValueError("LoRA last_layers_max_samples needs last_layers")

    def peft_config(self, backbone: Any = None) -> Any:
        """peft's `LoraConfig`; `last_layers` needs the `backbone` (its layer count and linear modules)."""
        from peft import LoraConfig

        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        layers = None
        if self.last_layers is not None:
            from modeling.backbones.common import decoder_linear_names

            if backbone is None or (isinstance(targets, str) and targets != "all-linear"):
                raise ValueError("LoRA last_layers needs the backbone, and module names or 'all-linear'")
            n_layers = int(backbone.config.get_text_config().num_hidden_layers)
            layers = list(range(max(0, n_layers - self.last_layers), n_layers))
            # peft takes layer indices only with module names, not a pattern
            targets = decoder_linear_names(backbone) if targets == "all-linear" else targets
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=targets,
            layers_to_transform=layers,
            layers_pattern="layers" if layers is not None else None,
            use_rslora=self.use_rslora,
            use_dora=self.use_dora,
            bias="none",
        )


@dataclass(frozen=True)
class RegressorConfig:
    """Everything that defines the model's shape (not how it is trained)."""

    lora: LoraSettings = field(default_factory=LoraSettings)
    """The adapters."""
    head: HeadConfig = field(default_factory=HeadConfig)
    """The regression head."""
    quantization: Literal["none", "4bit"] = "none"
    """none, or 4bit: QLoRA, the frozen backbone in NF4 through bitsandbytes (CUDA GPUs only)."""
    last_layer_shortcut: bool = True
    """Run the last decoder layer on the pooled token only (Llama family; same output, less work)."""
    gradient_checkpointing: bool = False
    """Recompute decoder-layer activations in the backward pass (less memory, ~30% more compute)."""
    gradient_checkpointing_layers: int | None = None
    """With `gradient_checkpointing`: recompute the first K decoder layers only (None = every layer). Each
    layer checkpointed gives back its activations (about 0.8 GB per Llama-3-8B layer at 16 x 256 tokens)
    for one more forward of itself, so the smallest K that fits the memory costs the least compute."""

    def __post_init__(self) -> None:
        if self.quantization not in ("none", "4bit"):
            raise ValueError(f"quantization must be 'none' or '4bit', got {self.quantization!r}")
        k = self.gradient_checkpointing_layers
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"gradient_checkpointing_layers must be an int >= 1 or None, got {k!r}")
        if k is not None and not self.gradient_checkpointing:
            raise ValueError("gradient_checkpointing_layers needs gradient_checkpointing=True")

    def sized_for(self, train_samples: int | None) -> RegressorConfig:
        """The config a run on `train_samples` sampled rows (None = every train row) trains: the LoRA
        `last_layers` kept up to `last_layers_max_samples` rows, every layer adapted above; the rule is
        then resolved (None), so the saved model's config says which layers it has."""
        limit = self.lora.last_layers_max_samples
        if limit is None:
            return self
        keep = train_samples is not None and train_samples <= limit
        layers = self.lora.last_layers if keep else None
        lora = replace(self.lora, last_layers=layers, last_layers_max_samples=None)
        return replace(self, lora=lora)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RegressorConfig:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown regressor config keys {sorted(unknown)}")
        values = dict(data)
        if isinstance(values.get("lora"), dict):
            values["lora"] = LoraSettings(**values["lora"])
        if isinstance(values.get("head"), dict):
            values["head"] = HeadConfig(**values["head"])
        return cls(**values)


# --- training -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """How the regressor is trained: optimiser, schedule, batches, loss, caps, evaluation, checkpoints."""

    learning_rate: float = 1e-3
    """Peak learning rate of the LoRA adapters."""
    head_learning_rate: float | None = None
    """Peak learning rate of the MLP head (None = learning_rate)."""
    weight_decay: float = 0.0
    """AdamW weight decay (adapters and head weights; biases and norms are never decayed)."""
    warmup_ratio: float = 0.05
    """Share of the schedule spent in linear warm-up."""
    lr_reference_steps: int | None = None
    """When set, a run of more optimizer steps than this takes a smaller peak learning rate (adapters and
    head alike): peak x sqrt(reference / steps), never larger than peak. The noise a step adds grows with
    lr^2 x steps; the square root keeps it at the reference run's. None = the peak for any length."""
    min_lr_ratio: float = 0.05
    """The cosine decays to this fraction of the peak."""
    batch_size: int = 32
    """Global batch per optimizer step (all processes x accumulation steps)."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    ema_decay: float | None = None
    """Exponential moving average of the trainable weights (adapters and head), updated every optimizer
    step with the warm-up `min(decay, (1 + step) / (10 + step))`; evaluation, best-checkpoint selection and
    the saved model use the average (None = off). On a weak, noisy target the raw weights wander from one
    evaluation to the next; their average does not."""
    epochs: int = 1
    """Passes over the (sampled) train rows."""
    max_train_samples: int | None = None
    """Train rows drawn (seeded) from the corpus (None = all)."""
    max_steps: int | None = None
    """Optimizer steps cap (None = epochs x steps per epoch)."""
    time_budget_s: float | None = None
    """Wall-clock cap of the training loop in seconds, across resumes (None = none)."""
    loss: Literal["mse", "huber", "ic"] = "mse"
    """mse or huber: pointwise, weighted by the bucket weights; ic: minus the per-date correlation of
    forecast and target on date-grouped batches (needs `date_group_size`; see `modeling.losses`)."""
    huber_delta: float = 1.0
    """Huber transition point, in label units (unit train std by default)."""
    ic_mse_weight: float = 0.0
    """Under loss `ic`: weight of a weighted squared error added to it (0 = off; `losses.ic_mse_loss`)."""
    target_transform: Literal["none", "clip", "cs_zscore", "cs_rank"] = "none"
    """What the train label becomes before the loss (`modeling.targets`): as is, clipped, per-date
    z-score (clipped) or per-date rank-gaussian. Evaluation always uses the raw label."""
    target_clip: float = 5.0
    """Clip bound of the `clip` and `cs_zscore` targets, in label units."""
    weight_power: float = 1.0
    """The bucket weights are raised to this power (mean 1 again): 1 as built, 0 unweighted."""
    aux_feature_weight: float = 0.0
    """Weight of an auxiliary loss: a linear probe on the pooled hidden state reconstructs the prompt's
    16 feature values (standardised on the train rows, clipped at 5). The forecast's own signal is weak
    (R^2 under 1%), so the adapters learn slowly what the numbers in the prompt are; the probe asks for
    exactly that with a strong signal. Training only (needs `TrainJob.training_set_path`); 0 = off."""
    aux_feature_weight_max_samples: int | None = None
    """With `aux_feature_weight_above`: `aux_feature_weight` holds for train samples of at most this many
    rows (`max_train_samples`); a larger sample, or every train row, trains with `aux_feature_weight_above`
    (`sized`, applied by `TrainJob`). None = `aux_feature_weight` at any size."""
    aux_feature_weight_above: float | None = None
    """The probe's weight above `aux_feature_weight_max_samples` rows (the cpu profile's: BENCHMARKS.md)."""
    date_group_size: int = 0
    """0: batches by length, dates mixed. k > 0: every batch is made of whole groups of k rows of one
    date each (the per-date loss needs them), and the train sample is drawn per date in multiples of k."""
    eval_every_steps: int = 100
    """Validation RankIC every N optimizer steps (and at the end); 0 = only at the end."""
    eval_max_dates: int | None = 20
    """Validation dates evaluated during training, evenly spaced over the validation period (None = all)."""
    eval_batch_size: int = 32
    """Rows per forward pass at evaluation (32 is fastest on 2 CPU cores; larger on a GPU)."""
    early_stopping_patience: int | None = 4
    """Stop after this many evaluations without a better validation RankIC (None = never)."""
    select_best: bool = True
    """Save the weights of the best periodic evaluation (True) or the final weights (False; the average
    when `ema_decay` is set). With evaluations on a few dates the best of several is mostly the luckiest:
    a run that keeps improving is better served by its final weights."""
    checkpoint_every_steps: int = 200
    """Checkpoint every N optimizer steps (0 = never; the end of training is not checkpointed)."""
    group_by_length: bool = True
    """Length-grouped batches: rows of similar length together, less padding."""
    trunk_cache_gb: float = 6.0
    """GB per process for the frozen trunk's states of the train, then the evaluation rows, computed once
    (`modeling.trunk_cache`; adapters in the last layer only; CPU training only). 0 = off; what does not
    fit is recomputed."""
    seed: int = 0
    """Seed of the sample, the batch order, the LoRA and head initialisation and dropout."""
    bf16: bool = True
    """bf16 autocast on GPU (ignored on CPU, which trains in fp32)."""
    progress: bool = True
    """tqdm progress bar with loss, lr and samples/s (main process)."""

    def __post_init__(self) -> None:
        check_numbers(self)  # a JSON 8.0 or a bool is not a count, NaN not a weight: refused now
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"TrainConfig.seed must be in [0, 2**32), got {self.seed}")
        positive = (
            "learning_rate",
            "batch_size",
            "grad_accum_steps",
            "max_grad_norm",
            "epochs",
            "eval_batch_size",
            "huber_delta",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)!r}")
        optional = ("max_train_samples", "max_steps", "eval_max_dates", "early_stopping_patience")
        for name in (*optional, "lr_reference_steps"):  # None or >= 1
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1 or None, got {value!r}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"TrainConfig.time_budget_s must be > 0 or None, got {self.time_budget_s}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"TrainConfig.ema_decay must be in (0, 1) or None, got {self.ema_decay!r}")
        if self.head_learning_rate is not None and not self.head_learning_rate > 0:
            raise ValueError("TrainConfig.head_learning_rate must be > 0 or None")
        if not (0 <= self.warmup_ratio < 1 and 0 <= self.min_lr_ratio <= 1 and self.weight_decay >= 0):
            raise ValueError(
                "TrainConfig needs 0 <= warmup_ratio < 1, 0 <= min_lr_ratio <= 1 and weight_decay >= 0"
            )
        if self.loss not in LOSSES:
            raise ValueError(f"TrainConfig.loss must be one of {LOSSES}, got {self.loss!r}")
        if self.target_transform not in TARGET_TRANSFORMS:
            raise ValueError(
                f"TrainConfig.target_transform must be in {TARGET_TRANSFORMS}, got {self.target_transform!r}"
            )
        if (
            not self.target_clip > 0
            or min(self.weight_power, self.aux_feature_weight, self.trunk_cache_gb) < 0
        ):
            raise ValueError(
                "TrainConfig needs target_clip > 0, weight_power, aux_feature_weight, trunk_cache_gb >= 0"
            )
        limit, above = self.aux_feature_weight_max_samples, self.aux_feature_weight_above
        if (limit is None) != (above is None) or (above is not None and above < 0):
            raise ValueError("TrainConfig.aux_feature_weight_max_samples and _above: both None, or both set")
        if limit is not None and limit < 1:
            raise ValueError(f"TrainConfig.aux_feature_weight_max_samples must be an int >= 1, got {limit!r}")
        if self.date_group_size < 0 or self.date_group_size in (1, 2):
            raise ValueError(f"TrainConfig.date_group_size must be 0 or >= 3, got {self.date_group_size}")
        if self.loss == "ic" and not self.date_group_size:
            raise ValueError("loss 'ic' is a per-date correlation: set date_group_size (e.g. 16)")
        if self.ic_mse_weight < 0 or (self.ic_mse_weight and self.loss != "ic"):
            raise ValueError(f"TrainConfig.ic_mse_weight must be >= 0, 0 unless loss is 'ic' ({self.loss})")
        if self.date_group_size and (self.batch_size // self.grad_accum_steps) % self.date_group_size:
            raise ValueError(
                f"the micro-batch {self.batch_size // self.grad_accum_steps} is not a multiple of "
                f"date_group_size {self.date_group_size}"
            )
        if self.eval_every_steps < 0 or self.checkpoint_every_steps < 0:
            raise ValueError("TrainConfig.eval_every_steps and checkpoint_every_steps must be >= 0")
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of grad_accum_steps")

    def replaced(self, **changes: object) -> TrainConfig:
        """`dataclasses.replace`, where an explicit `aux_feature_weight` holds at any sample size: the size
        rule (`aux_feature_weight_max_samples`, `_above`) is cleared unless `changes` set it too (the asset's
        config, the search's params and the benches all override through here)."""
        if "aux_feature_weight" in changes:
            changes = {"aux_feature_weight_max_samples": None, "aux_feature_weight_above": None, **changes}
        return replace(self, **changes)

    def sized(self) -> TrainConfig:
        """The config this sample size trains: the probe's weight as `aux_feature_weight_max_samples`
        resolves it, the rule then cleared (None), so a saved model's config says which weight it had."""
        limit = self.aux_feature_weight_max_samples
        if limit is None:
            return self
        keep = self.max_train_samples is not None and self.max_train_samples <= limit
        weight = self.aux_feature_weight if keep else self.aux_feature_weight_above
        return replace(
            self,
            aux_feature_weight=weight,
            aux_feature_weight_max_samples=None,
            aux_feature_weight_above=None,
        )


@dataclass
class TrainJob:
    """Everything a training process needs, as one JSON file (what the orchestrator hands the child)."""

    base_model_dir: str
    """The `base_model` checkpoint directory."""
    corpus_path: str
    """The `prompt_corpus` Parquet file."""
    output_dir: str
    """Where checkpoints, the trained model (`model/`) and `train_report.json` go."""
    prompt: dict[str, Any]
    """The `PromptBuilder` settings of the corpus (horizon, sig_digits, target), saved with the model."""
    regressor: RegressorConfig = field(default_factory=RegressorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resume: bool = True
    """Continue from the last checkpoint in output_dir when there is one."""
    experiment: ExperimentSpec | None = None
    """When set: evaluate, log to MLflow and register after training (see `modeling.experiment`); a dict
    is read as an `ExperimentSpec` (unknown keys refused)."""
    reweight: dict[str, Any] | None = None
    """A `BucketConfig` (as a dict) to recompute the train weights with, fit on the train labels of the
    corpus (a search trial trying another weight scheme); None = the training set's own weights."""
    training_set_path: str | None = None
    """The `training_set` Parquet file: the feature values of the auxiliary loss come from it."""
    backtest_output: str | None = None
    """When set (a walk-forward window, see `modeling.walk_forward`): after training, forecast the corpus's
    test rows with the regressor and the feature baselines and write them to this Parquet file."""

    def __post_init__(self) -> None:
        # nested parts are typed and validated now, when the job is planned, not after training
        if isinstance(self.regressor, dict):
            self.regressor = RegressorConfig.from_dict(self.regressor)
        if isinstance(self.train, dict):
            self.train = TrainConfig(**self.train)
        # which layers get adapters, and the probe's weight, can depend on the sample's size: resolved
        # once, here
        self.regressor = self.regressor.sized_for(self.train.max_train_samples)
        self.train = self.train.sized()
        if isinstance(self.experiment, dict):
            self.experiment = ExperimentSpec(**self.experiment)
        if self.reweight is not None:
            from modeling.buckets import BucketConfig

            if BucketConfig(**self.reweight).mode != "weight":
                raise ValueError("reweight needs bucket mode 'weight' (a resampled set has no weights)")
        if self.backtest_output is not None and self.experiment is not None:
            raise ValueError("a TrainJob is either an experiment or a backtest window, not both")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainJob:
        values = dict(data)
        values["regressor"] = RegressorConfig.from_dict(values.get("regressor") or {})
        train = values.get("train") or {}
        unknown = set(train) - {f.name for f in fields(TrainConfig)}
        if unknown:
            raise ValueError(f"unknown train config keys {sorted(unknown)}")
        values["train"] = TrainConfig(**train)
        return cls(**values)

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TrainJob:
        return cls.from_dict(json.loads(Path(path).read_text()))
