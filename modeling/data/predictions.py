"""The `predictions` table: the champion's forecasts for the live rows, ranked within each date.

Live rows are the training set's `split == "live"` rows: the universe members with features on the dates
after the last labelled date (their forward return is not known yet). Each live date is scored as a
whole and replaces that date's rows in one transaction, so re-scoring a date never duplicates it and
the forecasts of earlier dates stay in the table as the model's live track record: only the newest live
date is re-scored by a later run (`rows_to_publish`), an older one keeps what was served on it.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from modeling.data.parquet_io import read_served_rows
from modeling.data.tables import table_exists
from modeling.metrics import assign_quantiles

PREDICTIONS_TABLE = "predictions"
COLUMNS = ("date", "symbol", "prediction", "rank", "decile", "model_version")


def live_rows(training_set_path: str | Path) -> pd.DataFrame:
    """The training set's live rows: universe members with features on the dates without a label yet
    (the model's input columns, one row per (date, symbol))."""
    rows = read_served_rows(Path(training_set_path), ["split"], filters=[("split", "=", "live")])
    return rows.drop(columns=["split"])


def rank_predictions(frame: pd.DataFrame, model_version: str) -> pd.DataFrame:
    """(date, symbol, prediction) -> the table's rows: rank 1 = the highest forecast of the date, decile
    10 = the highest tenth."""
    if not np.isfinite(frame["prediction"].to_numpy(float)).all():
        raise ValueError("the model returned non-finite predictions; nothing is written")
    out = frame[["date", "symbol", "prediction"]].copy()
    out["rank"] = out.groupby("date")["prediction"].rank(method="first", ascending=False).astype("int32")
    out["decile"] = assign_quantiles(out).astype("int32")
    out["model_version"] = str(model_version)
    return out.sort_values(["date", "rank"]).reset_index(drop=True)


def rows_to_publish(con: duckdb.DuckDBPyConnection, rows: pd.DataFrame) -> pd.DataFrame:
    """The rows of `rows` to write: those of its newest date (each run re-scores the date it serves now,
    so a re-run after a promotion publishes the new champion's view of it) and of older dates the table
    does not hold, or holds for other names (revised inputs changed that date's live universe). Any other
    older date keeps the forecasts and the version served on it: with a horizon h > 1 the live rows span
    h dates, and re-scoring them with a newer champion would rewrite the track record that monitoring
    judges each version by."""
    if rows.empty or not table_exists(con, PREDICTIONS_TABLE):
        return rows
    dates = pd.to_datetime(rows["date"])
    # only the dates of `rows`: the table is the whole track record
    held = con.execute(
        f"SELECT date, symbol FROM {PREDICTIONS_TABLE} WHERE date >= ?", [dates.min().to_pydatetime()]
    ).df()
    held_names = held.groupby(pd.to_datetime(held["date"]))["symbol"].agg(frozenset).to_dict()
    names = rows.groupby(dates.to_numpy())["symbol"].agg(frozenset).to_dict()
    unchanged = {d for d, s in names.items() if held_names.get(d) == s and d != dates.max()}
    return rows[~dates.isin(unchanged).to_numpy()].reset_index(drop=True)


def write_predictions(con: duckdb.DuckDBPyConnection, rows: pd.DataFrame) -> int:
    """Replace the rows of every date in `rows` (one transaction); return the rows written."""
    con.execute(f"""
        CREATE TABLE IF NOT EXISTS {PREDICTIONS_TABLE} (
            date TIMESTAMP, symbol VARCHAR, prediction DOUBLE, rank INTEGER, decile INTEGER,
            model_version VARCHAR
        )
    """)
    con.register("_new_predictions", rows[list(COLUMNS)])
    try:
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(
                f"DELETE FROM {PREDICTIONS_TABLE} WHERE date IN (SELECT DISTINCT date FROM _new_predictions)"
            )
            con.execute(f"INSERT INTO {PREDICTIONS_TABLE} SELECT {', '.join(COLUMNS)} FROM _new_predictions")
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    finally:
        con.unregister("_new_predictions")
    return len(rows)


def coverage(con: duckdb.DuckDBPyConnection, live: pd.DataFrame) -> dict[str, int]:
    """How the table covers the live rows: missing, duplicated and non-finite predictions."""
    con.register("_live", live[["date", "symbol"]])
    try:
        missing, extra, duplicated, non_finite = con.execute(f"""
            WITH p AS (SELECT * FROM {PREDICTIONS_TABLE} WHERE date IN (SELECT DISTINCT date FROM _live)),
                 counts AS (SELECT date, symbol, count(*) n FROM p GROUP BY ALL)
            SELECT
                (SELECT count(*) FROM _live l ANTI JOIN p USING (date, symbol)),
                (SELECT count(*) FROM p ANTI JOIN _live l USING (date, symbol)),
                (SELECT count(*) FROM counts WHERE n > 1),
                (SELECT count(*) FROM p WHERE NOT isfinite(prediction) OR prediction IS NULL)
        """).fetchall()[0]
    finally:
        con.unregister("_live")
    return {
        "live_rows": len(live),
        "missing": int(missing),
        "extra": int(extra),
        "duplicated": int(duplicated),
        "non_finite": int(non_finite),
    }
