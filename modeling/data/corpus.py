"""The prompt corpus as training reads it: its splits, the seeded train sample with its targets and
weights, the evaluation dates, the tokenised rows, and the micro-batches of an epoch.

Training (`modeling.train`), scoring (`modeling.evaluation`), the experiment's baselines and the
benchmarks all read the corpus through these functions, so they see the same rows, targets and weights.
Like `modeling.train`, this module imports neither dagster, duckdb nor mlflow (it runs on the GPU image).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from modeling.inference import encode_prompts
from modeling.targets import tempered_weights, training_targets


class SampleSettings(Protocol):
    """What `train_sample` reads of a `modeling.train.TrainConfig` (typed structurally, so that this module
    does not import the training recipe)."""

    @property
    def max_train_samples(self) -> int | None: ...
    @property
    def target_transform(self) -> str: ...
    @property
    def target_clip(self) -> float: ...
    @property
    def weight_power(self) -> float: ...
    @property
    def date_group_size(self) -> int: ...
    @property
    def seed(self) -> int: ...


CORPUS_COLUMNS = ["date", "symbol", "split", "label", "weight", "prompt"]


def read_corpus_split(
    corpus_path: str | os.PathLike[str], split: str, columns: list[str] | None = None
) -> pd.DataFrame:
    """The rows of one split of the prompt corpus (Parquet predicate pushdown: other splits not read)."""
    table = pq.read_table(corpus_path, columns=columns or CORPUS_COLUMNS, filters=[("split", "=", split)])
    return table.to_pandas()


def sample_rows(frame: pd.DataFrame, max_rows: int | None, seed: int) -> pd.DataFrame:
    """A seeded sample of `max_rows` rows without replacement (all rows when None or more)."""
    if max_rows is None or max_rows >= len(frame):
        return frame.reset_index(drop=True)
    keep = np.sort(np.random.default_rng(seed).choice(len(frame), size=max_rows, replace=False))
    return frame.iloc[keep].reset_index(drop=True)


def train_sample(
    corpus_path: str | os.PathLike[str],
    cfg: SampleSettings,
    reweight: dict[str, Any] | None = None,
    columns: list[str] | None = None,
) -> pd.DataFrame:
    """The train rows a job trains on, with what it trains them to fit: `label` is the training target
    (`cfg.target_transform`, per date over the whole train split) and `raw_label` the stored label,
    `weight` the bucket weights (re-fit when `reweight` is given, tempered by `cfg.weight_power`), then
    the seeded sample (per date in multiples of `date_group_size` when the batches are date-grouped).
    The baselines call this too, so they fit the same rows, targets and weights."""
    frame = read_corpus_split(corpus_path, "train", columns)
    if reweight is not None:
        from modeling.buckets import bucket_weights

        frame = frame.assign(weight=bucket_weights(frame["label"].to_numpy(), reweight))
    frame = frame.assign(
        raw_label=frame["label"],
        label=training_targets(frame, cfg.target_transform, cfg.target_clip),
        weight=tempered_weights(frame["weight"].to_numpy(), cfg.weight_power),
    )
    if cfg.date_group_size:
        return sample_rows_by_date(frame, cfg.max_train_samples, cfg.date_group_size, cfg.seed)
    return sample_rows(frame, cfg.max_train_samples, cfg.seed)


def aux_feature_targets(frame: pd.DataFrame, training_set_path: str | os.PathLike[str]) -> np.ndarray:
    """[N, 16] float32: the feature values of `frame`'s (date, symbol) rows, z-scored with these rows'
    own mean and std (train rows only) and clipped at +-5: the auxiliary probe's targets."""
    from modeling.feature_registry import FEATURE_NAMES

    features = pd.read_parquet(training_set_path, columns=["date", "symbol", *FEATURE_NAMES])
    keys = frame[["date", "symbol"]].merge(
        features.drop_duplicates(["date", "symbol"]), on=["date", "symbol"], how="left"
    )
    values = keys[list(FEATURE_NAMES)].to_numpy(np.float64)
    if np.isnan(values).any():
        raise ValueError(
            f"{int(np.isnan(values).any(axis=1).sum())} train rows have no training-set features"
        )
    std = values.std(axis=0)
    z = (values - values.mean(axis=0)) / np.where(std > 0, std, 1.0)
    return np.clip(z, -5.0, 5.0).astype(np.float32)


def sample_rows_by_date(frame: pd.DataFrame, max_rows: int | None, group: int, seed: int) -> pd.DataFrame:
    """A seeded sample of about `max_rows` rows drawn per date in multiples of `group` (so that date
    groups of `group` rows lose no row): each date keeps `group` x (its share rounded at random, so the
    expected total is `max_rows`). With max_rows None: every date's rows cut down to a multiple of
    `group`. Rows keep the frame's order."""
    rng = np.random.default_rng(seed)
    codes, _ = pd.factorize(frame["date"], sort=True)
    counts = np.bincount(codes)
    share = 1.0 if max_rows is None else min(1.0, max_rows / max(len(frame), 1))
    groups = counts * share / group
    keep_groups = np.floor(groups + rng.random(len(groups))).astype(int)
    keep_groups = np.minimum(keep_groups, counts // group)
    keep = np.zeros(len(frame), dtype=bool)
    for code in np.flatnonzero(keep_groups):
        rows = np.flatnonzero(codes == code)
        keep[rng.choice(rows, size=keep_groups[code] * group, replace=False)] = True
    return frame[keep].reset_index(drop=True)


def evenly_spaced_dates(dates: pd.Series | np.ndarray, max_dates: int | None) -> np.ndarray:
    """`max_dates` dates spread evenly over the sorted unique `dates` (all when None or fewer): a fixed,
    deterministic evaluation set that covers the whole period rather than its first weeks."""
    unique = np.sort(pd.unique(pd.Series(dates)))
    if max_dates is None or max_dates >= len(unique):
        return unique
    return unique[np.unique(np.round(np.linspace(0, len(unique) - 1, max_dates)).astype(int))]


@dataclass
class TokenisedRows:
    """One split's rows, tokenised: what the training loop and the evaluation read."""

    ids: list[list[int]]
    label: np.ndarray
    weight: np.ndarray
    frame: pd.DataFrame
    """date, symbol (and whatever else came in), aligned with `ids`."""
    aux: np.ndarray | None = None
    """[N, F] auxiliary targets (the standardised feature values), when the auxiliary loss is on."""

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_tokens(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.ids), dtype=np.int64, count=len(self.ids))


def tokenise_rows(frame: pd.DataFrame, tokenizer: Any) -> TokenisedRows:
    ids = encode_prompts(tokenizer, frame["prompt"].tolist())
    return TokenisedRows(
        ids=ids,
        label=frame["label"].to_numpy(np.float32),
        weight=frame["weight"].to_numpy(np.float32) if "weight" in frame else np.ones(len(frame), np.float32),
        frame=frame.drop(columns=["prompt"]).reset_index(drop=True),
    )


class RowsDataset(Dataset):
    def __init__(self, rows: TokenisedRows) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "input_ids": self.rows.ids[i],
            "label": self.rows.label[i],
            "weight": self.rows.weight[i],
            "index": i,
            **({"aux": self.rows.aux[i]} if self.rows.aux is not None else {}),
        }


def make_collate(tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """Dynamic padding (longest row of the batch, rounded up to a multiple of 8) plus labels, weights and
    row indices."""

    def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = tokenizer.pad(
            {"input_ids": [it["input_ids"] for it in items]}, pad_to_multiple_of=8, return_tensors="pt"
        )
        return {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "label": torch.tensor([it["label"] for it in items], dtype=torch.float32),
            "weight": torch.tensor([it["weight"] for it in items], dtype=torch.float32),
            "index": torch.tensor([it["index"] for it in items], dtype=torch.int64),
            **({"aux": torch.tensor(np.stack([it["aux"] for it in items]))} if "aux" in items[0] else {}),
        }

    return collate


def epoch_batches(
    lengths: np.ndarray,
    micro_batch: int,
    seed: int,
    epoch: int,
    group_by_length: bool,
    multiple_of: int = 1,
    dates: np.ndarray | None = None,
    date_group_size: int = 0,
) -> list[list[int]]:
    """The micro-batches (global, before splitting across processes) of one epoch, deterministic in
    (seed, epoch). The last incomplete batch is dropped, and the count is cut to a multiple of the
    accumulation steps, so every optimizer step sees the same number of rows.

    With `date_group_size` k (and `dates`, one code per row): each date's rows are shuffled and cut into
    groups of k (a remainder under k sits the epoch out), the groups are shuffled, and every batch is
    micro_batch / k whole groups, contiguous, so a process's share of a batch is whole groups too."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if date_group_size:
        if dates is None:
            raise ValueError("date-grouped batches need the date of every row")
        rng = np.random.default_rng(seed * 100_003 + epoch)
        groups = []
        for rows in pd.Series(np.arange(len(dates))).groupby(np.asarray(dates)).indices.values():
            rows = rng.permutation(rows)
            last = len(rows) - date_group_size + 1
            groups += [rows[i : i + date_group_size] for i in range(0, last, date_group_size)]
        order = [int(i) for g in rng.permutation(len(groups)) for i in groups[g]] if groups else []
    elif group_by_length:
        order = list(LengthGroupedSampler(micro_batch, lengths=lengths.tolist(), generator=generator))
    else:
        order = torch.randperm(len(lengths), generator=generator).tolist()
    n = (len(order) // micro_batch) // multiple_of * multiple_of
    return [order[i * micro_batch : (i + 1) * micro_batch] for i in range(n)]


class FixedBatches(torch.utils.data.Sampler[list[int]]):
    def __init__(self, batches: list[list[int]], batch_size: int) -> None:
        self.batches = batches
        self.batch_size = batch_size  # accelerate's split_batches reads it
        self.drop_last = True

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
