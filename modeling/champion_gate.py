"""The champion gate: the registry alias `champion` moves to a new version only when a paired test on the
same validation rows says it is better by more than the noise (`champion_gate`): the daily RankIC
difference, new minus champion, has a mean above max(`min_delta`, `k` x its standard error).

With `mlflow_registry.py` (the store, runs, versions and aliases it reads) and `pyfunc_model.py` the only
modules of `modeling` that import MLflow; the model code MLflow ships (`modeling.pyfunc_model`) never
imports it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from modeling.errors import ModelUnloadableError
from modeling.metrics import DailyMean, PairedDifference, min_dates_for_lag, nw_lag, paired_series_difference
from modeling.mlflow_registry import (
    CHAMPION,
    RegistryError,
    alias_version,
    daily_from_tag,
    tag_verdict,
    version_tags,
)

COMPARABILITY_TAGS = ("horizon", "label_kind")
"""Version tags that must agree for two validation RankICs to be comparable (same target)."""


def gate_decision(
    new_daily: pd.Series, champion_daily: pd.Series, k: float = 1.0, min_delta: float = 0.0, horizon: int = 1
) -> tuple[bool, PairedDifference, float]:
    """The paired test of the gate: (promote?, the paired difference new - champion, the bar).

    Both series are of the same validation rows, so a date only one of them has is a date the other
    model's forecast gave no ranking on (constant, or missing on that date's rows): it counts as 0 for
    that model (no view, as the zero forecast scores), not as a date the comparison leaves out, or a
    challenger with a view on half the dates would be judged on that half alone.

    Promote only when the mean daily RankIC difference on those dates exceeds max(min_delta, k x SE)
    (SE Newey-West with lag horizon - 1). Without a standard error to trust (fewer dates than
    `min_dates_for_lag`: 2 at horizon 1, 5 x the lag above) nothing is promoted."""
    both = pd.concat({"new": new_daily, "champion": champion_daily}, axis=1).dropna(how="all").fillna(0.0)
    paired = paired_series_difference(both["new"], both["champion"], horizon)
    trusted = np.isfinite(paired.se) and paired.n_dates >= min_dates_for_lag(nw_lag(horizon))
    bar = max(min_delta, k * paired.se) if trusted else float("nan")
    return bool(np.isfinite(bar) and paired.delta > bar), paired, bar


GATE_ATTEMPTS = 5
"""A gate judges again when the champion moved while it was judging, at most this many times."""
GATE_LOCK_TIMEOUT_S = 900.0
"""How long a gate waits for another gate of the same registry to finish moving the alias."""


class ChampionRescoreError(RuntimeError):
    """The champion could not be re-scored for a reason other than "it can no longer be loaded" (out of
    memory, a locked store, a filesystem fault): the gate fails and nothing is promoted."""


_NETWORK_PACKAGES = ("requests", "urllib3", "http", "socket", "ssl")
"""Where the OSErrors of a connection come from (a remote tracking store's), which are never a verdict."""


def _artifact_fault(error: BaseException) -> bool:
    """A saved file that is missing or unreadable as what it should be: a library's "can't find / can't
    load" (an OSError without an errno: transformers' tokenizer and config loaders), a truncated or
    corrupt JSON or safetensors file, or an adapter path that peft then takes for a hub repository id.
    An OSError with an errno (EIO, ENOSPC, a lock) is the filesystem's fault of the moment instead, and
    so is a network error (a tracking server that is down: requests' errors are OSErrors without one)."""
    from safetensors import SafetensorError

    try:
        from huggingface_hub.errors import HFValidationError
    except ImportError:  # older huggingface_hub
        from huggingface_hub.utils import HFValidationError
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError):
        package = type(error).__module__.split(".")[0]
        network = isinstance(error, (ConnectionError, TimeoutError)) or package in _NETWORK_PACKAGES
        return error.errno is None and not network
    return isinstance(error, (json.JSONDecodeError, SafetensorError, HFValidationError)) or (
        isinstance(error, ValueError) and "adapter_config.json" in str(error)
    )


def champion_unloadable(error: BaseException) -> bool:
    """True when `error` (or an error it was raised from) says the model can no longer be loaded: its
    files are gone or corrupt (`_artifact_fault`), its base model's fingerprint or prompt template changed
    (`ModelUnloadableError`), its code no longer imports under this installation, or the store no longer
    knows it. Any other error is a fault of the moment, not a verdict on the model."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        # ImportError: the model's code no longer imports (a module it names was renamed or removed)
        if isinstance(error, (ModelUnloadableError, FileNotFoundError, ImportError)) or _artifact_fault(
            error
        ):
            return True
        if (
            isinstance(error, mlflow.exceptions.MlflowException)
            and error.error_code == "RESOURCE_DOES_NOT_EXIST"
        ):
            return True
        error = error.__cause__ or error.__context__
    return False


def gate_lock_path(tracking_uri: str | None = None) -> Path:
    """The lock file that serialises the gates of one registry: beside a SQLite store's file, inside a
    file store; for a server store, a file in the temp directory keyed on its URI (this machine only:
    gates on several machines against one server rely on the compare-and-swap alone)."""
    uri = tracking_uri or mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///").split("?")[0]).with_suffix(".gate.lock")
    if uri.startswith("file:") or "://" not in uri:
        root = Path(uri.removeprefix("file://").removeprefix("file:"))
        return root / ".gate.lock"
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"mlflow-gate-{digest}.lock"


@contextmanager
def gate_lock(timeout_s: float | None = None) -> Iterator[None]:
    """Hold the registry's gate lock (an exclusive `flock`, released when the process dies)."""
    path = gate_lock_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + (GATE_LOCK_TIMEOUT_S if timeout_s is None else timeout_s)
    with path.open("a+") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RegistryError(f"another champion gate has held {path} for too long") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def champion_gate(
    name: str,
    version: str,
    daily: pd.Series,
    validation_key: str,
    rescore_champion: Callable[[str], pd.Series],
    new_tags: dict[str, Any] | None = None,
    validation_start: str | None = None,
    k: float = 1.0,
    min_delta: float = 0.0,
    horizon: int = 1,
    probe_champion: Callable[[str], object] | None = None,
) -> dict[str, Any]:
    """Move `champion` to `version` when there is none, or when the paired test on the same validation
    rows says it is better (`gate_decision`): `daily` is the new version's daily validation RankIC, the
    champion's is its stored series when it was scored on the same rows (tag `validation_rows_sha`),
    else `rescore_champion(model_uri)` on these rows. A model without a finite score never moves it.
    `probe_champion(model_uri)` (a load) checks that a champion judged on its stored series still loads.

    A champion that cannot be compared fairly, because it predicts another target (horizon, label kind)
    or was trained on dates at or after the new validation start (its score there would be in-sample),
    or because it can no longer be loaded (`champion_unloadable`), is replaced by a model with a finite
    score, and the reason says why. Any other error while re-scoring it raises `ChampionRescoreError`.

    Compare-and-swap: the alias moves only under the registry's gate lock, and only if it still points
    at the version that was judged against; when another gate moved it meanwhile, this one judges again
    against the new champion. The returned dict carries the decision's numbers: delta, se, t, n_dates, bar.
    """
    score = DailyMean.of(daily, horizon - 1)
    rescored: dict[str, pd.Series] = {}  # a champion re-scored once is not re-scored when judging again
    for _ in range(GATE_ATTEMPTS):
        current = alias_version(name, CHAMPION)
        decision = _judge(
            name, version, current, daily, score, validation_key, rescore_champion, rescored,
            new_tags, validation_start, k, min_delta, horizon, probe_champion,
        )  # fmt: skip
        if not decision.pop("move"):
            return decision
        with gate_lock():
            if alias_version(name, CHAMPION) == current:
                # the verdict before the alias: a crash between the two leaves the version saying why it is
                # champion, and the retry (which finds it champion already) reports that verdict
                tag_verdict(name, version, decision)
                MlflowClient().set_registered_model_alias(name, CHAMPION, version)
                return decision
    raise RegistryError(f"the champion of {name!r} moved {GATE_ATTEMPTS} times while v{version} was judged")


def _judge(
    name: str,
    version: str,
    current: str | None,
    daily: pd.Series,
    score: DailyMean,
    validation_key: str,
    rescore_champion: Callable[[str], pd.Series],
    rescored: dict[str, pd.Series],
    new_tags: dict[str, Any] | None,
    validation_start: str | None,
    k: float,
    min_delta: float,
    horizon: int,
    probe_champion: Callable[[str], object] | None,
) -> dict[str, Any]:
    """The gate's decision against champion `current` (`move`: whether the alias should move)."""
    base = {"champion_before": current, "delta": None, "se": None, "t": None, "n_dates": score.n_dates}
    if current == version:  # a retry after the alias moved (or an alias set by hand): it is the champion
        earlier = version_tags(name, version).get("gate_reason")
        how = (
            f"promoted by an earlier attempt: {earlier}" if earlier else "the alias was set outside the gate"
        )
        return {
            **base,
            "move": False,
            "promoted": True,
            "champion_score": score.mean,
            "reason": f"already champion ({how})",
        }
    if not np.isfinite(score.mean):
        reason = f"validation RankIC is {score.mean}: a model without a score is never promoted"
        return {**base, "move": False, "promoted": False, "champion_score": None, "reason": reason}
    if current is None:
        return {**base, "move": True, "promoted": True, "champion_score": None, "reason": "no champion yet"}
    champion_daily, how = _champion_daily(
        name, current, validation_key, rescore_champion, rescored, new_tags, validation_start, probe_champion
    )
    if champion_daily is None or not np.isfinite(DailyMean.of(champion_daily).mean):
        how = how or f"champion v{current} has no score"
        reason = f"{how}: replaced by v{version} (validation RankIC {score})"
        return {**base, "move": True, "promoted": True, "champion_score": None, "reason": reason}
    promoted, paired, bar = gate_decision(daily, champion_daily, k, min_delta, horizon)
    verdict = "beats" if promoted else "does not beat"
    reason = (
        f"v{version} {verdict} champion v{current}: paired daily RankIC {paired} ({how}); "
        f"bar max(min_delta {min_delta:g}, {k:g} x SE) = {bar:.5f}"
    )
    if not np.isfinite(bar):
        lag = nw_lag(horizon)
        reason += (
            f" (no decision: a Newey-West SE with lag {lag} needs {min_dates_for_lag(lag)} common dates)"
        )
    return {
        **base,
        "move": promoted,
        "promoted": promoted,
        "champion_score": paired.b.mean,
        "delta": paired.delta,
        "se": paired.se,
        "t": paired.t,
        "n_dates": paired.n_dates,
        "bar": bar,
        "reason": reason,
    }


def _champion_daily(
    name: str,
    current: str,
    validation_key: str,
    rescore_champion: Callable[[str], pd.Series],
    rescored: dict[str, pd.Series],
    new_tags: dict[str, Any] | None,
    validation_start: str | None,
    probe_champion: Callable[[str], object] | None,
) -> tuple[pd.Series | None, str]:
    """(the daily validation RankIC of champion `current` to pair against, how it was obtained): its
    stored series when it was scored on the same rows, else re-scored on these rows (once: `rescored`).
    None, with the reason, when it cannot be compared fairly (another target, trained into the validation
    period) or can no longer be loaded; any other error re-scoring it raises `ChampionRescoreError`."""
    tags = version_tags(name, current)
    new_tags = {key: str(value) for key, value in (new_tags or {}).items()}
    mismatch = [t for t in COMPARABILITY_TAGS if t in new_tags and t in tags and tags[t] != new_tags[t]]
    in_sample = validation_start is not None and "train_end" in tags and tags["train_end"] >= validation_start
    if mismatch:
        return None, f"champion v{current} predicts another {', '.join(mismatch)}"
    if in_sample:
        return None, f"champion v{current} trained up to {tags['train_end']}, inside the validation period"
    # the version itself, not the alias: the alias may move while the champion is re-scored
    uri = f"models:/{name}/{current}"
    if tags.get("validation_rows_sha") == validation_key and "val_daily_rank_ic" in tags:
        # the stored series spares the scoring, not the load: a champion that no longer loads (its files
        # gone or corrupt, its features or template defined otherwise) serves nothing, however it scored
        if probe_champion is not None and (gone := _unloadable(current, lambda: probe_champion(uri))):
            return None, gone
        return daily_from_tag(tags["val_daily_rank_ic"]), "stored daily RankIC on the same rows"
    if current in rescored:
        return rescored[current], "re-scored on these rows"

    def rescore() -> None:
        rescored[current] = rescore_champion(uri)

    if gone := _unloadable(current, rescore):
        return None, gone
    return rescored[current], "re-scored on these rows"


def _unloadable(current: str, load: Callable[[], object]) -> str | None:
    """Run `load` (a load or a re-scoring of champion `current`): None when it succeeds, the reason when
    the champion can no longer be loaded (`champion_unloadable`); any other error raises
    `ChampionRescoreError`."""
    try:
        load()
    except Exception as error:
        if not champion_unloadable(error):
            raise ChampionRescoreError(
                f"champion v{current} could not be re-scored ({type(error).__name__}: {error}); "
                "nothing is promoted (only a champion that can no longer be loaded is replaced)"
            ) from error
        return f"champion v{current} can no longer be loaded ({type(error).__name__}: {str(error)[:200]})"
    return None
