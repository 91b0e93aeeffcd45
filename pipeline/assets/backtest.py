import os
import shutil
import signal
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from dagster import (
    AssetExecutionContext,
    Config,
    MaterializeResult,
    MetadataValue,
    PipesSubprocessClient,
    asset,
)
from pydantic import Field

from modeling.backbones.common import file_sha256, model_fingerprint
from modeling.backbones.embedded import build_key, pretrain_dates, read_embedded_info
from modeling.backtest import PortfolioSpec, WindowSpec, analyse, plan_windows, window_corpus
from modeling.data.backtest_store import (
    BACKTEST_TABLE,
    completed_windows,
    next_day_returns,
    read_forecasts,
    store_window,
)
from modeling.data.features import FEATURES_TABLE
from modeling.data.parquet_io import read_parquet_metadata, snapshot_files, write_parquet_atomic
from modeling.metrics import DailyMean, per_date_correlation
from modeling.profiles import PROFILES, apply_overrides
from modeling.prompt import PromptBuilder
from modeling.report_plots import backtest_png
from modeling.train import TrainJob
from modeling.walk_forward import FEATURE_BASELINES, LLM_MODEL
from pipeline.metadata import frame_markdown, png_markdown
from pipeline.resources import TRAINING_POOL, MlflowResource, StorageResource, WarehouseResource
from pipeline.training_process import run_training_process, training_processes

BACKTEST_CODE_VERSION = "backtest-v1"
FAULT_ENV = "BACKTEST_KILL_AFTER_WINDOW"
"""Fault injection for the resume test: SIGKILL this process right after storing that window."""


class BacktestConfig(Config):
    """The walk-forward plan, the portfolio rules and the training settings (the profile's by default)."""

    profile: str = Field(default="cpu", description="Training profile of the LLM, as for `regressor`.")
    step: int = Field(
        default=60, ge=1, description="Dates per window (cpu: the 240 test dates in 4 windows, ~30 min)."
    )
    mode: str = Field(default="expanding", description="expanding (from the first date) or sliding.")
    train_dates: int | None = Field(default=None, ge=2, description="Sliding window's train length in dates.")
    val_dates: int = Field(default=20, ge=2, description="Early-stopping dates before each (purged) window.")
    period_start: str | None = Field(
        default=None, description="First date backtested (None: the test split's)."
    )
    period_end: str | None = Field(default=None, description="Last date backtested (None: the test split's).")
    topk: int = Field(default=50, ge=1, description="TopkDropout: names held.")
    n_drop: int = Field(default=5, ge=0, description="TopkDropout: names replaced per date at most.")
    open_cost_bp: float = Field(default=5.0, ge=0, description="Cost of buying, basis points of the weight.")
    close_cost_bp: float = Field(
        default=15.0, ge=0, description="Cost of selling, basis points of the weight."
    )
    max_train_samples: int | None = Field(default=None, ge=1, description="Train rows sampled per window.")
    time_budget_s: float | None = Field(default=None, gt=0, description="Training wall-clock cap per window.")
    batch_size: int | None = Field(default=None, ge=1, description="Global batch per optimizer step.")
    eval_every_steps: int | None = Field(
        default=None,
        ge=0,
        description="Validation RankIC every N steps (None: the profile's when it stops early or keeps the "
        "best checkpoint, else only at the end).",
    )
    eval_max_dates: int | None = Field(default=None, ge=1, description="Validation dates during training.")
    seed: int | None = Field(default=None, ge=0, description="Seed of sample, batches, initialisation.")
    num_processes: int | None = Field(
        default=None,
        ge=1,
        description="Training processes per window (None = the profile's; gpu: one per GPU).",
    )
    accelerate_config_file: str | None = Field(
        default=None, description="An accelerate config file (e.g. configs/accelerate/multi_gpu.yaml)."
    )

    def processes(self, profile, train=None) -> int:
        """Training processes of each window (`train`: the windows' train config), chosen as `regressor`
        chooses them."""
        return training_processes(self.num_processes, profile, train)

    def window_spec(self) -> WindowSpec:
        return WindowSpec(
            step=self.step, mode=self.mode, train_dates=self.train_dates, val_dates=self.val_dates
        )

    def portfolio_spec(self) -> PortfolioSpec:
        """Qlib's TopkDropout and cost settings (costs in bp here, as fractions of the weight there)."""
        return PortfolioSpec(
            topk=self.topk,
            n_drop=self.n_drop,
            open_cost=self.open_cost_bp / 1e4,
            close_cost=self.close_cost_bp / 1e4,
        )

    def overrides(self) -> dict:
        names = (
            "max_train_samples",
            "time_budget_s",
            "batch_size",
            "eval_every_steps",
            "eval_max_dates",
            "seed",
        )
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


def _period(calendar: pd.DatetimeIndex, splits: dict, config: BacktestConfig) -> pd.DatetimeIndex:
    """The dates backtested; refused when they start before the validation split: the label scale and the
    bucket model every window reads are fit on the whole train split (and its labels reach into the purge
    after it), so a window there would be judged with statistics of the dates it predicts. Refused too
    when a date has no labelled rows (purged, or live): no model would forecast it."""
    lo = pd.Timestamp(config.period_start or splits["test"][0])
    first_out_of_train = pd.Timestamp(splits["validation"][0])
    if lo < first_out_of_train:
        raise ValueError(
            f"the backtest period starts {lo.date()}, before the validation split "
            f"({first_out_of_train.date()}): the label scale and the bucket model are fit on the train "
            "split's labels up to then, so its windows would not be out of sample. Use period_start >= "
            f"{first_out_of_train.date()}"
        )
    hi = pd.Timestamp(config.period_end or splits["test"][1])
    period = calendar[(calendar >= lo) & (calendar <= hi)]
    # every date must have labelled rows to forecast: the purged dates between validation and test have
    # none (and live dates no label yet); a window would skip them and its book would lose their returns
    labelled = np.zeros(len(period), dtype=bool)
    for split in ("validation", "test"):
        first, last = (pd.Timestamp(d) for d in splits[split])
        labelled |= (period >= first) & (period <= last)
    if not labelled.all():
        gaps = [str(d.date()) for d in period[~labelled]]
        raise ValueError(
            f"the backtest period {lo.date()} .. {hi.date()} holds {len(gaps)} date(s) without labelled rows "
            f"in the training set ({', '.join(gaps[:5])}{' ...' if len(gaps) > 5 else ''}): the dates purged "
            f"between the validation and test splits, or live dates. Backtest within the validation split "
            f"({splits['validation'][0]} .. {splits['validation'][1]}) or the test split "
            f"({splits['test'][0]} .. {splits['test'][1]})"
        )
    return period


def _refuse_leaky_backbone(source_kind: str, base_dir: Path, start: pd.Timestamp) -> str:
    """The embedded backbone was pretrained on prompts up to some date: it must end before the period."""
    if source_kind != "embedded":
        return (
            f"{source_kind} backbone, pretrained by its publisher (no pretraining on this market's prompts)"
        )
    first, last = pretrain_dates(read_embedded_info(base_dir))
    if last is not None and pd.Timestamp(last) >= start:
        raise ValueError(
            f"the embedded backbone was pretrained on prompts up to {last}, inside the backtest period "
            f"from {start.date()}: its windows would not be out of sample. Backtest a later period or "
            "rebuild base_model with an earlier train split"
        )
    return f"embedded backbone pretrained on train-split prompts {first} .. {last}, before the period"


def _train_window(
    context, client: PipesSubprocessClient, job: TrainJob, processes: int, accelerate_config: str | None
) -> dict:
    """Run one window's training process through Pipes, as `regressor` does (train -> forecast ->
    baselines); the report it sends back."""
    invocation, _ = run_training_process(
        context, client, job, processes, accelerate_config, what="window training"
    )
    metadata = invocation.get_materialize_result().metadata or {}
    return {key: value.value for key, value in metadata.items()}


def _window_run(
    k: int, report: dict, forecasts: pd.DataFrame, labels: pd.DataFrame, models: list[str], horizon: int
) -> dict:
    """A window's nested MLflow run: its dates as params; timings and each model's RankIC, with its
    standard error (Newey-West, lag h - 1) and number of dates, as metrics."""
    rows = forecasts[forecasts["window"] == k].merge(labels, on=["date", "symbol"])
    metrics = {m: v for m, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for model in models:
        stats = DailyMean.of(per_date_correlation(rows, model, "label", "spearman"), horizon - 1)
        metrics.update({f"{model}/RankIC": stats.mean, f"{model}/RankIC_se": stats.se})
        metrics[f"{model}/n_dates"] = stats.n_dates
    params = {part: report[part] for part in ("train", "validation", "predict")}
    return {"window": k, "params": params, "metrics": metrics}


def _run_windows(
    context,
    client: PipesSubprocessClient,
    warehouse,
    run: "_BacktestRun",
    todo: list,
    template: TrainJob,
    done: dict[int, dict],
    launch: tuple[int, str | None],
) -> None:
    """Train and forecast each window in its own process, storing each whole as soon as it is done."""
    corpus = pd.read_parquet(run.corpus_path)
    training_set = pd.read_parquet(
        template.training_set_path, columns=["date", "symbol", "split", "bucket", "weight"]
    )
    for window in todo:
        started = time.perf_counter()
        out = run.run_dir / f"window_{window.index:03d}"
        out.mkdir(exist_ok=True)
        rows = window_corpus(corpus, training_set, window)
        write_parquet_atomic(rows, out / "corpus.parquet", run.corpus_facts)
        job = replace(
            template,
            corpus_path=str(out / "corpus.parquet"),
            output_dir=str(out),
            backtest_output=str(out / "forecasts.parquet"),
        )
        report = _train_window(context, client, job, *launch)
        forecasts = pd.read_parquet(out / "forecasts.parquet")
        report = {**report, **window.to_dict(), "wall_s": round(time.perf_counter() - started, 1)}
        with warehouse.get_connection() as con:
            store_window(con, run.run_id, window.index, window.predict, forecasts, report)
        done[window.index] = report
        context.log.info(f"window {window.index}: {report['wall_s']} s (scoring {report.get('score_s')} s)")
        if os.environ.get(FAULT_ENV) == str(window.index):
            os.kill(os.getpid(), signal.SIGKILL)


def _windows_table(done: dict[int, dict]) -> pd.DataFrame:
    """One row per stored window: its dates and where its time went."""
    return pd.DataFrame(
        [
            {
                "window": k,
                "predict": f"{r['predict'][0]} .. {r['predict'][1]}",
                "train": f"{r['train'][0]} .. {r['train'][1]}",
                "wall_s": r.get("wall_s"),
                "train_s": r.get("train_loop_s"),
                "score_s": r.get("score_s"),
                "score_rows_per_s": r.get("score_rows_per_s"),
                "baselines_s": r.get("baselines_s"),
            }
            for k, r in sorted(done.items())
        ]
    )


def _profile_configs(config: BacktestConfig):
    """The profile and its regressor and training configs with the asset config's overrides."""
    profile = PROFILES.get(config.profile)
    if profile is None:
        raise ValueError(f"unknown profile {config.profile!r}; choose one of {sorted(PROFILES)}")
    regressor_cfg, train_cfg = apply_overrides(profile.regressor, profile.train, config.overrides())
    if config.eval_every_steps is None and not _evaluations_decide(train_cfg):
        # a window's periodic evaluations would only monitor (and cost 120 of its 317 s of training in
        # the cpu profile, BENCHMARKS.md): evaluate once, at the end; the weights are the same
        train_cfg = replace(train_cfg, eval_every_steps=0)
    return profile, regressor_cfg, train_cfg


def _evaluations_decide(train_cfg) -> bool:
    """Whether a run's periodic evaluations change what it saves: they stop it early or pick its best
    checkpoint."""
    return train_cfg.early_stopping_patience is not None or train_cfg.select_best


@dataclass(frozen=True)
class _BacktestRun:
    """One backtest's identity and inputs: the run id (a hash of the inputs and the config), its
    directory with the input snapshot, the window plan over the period, the corpus's prompt settings."""

    run_id: str
    run_dir: Path
    plan: list
    period: pd.DatetimeIndex
    prompt: dict
    corpus_facts: dict
    backbone_note: str

    @property
    def horizon(self) -> int:
        return int(self.prompt["horizon"])

    @property
    def corpus_path(self) -> Path:
        return self.run_dir / "inputs" / "prompt_corpus.parquet"

    @property
    def training_set_path(self) -> Path:
        return self.run_dir / "inputs" / "training_set.parquet"


def _feature_calendar(warehouse) -> pd.DatetimeIndex:
    with warehouse.get_connection() as con:
        rows = con.execute(f"SELECT DISTINCT date FROM {FEATURES_TABLE} ORDER BY date").fetchall()
    return pd.DatetimeIndex([d for (d,) in rows])


def _plan_run(context, storage, warehouse, config, windows_spec, regressor_cfg, train_cfg) -> _BacktestRun:
    """Snapshot the corpus and training set, plan the windows over the period, refuse a leaky backbone,
    and key the run by its inputs and config (the snapshot moves into the run's directory once)."""
    base_dir = storage.base_model_dir
    runs_root = storage.root / "runs" / "backtest"
    staging = runs_root / f".staging-{context.run_id}-{uuid.uuid4().hex[:8]}"
    staged = snapshot_files(
        {name: storage.parquet_path(name) for name in ("prompt_corpus", "training_set")}, staging
    )
    facts = read_parquet_metadata(staged["training_set"])
    corpus_facts = read_parquet_metadata(staged["prompt_corpus"])
    prompt = PromptBuilder.of_corpus(corpus_facts).settings()
    calendar = _feature_calendar(warehouse)
    period = _period(calendar, facts["splits"], config)
    if period.empty:
        raise ValueError("the backtest period holds no dates with features")
    plan = plan_windows(calendar, period, int(prompt["horizon"]), windows_spec)
    backbone_note = _refuse_leaky_backbone(storage.base_model_source.kind, base_dir, period[0])
    run_id = build_key(
        {
            "code_version": BACKTEST_CODE_VERSION,
            "corpus": file_sha256(staged["prompt_corpus"]),
            "training_set": file_sha256(staged["training_set"]),
            "base_model": model_fingerprint(base_dir),
            "regressor": regressor_cfg.to_dict(),
            "train": asdict(train_cfg),
            "windows": [w.to_dict() for w in plan],
        }
    )
    run_dir = runs_root / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "inputs").exists():
        staging.rename(run_dir / "inputs")
    shutil.rmtree(staging, ignore_errors=True)
    return _BacktestRun(run_id, run_dir, plan, period, prompt, corpus_facts, backbone_note)


def _log_to_mlflow(mlflow, run: _BacktestRun, params, analysis, windows, png, portfolio) -> tuple[str, bool]:
    """One MLflow run for the analysis (nested runs per window); reused when it was logged before."""
    from modeling import mlflow_registry

    experiment_id = mlflow_registry.configure(
        mlflow.tracking_uri, mlflow.experiment_name, mlflow.artifact_root
    )
    analysis_id = build_key({"run_id": run.run_id, "portfolio": vars(portfolio)})
    return mlflow_registry.log_backtest_run(
        experiment_id,
        f"backtest-{run.run_id}",
        analysis_id,
        params=params,
        metrics=analysis.metrics(),
        windows=windows,
        artifacts=[png],
    )


def _metadata(run: _BacktestRun, forecasts, analysis, done: dict, trained: list[int], png: Path) -> dict:
    """The materialisation's metadata: the stored forecasts, the comparison and by-month tables, the
    windows (trained now or reused), the LLM's paired differences, the backbone note and the plots."""
    models = 1 + len(FEATURE_BASELINES)
    return {
        "dagster/row_count": MetadataValue.int(len(forecasts) * models),
        "date_range": MetadataValue.text(f"{run.period[0].date()} .. {run.period[-1].date()}"),
        "symbol_count": MetadataValue.int(int(forecasts["symbol"].nunique())),
        "preview": MetadataValue.md(frame_markdown(forecasts.head(8))),
        "run_id": MetadataValue.text(run.run_id),
        "table": MetadataValue.text(BACKTEST_TABLE),
        "comparison": MetadataValue.md(frame_markdown(analysis.table(), 4)),
        "rank_ic_by_month": MetadataValue.md(
            frame_markdown(analysis.by_month_cells.reset_index(names="month"))
        ),
        "windows": MetadataValue.md(frame_markdown(_windows_table(done), 4)),
        "windows_trained": MetadataValue.json(trained),
        "windows_reused": MetadataValue.json(sorted(set(done) - set(trained))),
        "llm_vs_baselines": MetadataValue.json(analysis.paired[LLM_MODEL]),
        "backbone": MetadataValue.text(run.backbone_note),
        "plots": png_markdown(png, "walk-forward backtest"),
    }


@asset(
    pool=TRAINING_POOL,
    group_name="evaluation",
    kinds={"pytorch", "duckdb", "mlflow"},
    deps=["prompt_corpus", "training_set", "base_model", "features"],
    code_version=BACKTEST_CODE_VERSION,
)
def backtest(
    context: AssetExecutionContext,
    config: BacktestConfig,
    storage: StorageResource,
    warehouse: WarehouseResource,
    mlflow: MlflowResource,
    pipes_subprocess_client: PipesSubprocessClient,
) -> MaterializeResult:
    """A walk-forward backtest (on demand): the period (the test split by default) cut into windows of
    `step` dates; per window the LLM regressor (same profile and backbone as `regressor`) and ridge,
    LightGBM and the MLP on the 16 features, fit on exactly the same rows before the window (purged by the
    horizon, the last `val_dates` for early stopping), forecast the window out of sample. The forecasts
    are `backtest_predictions` (run_id, model, window, date, symbol, prediction); the signal (IC, RankIC,
    ICIR, paired ΔRankIC) and TopkDropout / decile long-short portfolios with costs (Qlib's names) go to
    one MLflow run with a nested run per window. A killed backtest resumes at the first unstored window;
    the same inputs and config recompute nothing."""
    profile, regressor_cfg, train_cfg = _profile_configs(config)
    windows_spec, portfolio = config.window_spec(), config.portfolio_spec()
    run = _plan_run(context, storage, warehouse, config, windows_spec, regressor_cfg, train_cfg)
    with warehouse.get_connection() as con:
        done = completed_windows(con, run.run_id)
    todo = [w for w in run.plan if w.index not in done]
    context.log.info(
        f"backtest {run.run_id}: {len(run.plan)} windows, {len(done)} stored, {len(todo)} to run"
    )
    if todo:
        template = TrainJob(
            str(storage.base_model_dir),
            str(run.corpus_path),
            "",
            run.prompt,
            regressor_cfg,
            train_cfg,
            training_set_path=str(run.training_set_path),
        )
        launch = (config.processes(profile, train_cfg), config.accelerate_config_file)
        _run_windows(context, pipes_subprocess_client, warehouse, run, todo, template, done, launch)

    models = [LLM_MODEL, *FEATURE_BASELINES]
    with warehouse.get_connection() as con:
        forecasts = read_forecasts(con, run.run_id)
        returns = next_day_returns(con, run.period[0], run.period[-1])
    labels = (
        pd.read_parquet(run.training_set_path, columns=["date", "symbol", "label"])
        .dropna()
        .drop_duplicates(["date", "symbol"])
    )
    analysis = analyse(forecasts, labels, returns, models, list(FEATURE_BASELINES), portfolio, run.horizon)
    png = backtest_png(analysis.daily, analysis.by_month, storage.reports_dir / "backtest.png")
    mlflow_run_id, logged = _log_to_mlflow(
        mlflow,
        run,
        params={
            "run_id": run.run_id,
            "profile": profile.name,
            "windows": vars(windows_spec),
            "portfolio": vars(portfolio),
            "period": [str(run.period[0].date()), str(run.period[-1].date())],
            "backbone": run.backbone_note,
        },
        analysis=analysis,
        windows=[_window_run(k, r, forecasts, labels, models, run.horizon) for k, r in sorted(done.items())],
        png=png,
        portfolio=portfolio,
    )
    trained = [w.index for w in todo]
    metadata = _metadata(run, forecasts, analysis, done, trained, png)
    return MaterializeResult(
        metadata={
            **metadata,
            "mlflow_run_id": MetadataValue.text(mlflow_run_id),
            "mlflow_logged_now": MetadataValue.bool(logged),
        }
    )
