"""The shared-prefix forward: a batch's common leading tokens computed once, not once per row.

Every prompt of a batch opens with the same tokens (the chat template's header and the system turn).
Under causal attention those positions' states depend on those tokens only, so they are the same in
every row: this forward runs them once (batch 1), keeps each layer's keys and values, and runs the
rows' own tokens against them (positions continue after the prefix). Same hidden states as the full
forward up to float rounding (tested to 1e-5), gradients included: the prefix's keys and values stay
in the autograd graph, so the adapters of a layer learn from them as before.

    input_ids [B, T] = shared prefix [1, P] + own tokens [B, T - P]
      layers 0..L-2: prefix once -> K/V [1, KV, P, D] per layer; own tokens attend to [prefix K/V ; own K/V]
      last layer:    (`modeling.model`) the last real token's query against all P + T - P keys

Only for right-padded batches (every row starts at position 0, so a shared prefix is aligned) under
SDPA attention (the mask below is boolean; eager attention wants an additive one), and not under
gradient checkpointing (transformers drops a checkpointed layer's cache, which the replay would write
twice). Anything else, or a prefix too short to pay for its extra kernel calls, takes the plain forward
(P = 0). LoRA dropout, where a profile sets it, is drawn once for the prefix, not once per row.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

MIN_SHARED_PREFIX = 16
"""Shortest common prefix worth a separate pass, in tokens."""
MIN_SHARED_FRACTION = 0.25
"""Smallest share of a batch's width the common prefix must reach. The legend prompt's 181 shared tokens
of 303 take this path (1.6x training steps, 1.8x scoring). The inline prompt's 27 of 248 do not, although
they measured +12% training steps and +13% scoring in isolation (BENCHMARKS.md, the shared-prefix
section): in the trainer the gain was not visible against the machine's drift, and float rounding moves
the training trajectory (seed 0: -0.0005 +- 0.0004 validation RankIC against the plain forward), so
turning it on for the default prompt waits for a seed-averaged check; until then the default prompt keeps
its bit-for-bit forecasts."""
SCORING_MIN_SHARED_FRACTION = 0.0
"""The share rule when scoring (no autograd): none, only `MIN_SHARED_PREFIX`. There is no trajectory to
move, and the forecasts move by float rounding only (below 1e-5, tested), so the inline prompt's 27 shared
tokens of 248 buy their +13% scoring rate (BENCHMARKS.md) in the final comparison and the pyfunc."""


class PrefixKV:
    """Per-layer keys and values of the shared prefix, in the role of a transformers `Cache`.

    The decoder's attention calls `update(key, value, layer_idx)` with its new keys and values and
    attends over what it returns. Recording (the prefix pass, batch 1) stores them; replaying (the rows'
    own tokens, batch B) returns the prefix's, broadcast over the batch, followed by the new ones.
    """

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.recording = True

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.recording:
            self.keys[layer_idx], self.values[layer_idx] = key, value  # [1, KV, P, D]
            return key, value
        return self.extended(layer_idx, key, value)

    def extended(
        self, layer_idx: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[prefix ; own] keys and values of one layer: [B, KV, T', D] -> [B, KV, P + T', D]."""
        b = key.shape[0]
        k_p = self.keys[layer_idx].expand(b, -1, -1, -1)
        v_p = self.values[layer_idx].expand(b, -1, -1, -1)
        return torch.cat([k_p, key], dim=2), torch.cat([v_p, value], dim=2)


def shared_prefix_length(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    minimum: int | None = None,
    min_fraction: float | None = None,
) -> int:
    """Leading tokens that every row of a right-padded batch shares, leaving each row at least its own
    last token; 0 when one row, or fewer than `minimum` tokens or `min_fraction` of the batch's width
    (defaults: the module's constants, read at call time; the fraction is `MIN_SHARED_FRACTION` under
    autograd, `SCORING_MIN_SHARED_FRACTION` without): [B, T] -> int. The caller checks the padding side
    (under left padding the prompts do not start at the same position)."""
    minimum = MIN_SHARED_PREFIX if minimum is None else minimum
    if min_fraction is None:
        min_fraction = MIN_SHARED_FRACTION if torch.is_grad_enabled() else SCORING_MIN_SHARED_FRACTION
    if input_ids.shape[0] < 2:
        return 0
    mask = attention_mask.to(torch.int64)
    differs = (input_ids != input_ids[:1]).any(dim=0)  # [T]
    common = int(differs.to(torch.int8).argmax()) if bool(differs.any()) else input_ids.shape[1]
    common = min(common, int(mask.sum(dim=1).min()) - 1)
    return common if common >= max(minimum, min_fraction * input_ids.shape[1]) else 0


def prefix_sharable(model: nn.Module) -> bool:
    """True when `model` (a Llama model) can take the shared-prefix forward: SDPA attention, and no decoder
    layer checkpointing under autograd."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    return not (
        torch.is_grad_enabled()
        and any(getattr(layer, "gradient_checkpointing", False) and layer.training for layer in model.layers)
    )


def own_tokens_causal_mask(n_prefix: int, n_own: int, device: torch.device) -> torch.Tensor:
    """Boolean mask [1, 1, T', P + T']: every own token sees the whole prefix and the own tokens up to
    itself (causality aligned to the bottom right). Padding needs no mask under right padding: a real
    token only ever follows real ones, and the padding's own states are never read."""
    own = torch.ones(n_own, n_own, dtype=torch.bool, device=device).tril()
    prefix = torch.ones(n_own, n_prefix, dtype=torch.bool, device=device)
    return torch.cat([prefix, own], dim=1)[None, None]


def cache_argument(function: Callable[..., object]) -> str:
    """The name under which a transformers function (a decoder layer's `forward`, `create_causal_mask`)
    takes its key/value cache: `cache` from transformers 5.2x, `past_key_values` before (5.17 on the GPU
    image). A layer that takes neither would swallow the prefix cache in its **kwargs and attend over its
    own tokens only: that is an error here."""
    accepted = inspect.signature(function).parameters
    for name in ("cache", "past_key_values", "past_key_value"):
        if name in accepted:
            return name
    raise TypeError(f"{getattr(function, '__qualname__', function)} takes no key/value cache argument")


def run_with_shared_prefix(
    model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, n_prefix: int
) -> tuple[torch.Tensor, PrefixKV, tuple[torch.Tensor, torch.Tensor]]:
    """A Llama model's decoder layers 0..L-2 on the rows' own tokens, with the shared prefix run once.

    Returns the own tokens' hidden states after layer L-2 [B, T - P, H], the prefix's keys and values
    of every layer (the last one's too, for the last-token step) and the rotary embeddings of every
    position (cos, sin) [B, T, D].
    """
    embeds = model.embed_tokens(input_ids)  # [B, T, H]
    cos, sin = model.rotary_emb(embeds, position_ids=position_ids)  # [B, T, D] each
    prefix_kv = PrefixKV()
    cache = {cache_argument(model.layers[0].forward): prefix_kv}
    prefix, prefix_pos = embeds[:1, :n_prefix], (cos[:1, :n_prefix], sin[:1, :n_prefix])  # [1, P, .]
    for layer in model.layers:  # the prefix alone, plain causal attention; its K/V recorded
        prefix = layer(prefix, attention_mask=None, position_embeddings=prefix_pos, **cache)
    prefix_kv.recording = False
    hidden = embeds[:, n_prefix:]  # [B, T', H]
    mask = own_tokens_causal_mask(n_prefix, hidden.shape[1], hidden.device)
    own_pos = (cos[:, n_prefix:], sin[:, n_prefix:])
    for layer in model.layers[: model.config.num_hidden_layers - 1]:
        hidden = layer(hidden, attention_mask=mask, position_embeddings=own_pos, **cache)
    return hidden, prefix_kv, (cos, sin)
