"""LLMRegressor: a frozen pretrained LM with LoRA adapters and an MLP head that reads the last token.

Reading order: the head (what turns a hidden state into a return forecast) -> pooling (which hidden
state it reads) -> the wrapper (backbone + head, one forward) -> the constructor (from a `base_model`
directory) -> save/load (safetensors and JSON only). Scoring (merged adapters, batches by length,
sharding across processes) lives in `modeling.inference`.

    input_ids, attention_mask [B, T]
      -> backbone (AutoModel: frozen weights + peft LoRA on every attention and MLP projection)
      -> hidden state of the last non-padding token [B, H]
      -> MLP head in fp32 -> prediction [B]

The LM head is never loaded (`AutoModel`, not `AutoModelForCausalLM`) and never computed.

The Llama family takes the last-layer shortcut (`modeling.llama_shortcut`: the last decoder layer on
the pooled token only, the frozen trunk optionally read from `modeling.trunk_cache`); other
architectures take the full forward.

This module must not import dagster, duckdb or mlflow: it runs on the GPU image, which lacks them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from modeling.backbones.common import (
    load_frozen_backbone,
    model_fingerprint,
    require_model_dir,
)
from modeling.backbones.files import fingerprint_matches
from modeling.errors import ModelUnloadableError

# Re-exported for pyfunc models registered before scoring moved to `modeling.inference`: their shipped
# code imports it from here. New code imports it from `modeling.inference`, which never imports this
# module (no cycle).
from modeling.inference import predict_prompts as predict_prompts
from modeling.job import HeadConfig, LoraSettings, RegressorConfig  # noqa: F401 (re-exported: the model's shape)
from modeling.llama_shortcut import (  # noqa: F401 (is_right_padded: re-exported, the padding helpers)
    is_right_padded,
    last_token_index,
    llama_last_hidden,
    position_ids_from_mask,
    supports_last_layer_shortcut,
)

REGRESSOR_FORMAT_VERSION = 1
"""Version of the saved layout below; bumped when it changes."""
REGRESSOR_CONFIG_FILE = "regressor.json"
"""Config, base model reference and prompt settings of a saved regressor."""
HEAD_FILE = "head.safetensors"
"""The MLP head's weights."""
ADAPTER_DIR = "adapter"
"""The LoRA adapter, written by peft's `save_pretrained` (safetensors + adapter_config.json)."""

ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}
"""Head activations by name."""


# --- head -----------------------------------------------------------------------------------------------
class RegressionHead(nn.Module):
    """MLP from a hidden state to one number: [Linear -> activation -> dropout] x depth -> Linear(., 1).

    The output layer starts small (weights scaled by 0.1, bias 0), so the first predictions are close
    to 0, the mean of a demeaned label, and the first gradients do not shake the adapters.

    With `HeadConfig.feature_bottleneck` = k, a linear readout maps the state to k numbers first and the
    MLP reads only those; under the auxiliary loss the readout is the probe of the prompt's features.
    """

    def __init__(self, in_features: int, config: HeadConfig = HeadConfig()) -> None:
        super().__init__()
        self.in_features = in_features
        """Width of the state the head reads (the backbone's hidden size)."""
        width = in_features
        self.readout: nn.Linear | None = None
        if config.feature_bottleneck:
            self.readout = nn.Linear(width, config.feature_bottleneck)
            width = config.feature_bottleneck
        layers: list[nn.Module] = []
        for hidden in config.hidden_sizes:
            layers += [nn.Linear(width, hidden), ACTIVATIONS[config.activation](), nn.Dropout(config.dropout)]
            width = hidden
        out = nn.Linear(width, 1)
        with torch.no_grad():
            out.weight.mul_(0.1)
            out.bias.zero_()
        self.net = nn.Sequential(*layers, out)

    def forward(
        self, x: torch.Tensor, with_readouts: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        z = x if self.readout is None else self.readout(x)  # [B, H] -> [B, k] with the bottleneck
        prediction = self.net(z).squeeze(-1)  # [B]
        return (prediction, z) if with_readouts else prediction


# --- pooling --------------------------------------------------------------------------------------------
def _full_forward_last_hidden(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Any architecture: the whole forward, then the last real token's final hidden state."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    hidden = out.last_hidden_state  # [B, T, H]
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, last_token_index(attention_mask)]  # [B, H]


# --- wrapper --------------------------------------------------------------------------------------------
class LLMRegressor(nn.Module):
    """Frozen backbone with LoRA adapters (a peft model) and an fp32 MLP head on the last token."""

    def __init__(
        self, backbone: nn.Module, head: RegressionHead, config: RegressorConfig, base_model: dict[str, Any]
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.config = config
        self.base_model = base_model
        """Reference to the base model: path, fingerprint, model type (saved with the regressor)."""
        self.aux_head: nn.Linear | None = None
        """Training only (`attach_aux_head`): a linear probe from the pooled state to the prompt's own
        feature values; never saved, never used to forecast. A head with a feature bottleneck needs none:
        its readout is the probe, and it is saved with the head."""

    def attach_aux_head(self, n_outputs: int) -> None:
        """Add the auxiliary probe (see `TrainConfig.aux_feature_weight`), on the head's device; with a
        feature bottleneck, check that its readout has one output per feature instead."""
        if self.head.readout is not None:
            if self.head.readout.out_features != n_outputs:
                raise ValueError(
                    f"the head's feature bottleneck has {self.head.readout.out_features} outputs, the "
                    f"auxiliary probe needs {n_outputs} (one per feature)"
                )
            return
        self.aux_head = nn.Linear(self.head.in_features, n_outputs).to(next(self.head.parameters()).device)

    @property
    def base(self) -> nn.Module:
        """The transformer under the adapters (a `LlamaModel` for Llama), its modules LoRA-wrapped."""
        return self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model") else self.backbone

    def pooled_hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, trunk: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final hidden state of the last non-padding token: [B, T] -> [B, H]. `trunk` [B, T, H]: the
        frozen layers' states from `modeling.trunk_cache` (last-layer shortcut only)."""
        base = self.base
        if self.config.last_layer_shortcut and supports_last_layer_shortcut(base):
            return llama_last_hidden(base, input_ids, attention_mask, trunk)
        if trunk is not None:
            raise ValueError("cached trunk states need the last-layer shortcut of a Llama-family backbone")
        return _full_forward_last_hidden(base, input_ids, attention_mask)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        with_aux: bool = False,
        trunk: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        pooled = self.pooled_hidden(input_ids, attention_mask, trunk)  # [B, H], backbone dtype
        # the head runs in fp32 even under bf16 autocast: its output is the forecast, and small
        # differences between stocks (the cross-section) are what matters
        with torch.autocast(device_type=pooled.device.type, enabled=False):
            if not with_aux:
                return self.head(pooled.float())  # [B]
            if self.head.readout is not None:
                return self.head(pooled.float(), with_readouts=True)  # [B], [B, F]: the probe is the readout
            return self.head(pooled.float()), self.aux_head(pooled.float())  # [B], [B, F]

    def lora_layers(self) -> list[nn.Module]:
        """The backbone's LoRA-wrapped projections."""
        from peft.tuners.lora import LoraLayer

        return [m for m in self.backbone.modules() if isinstance(m, LoraLayer)]

    def adapters_mergeable(self) -> bool:
        """True when the adapters can be folded into the frozen weights without loss: an fp32, unquantised
        backbone whose adapters are not merged yet (see `modeling.inference.merged_adapters`)."""
        layers = self.lora_layers()
        return (
            bool(layers)
            and self.config.quantization == "none"
            and all(not layer.merged for layer in layers)
            and all(layer.get_base_layer().weight.dtype == torch.float32 for layer in layers)
        )

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters that train (adapters and head), detached copies: a best-checkpoint snapshot."""
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)


# --- constructor ----------------------------------------------------------------------------------------
def describe_reference(base_model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """How a saved regressor names its base model: the directory and a content fingerprint."""
    from transformers import AutoConfig

    path = require_model_dir(base_model_dir).resolve()
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    return {"path": str(path), "fingerprint": model_fingerprint(path), "model_type": config.model_type}


def enable_checkpointing(backbone: nn.Module, first_layers: int | None = None) -> None:
    """Activation checkpointing in the first `first_layers` decoder layers of `backbone` (None = every layer).

    Every decoder layer reads its own flag, so the layers after the first K keep their activations.
    """
    backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for layer in backbone.layers[first_layers or len(backbone.layers) :]:
        layer.gradient_checkpointing = False


def build_regressor(
    base_model_dir: str | os.PathLike[str],
    config: RegressorConfig = RegressorConfig(),
    dtype: torch.dtype | None = None,
    base_model: dict[str, Any] | None = None,
) -> LLMRegressor:
    """Backbone from `base_model_dir` (`AutoModel.from_pretrained`, frozen), LoRA via peft, a new head.

    `dtype` is the backbone's (bf16 on GPU, fp32 on CPU; None = as saved); adapters and head stay fp32.
    Initialisation draws from torch's global RNG: seed it first for a reproducible model.
    """
    from peft import get_peft_model

    path = require_model_dir(base_model_dir)
    backbone = load_frozen_backbone(path, config.quantization, dtype)
    if config.gradient_checkpointing:
        enable_checkpointing(backbone, config.gradient_checkpointing_layers)
    peft_model = get_peft_model(backbone, config.lora.peft_config(backbone))  # adapters trainable, fp32
    hidden = int(backbone.config.get_text_config().hidden_size)
    head = RegressionHead(hidden, config.head).to(device=next(peft_model.parameters()).device)
    return LLMRegressor(peft_model, head, config, base_model or describe_reference(path))


# --- save / load ----------------------------------------------------------------------------------------
def save_regressor(
    model: LLMRegressor,
    out_dir: str | os.PathLike[str],
    prompt: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write adapter (peft, safetensors), head (safetensors) and `regressor.json`; no pickle anywhere.

    `prompt` holds the `PromptBuilder` settings the model was trained with, so inference renders the
    same text; `extra` anything else worth keeping (training summary, data ranges).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.backbone.save_pretrained(out / ADAPTER_DIR, safe_serialization=True)
    head_state = {k: v.detach().float().contiguous().cpu() for k, v in model.head.state_dict().items()}
    save_file(head_state, out / HEAD_FILE)
    info = {
        "format_version": REGRESSOR_FORMAT_VERSION,
        "config": model.config.to_dict(),
        "base_model": model.base_model,
        "hidden_size": int(model.head.in_features),
        "prompt": prompt,
        "extra": extra or {},
    }
    (out / REGRESSOR_CONFIG_FILE).write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
    return out


def read_regressor_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    file = Path(path) / REGRESSOR_CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{str(path)!r} holds no saved regressor ({REGRESSOR_CONFIG_FILE} missing)")
    info = json.loads(file.read_text())
    if info.get("format_version") != REGRESSOR_FORMAT_VERSION:
        raise ModelUnloadableError(
            f"saved regressor format {info.get('format_version')} is not {REGRESSOR_FORMAT_VERSION}"
        )
    return info


def load_regressor(
    path: str | os.PathLike[str],
    base_model_dir: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = "auto",
    check_fingerprint: bool = True,
    merge_adapters: bool = True,
) -> LLMRegressor:
    """A saved regressor on its base model (the one it names, or `base_model_dir`), in eval mode.

    `merge_adapters`: fold the LoRA updates into an fp32 backbone's weights once (a loaded model only
    scores; see `modeling.inference.merged_adapters`), so no scoring call has to merge them again.

    `device`: "auto" = the GPU when there is one (env `REGRESSOR_DEVICE` overrides), else the CPU; a
    4-bit model stays where bitsandbytes put it. The base model's fingerprint must match the one saved:
    a backbone rebuilt or replaced under the same path would otherwise silently produce other forecasts.
    """
    from peft import PeftModel

    path = Path(path)
    info = read_regressor_info(path)
    base_dir = Path(base_model_dir or info["base_model"]["path"])
    saved = info["base_model"].get("fingerprint")
    if check_fingerprint and saved and not fingerprint_matches(base_dir, saved):
        raise ModelUnloadableError(
            f"the base model in {str(base_dir)!r} is not the one this regressor was trained on (fingerprint "
            f"{model_fingerprint(base_dir)[:15]} != {saved[:15]}); point base_model_dir at the right "
            "checkpoint"
        )
    config = RegressorConfig.from_dict(info["config"])
    backbone = load_frozen_backbone(base_dir, config.quantization, dtype)
    peft_model = PeftModel.from_pretrained(backbone, path / ADAPTER_DIR, is_trainable=False)
    head = RegressionHead(int(info["hidden_size"]), config.head)
    head.load_state_dict(load_file(path / HEAD_FILE))
    if device == "auto":
        device = os.environ.get("REGRESSOR_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    if config.quantization == "4bit":
        # the quantised backbone is already placed; the head goes where the backbone is
        head.to(next(peft_model.parameters()).device)
    elif device is not None:
        peft_model.to(device)
        head.to(device)
    model = LLMRegressor(peft_model, head, config, info["base_model"]).eval()
    if merge_adapters and model.adapters_mergeable():
        model.backbone.merge_adapter()
    return model
