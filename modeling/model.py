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

Last-layer shortcut: the head reads one position, so in the last decoder layer only that position's
query, attention output and MLP matter; every other position's output there is discarded. For
Llama-family backbones (Llama 3, SmolLM2, the embedded tiny Llama) `pooled_hidden` runs the last layer
on the last token only (its keys and values still cover the whole prompt). The result is the same
hidden state as the full forward (tested to 1e-5); it skips most of one layer's work, which is about
40% of the compute of the 2-layer embedded backbone and 1/L of an L-layer one. The batch's common
leading tokens (the system turn) run once per batch there (`modeling.shared_prefix`). Other
architectures take the full forward.

This module must not import dagster, duckdb or mlflow: it runs on the GPU image, which lacks them.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from modeling.backbones.common import (
    load_frozen_backbone,
    model_fingerprint,
    require_model_dir,
)
from modeling.errors import ModelUnloadableError

# Re-exported for pyfunc models registered before scoring moved to `modeling.inference`: their shipped
# code imports it from here. New code imports it from `modeling.inference`, which never imports this
# module (no cycle).
from modeling.inference import predict_prompts as predict_prompts
from modeling.job import HeadConfig, LoraSettings, RegressorConfig  # noqa: F401 (re-exported: the model's shape)
from modeling.shared_prefix import prefix_sharable, run_with_shared_prefix, shared_prefix_length

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
LLAMA_FAMILY = frozenset({"llama"})
"""`config.model_type`s whose decoder layers the last-layer shortcut knows (Llama 3, SmolLM2, embedded)."""


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
def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-padding token of each row, under left or right padding: [B, T] -> [B]."""
    mask = attention_mask.to(torch.int64)
    if bool((mask.sum(dim=1) == 0).any()):
        raise ValueError("a row of the batch has no tokens (all padding)")
    t = mask.shape[1]
    return t - 1 - mask.flip(1).argmax(dim=1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so a left-padded row gets the positions of the unpadded
    one (padding positions get 0; they are masked anyway): [B, T] -> [B, T]."""
    return (attention_mask.to(torch.int64).cumsum(dim=1) - 1).clamp(min=0)


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


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """True when every row is its real tokens followed by padding only (ones, then zeros): [B, T]."""
    mask = attention_mask.to(torch.int8)
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def _padding_causal_mask(
    model: nn.Module, embeds: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor | None:
    """Causal mask that also hides padding (needed for left padding), as `LlamaModel.forward` builds it."""
    from transformers.masking_utils import create_causal_mask

    # no cache here; transformers 5.x renamed the argument `past_key_values` -> `cache`
    cache_arg = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
    return create_causal_mask(
        config=model.config,
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        **{cache_arg: None},
    )


def _llama_last_hidden(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Llama family: layers 0..L-2 on every token as `LlamaModel.forward` runs them, then the last layer
    on the last real token only, attending over the whole prompt. Same result as the full forward.

    Under right padding (the tokenizers' default here) and SDPA attention (what `build_regressor` asks
    for) no mask is built: SDPA runs causal (`is_causal`),
    which skips the blocks above the diagonal. That is exact, because a real token attends only to the
    tokens before it, all real, and the padding's own states are never read (the last layer masks them
    as keys). Measured 1.13x faster scoring and 1.07x faster training, bit-identical forecasts.
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    position_ids = position_ids_from_mask(attention_mask)
    # SDPA applies causality itself only when handed no mask (eager attention would not)
    sdpa = getattr(model.config, "_attn_implementation", None) == "sdpa"
    right_padded = is_right_padded(attention_mask)
    sharable = right_padded and prefix_sharable(model)
    n_prefix = shared_prefix_length(input_ids, attention_mask) if sharable else 0
    if n_prefix:  # the batch's common leading tokens once, not once per row (`modeling.shared_prefix`)
        hidden, prefix_kv, (cos, sin) = run_with_shared_prefix(model, input_ids, position_ids, n_prefix)
    else:
        embeds = model.embed_tokens(input_ids)  # [B, T, H]
        causal_mask = None if sdpa and right_padded else _padding_causal_mask(model, embeds, attention_mask)
        cos, sin = model.rotary_emb(embeds, position_ids=position_ids)  # [B, T, D] each
        hidden = embeds
        for layer in model.layers[: model.config.num_hidden_layers - 1]:
            hidden = layer(
                hidden, attention_mask=causal_mask, position_embeddings=(cos, sin), position_ids=position_ids
            )

    layer = model.layers[model.config.num_hidden_layers - 1]
    attn = layer.self_attn
    b, t, _ = hidden.shape  # t: the rows' own tokens (after the shared prefix, if any)
    rows = torch.arange(b, device=hidden.device)
    last = last_token_index(attention_mask)  # [B], position in the whole prompt
    normed = layer.input_layernorm(hidden)  # [B, T', H]
    # keys and values of every position; the query of the last real token only
    k = attn.k_proj(normed).view(b, t, -1, attn.head_dim).transpose(1, 2)  # [B, KV, T', D]
    v = attn.v_proj(normed).view(b, t, -1, attn.head_dim).transpose(1, 2)
    q = attn.q_proj(normed[rows, last - n_prefix].unsqueeze(1))  # [B, 1, NH * D]
    q = q.view(b, 1, -1, attn.head_dim).transpose(1, 2)  # [B, NH, 1, D]
    q, _ = apply_rotary_pos_emb(q, q, cos[rows, last].unsqueeze(1), sin[rows, last].unsqueeze(1))
    _, k = apply_rotary_pos_emb(k, k, cos[:, n_prefix:], sin[:, n_prefix:])
    if n_prefix:
        k, v = prefix_kv.extended(model.config.num_hidden_layers - 1, k, v)  # [B, KV, T, D]
    k, v = repeat_kv(k, attn.num_key_value_groups), repeat_kv(v, attn.num_key_value_groups)
    # the last real token sees every real token (all precede it); padding is masked out
    key_mask = attention_mask.to(torch.bool)[:, None, None, :]  # [B, 1, 1, T]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, scale=attn.scaling)  # [B, NH, 1, D]
    out = attn.o_proj(out.transpose(1, 2).reshape(b, 1, -1))  # [B, 1, H]
    h = hidden[rows, last - n_prefix].unsqueeze(1) + out
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.norm(h).squeeze(1)  # [B, H]


def supports_last_layer_shortcut(model: nn.Module) -> bool:
    """True for a Llama-family base model with the module layout `_llama_last_hidden` reads."""
    config = getattr(model, "config", None)
    layers = getattr(model, "layers", None)
    return (
        getattr(config, "model_type", None) in LLAMA_FAMILY
        and layers is not None
        and len(layers) >= 1
        and all(hasattr(model, name) for name in ("embed_tokens", "rotary_emb", "norm"))
    )


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

    def pooled_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden state of the last non-padding token: [B, T] -> [B, H]."""
        base = self.base
        if self.config.last_layer_shortcut and supports_last_layer_shortcut(base):
            return _llama_last_hidden(base, input_ids, attention_mask)
        return _full_forward_last_hidden(base, input_ids, attention_mask)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, with_aux: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        pooled = self.pooled_hidden(input_ids, attention_mask)  # [B, H], backbone dtype
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
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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
    reference = describe_reference(base_dir)
    saved = info["base_model"].get("fingerprint")
    if check_fingerprint and saved and reference["fingerprint"] != saved:
        raise ModelUnloadableError(
            f"the base model in {str(base_dir)!r} is not the one this regressor was trained on (fingerprint "
            f"{reference['fingerprint'][:12]} != {saved[:12]}); point base_model_dir at the right checkpoint"
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
