"""The forecast-quality plots a quant looks at, as PNG files (headless Agg canvas, no pyplot state).

- IC by date: the daily RankIC with its 20-day rolling mean;
- cumulative long-short: the running sum of the daily top-minus-bottom decile forward return (model and
  the best baseline; with a horizon over one day the daily portfolios overlap, so read it as a trend);
- predicted vs realised: a hexbin of prediction against label;
- mean return by decile of the prediction.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from modeling.metrics import long_short_returns, per_date_correlation, quantile_returns


def _figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def forecast_plots(
    frame: pd.DataFrame,
    out_dir: str | Path,
    title: str,
    others: Mapping[str, pd.Series] | None = None,
    ret: str = "fwd_ret",
) -> dict[str, Path]:
    """Four PNGs for `frame` (date, prediction, label[, ret]); `others`: extra prediction columns (by
    name, aligned with frame) drawn in the long-short panel. Returns {plot name: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ret = ret if ret in frame.columns else "label"
    paths: dict[str, Path] = {}

    ic = per_date_correlation(frame, "prediction", "label", "spearman")
    fig = _figure((10, 3.6))
    ax = fig.subplots()
    ax.bar(pd.to_datetime(ic.index), ic.to_numpy(), width=1.0, color="0.6", label="daily RankIC")
    ax.plot(
        pd.to_datetime(ic.index),
        ic.rolling(20, min_periods=5).mean().to_numpy(),
        color="tab:blue",
        label="20-day mean",
    )
    ax.axhline(
        float(ic.mean()) if len(ic) else 0.0, color="tab:red", lw=1, ls="--", label=f"mean {ic.mean():.4f}"
    )
    ax.set_title(f"{title}: RankIC by date")
    ax.legend(loc="upper left")
    fig.tight_layout()
    paths["ic_by_date"] = out / "ic_by_date.png"
    fig.savefig(paths["ic_by_date"], dpi=90)

    fig = _figure((10, 3.6))
    ax = fig.subplots()
    series = {"model": frame["prediction"], **(others or {})}
    for name, prediction in series.items():
        ls = long_short_returns(frame.assign(prediction=np.asarray(prediction)), "prediction", ret)
        ax.plot(pd.to_datetime(ls.index), ls.cumsum().to_numpy(), label=f"{name} ({ls.mean():.2e}/day)")
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_title(f"{title}: cumulative top-minus-bottom decile {ret}")
    ax.legend(loc="upper left")
    fig.tight_layout()
    paths["cumulative_long_short"] = out / "cumulative_long_short.png"
    fig.savefig(paths["cumulative_long_short"], dpi=90)

    fig = _figure((5.5, 5))
    ax = fig.subplots()
    y = frame["label"].to_numpy(float)
    lim = np.nanpercentile(np.abs(y), 99) if len(y) else 1.0
    ax.hexbin(
        frame["prediction"].to_numpy(float), np.clip(y, -lim, lim), gridsize=40, bins="log", cmap="Greys"
    )
    ax.set_xlabel("prediction")
    ax.set_ylabel("realised label (clipped at its 99th percentile)")
    ax.set_title(f"{title}: predicted vs realised")
    fig.tight_layout()
    paths["predicted_vs_realised"] = out / "predicted_vs_realised.png"
    fig.savefig(paths["predicted_vs_realised"], dpi=90)

    fig = _figure((6.5, 3.6))
    ax = fig.subplots()
    deciles = quantile_returns(frame, "prediction", ret).mean()
    ax.bar(deciles.index.astype(int), deciles.to_numpy(), color="tab:blue")
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_xlabel("decile of the prediction (10 = highest)")
    ax.set_ylabel(f"mean {ret}")
    ax.set_title(f"{title}: mean {ret} by decile")
    fig.tight_layout()
    paths["decile_returns"] = out / "decile_returns.png"
    fig.savefig(paths["decile_returns"], dpi=90)
    return paths


def backtest_png(daily: Mapping[str, pd.DataFrame], by_month: pd.DataFrame, path: str | Path) -> Path:
    """The walk-forward backtest in four panels: cumulative TopkDropout excess return with (solid) and
    without (dashed) cost per model, its drawdown with cost, the mean RankIC by month, and the daily
    turnover (20-date rolling mean). `daily`: `modeling.backtest.portfolio_returns` per model."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = _figure((11, 8))
    ax_cum, ax_dd, ax_month, ax_turn = (fig.add_subplot(2, 2, i) for i in range(1, 5))
    for i, (model, frame) in enumerate(daily.items()):
        color = f"C{i}"
        with_cost = frame["excess_return_with_cost"].cumsum()
        ax_cum.plot(frame["date"], with_cost, color=color, label=model)
        ax_cum.plot(frame["date"], frame["excess_return_without_cost"].cumsum(), color=color, ls="--", lw=0.8)
        ax_dd.plot(frame["date"], with_cost - with_cost.cummax(), color=color, label=model)
        ax_turn.plot(
            frame["date"], frame["topk_turnover"].rolling(20, min_periods=1).mean(), color=color, label=model
        )
    ax_cum.set_title("TopkDropout cumulative excess return (solid: with cost)")
    ax_dd.set_title("Drawdown of the excess return with cost")
    ax_turn.set_title("TopkDropout daily turnover (20-date mean)")
    if not by_month.empty:
        width = 0.8 / max(1, by_month.shape[1])
        x = np.arange(len(by_month))
        for i, model in enumerate(by_month.columns):
            ax_month.bar(x + i * width, by_month[model].to_numpy(float), width, label=model, color=f"C{i}")
        ax_month.set_xticks(x + 0.4 - width / 2, by_month.index, rotation=45, fontsize=7)
    ax_month.axhline(0.0, color="black", lw=0.6)
    ax_month.set_title("Mean daily RankIC by month")
    for ax in (ax_cum, ax_dd, ax_month, ax_turn):
        ax.legend(fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return path
