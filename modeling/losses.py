"""Training losses of the regressor (and of the feature-MLP baseline, which must train the same way).

- pointwise: squared error or Huber per row, weighted by the bucket weights, normalised by the global
  weight sum so that a DDP run computes exactly the single-process loss;
- `ic`: minus the per-date correlation of prediction and label, averaged over the dates of a
  date-grouped batch (each batch holds whole groups of rows from one date each). The metric the model
  is judged by is a per-date rank correlation; a correlation loss is blind to the level and scale of
  the forecast and to the market move of the day, and a single extreme return cannot dominate it the
  way it dominates a squared error;
- `ic` with `ic_mse_weight` > 0: the correlation plus that weight times the weighted squared error
  (`ic_mse_loss`), so that the forecast keeps the target's scale.

This module imports only torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from modeling.job import LOSSES  # noqa: F401 (the loss names `TrainConfig.loss` may take)


def pointwise_loss(
    pred: torch.Tensor, target: torch.Tensor, kind: str, huber_delta: float = 1.0
) -> torch.Tensor:
    """Per-row loss: squared error or Huber."""
    if kind == "mse":
        return (pred - target) ** 2
    if kind == "huber":
        return F.huber_loss(pred, target, reduction="none", delta=huber_delta)
    raise ValueError(f"unknown pointwise loss {kind!r}")


def weighted_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    kind: str,
    huber_delta: float = 1.0,
    weight_total: torch.Tensor | None = None,
    n_processes: int = 1,
) -> torch.Tensor:
    """sum(w * loss) / sum(w): the weighted mean over the global batch.

    Under DDP each process holds part of the batch and gradients are averaged over processes, so the
    local sum is divided by the global weight sum `weight_total` and multiplied by the process count:
    the average of the processes' values is then exactly the global weighted mean.
    """
    total = weight.sum() if weight_total is None else weight_total
    return (weight * pointwise_loss(pred.float(), target, kind, huber_delta)).sum() * n_processes / total


def per_group_correlation(
    pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float = 1e-8
) -> torch.Tensor:
    """Weighted Pearson correlation of pred and target within each consecutive group of `group_size`
    rows: [B] -> [B / group_size]. A group with no spread in the prediction gets correlation 0 (and a
    zero gradient through its denominator, which `eps` keeps finite)."""
    if pred.shape[0] % group_size:
        raise ValueError(f"a batch of {pred.shape[0]} rows is not made of groups of {group_size}")
    p = pred.float().view(-1, group_size)  # [G, m]
    y = target.float().view(-1, group_size)
    w = weight.float().view(-1, group_size)
    w = w / w.sum(dim=1, keepdim=True)
    dp = p - (w * p).sum(dim=1, keepdim=True)
    dy = y - (w * y).sum(dim=1, keepdim=True)
    cov = (w * dp * dy).sum(dim=1)
    var_p = (w * dp * dp).sum(dim=1)
    var_y = (w * dy * dy).sum(dim=1)
    return cov / torch.sqrt(var_p * var_y + eps)


def ic_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Minus the mean per-date correlation over the date groups of the (local) batch.

    Under DDP every process holds the same number of whole groups, so the average over processes that
    DDP applies to the gradients is the mean over all groups of the global batch.
    """
    return -per_group_correlation(pred, target, weight, group_size).mean()


def ic_mse_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    group_size: int,
    mse_weight: float,
    weight_total: torch.Tensor | None = None,
    n_processes: int = 1,
) -> torch.Tensor:
    """`ic_loss` + mse_weight x `weighted_loss(..., "mse")`: the ranking objective with an anchor.

    The correlation's gradient with respect to a group's forecasts scales as 1 / their spread, and
    nothing in it holds the spread still: as the head's outputs grow over a long run, the steps the
    correlation takes in forecast space shrink. The squared error pins the forecast to the target's
    scale (on per-date rank-gaussian targets, spread about the correlation itself). `weight_total` and
    `n_processes` as in `weighted_loss` (the squared error is the global weighted mean under DDP; the
    correlation the mean over groups, as in `ic_loss`)."""
    correlation = ic_loss(pred, target, weight, group_size)
    if not mse_weight:
        return correlation
    squared = weighted_loss(pred, target, weight, "mse", weight_total=weight_total, n_processes=n_processes)
    return correlation + mse_weight * squared
