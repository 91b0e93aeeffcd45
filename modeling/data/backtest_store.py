"""Where the walk-forward backtest keeps its work: DuckDB tables `backtest_predictions` (run_id, model,
window, date, symbol, prediction) and `backtest_windows` (one row per finished window, with its dates and
timings).

A window's forecasts and its row in `backtest_windows` are written in one transaction, so a window is
either stored whole or not at all: a killed backtest resumes at the first window without a row, and a
re-run of the same `run_id` (same inputs and config) finds every window done and trains nothing.
"""

from __future__ import annotations

import json

import duckdb
import pandas as pd

BACKTEST_TABLE = "backtest_predictions"
WINDOWS_TABLE = "backtest_windows"
PREDICTION_COLUMNS = ("run_id", "model", "window", "date", "symbol", "prediction")


def ensure_tables(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(f"""
        CREATE TABLE IF NOT EXISTS {BACKTEST_TABLE} (
            run_id VARCHAR, model VARCHAR, "window" INTEGER, date TIMESTAMP, symbol VARCHAR, prediction DOUBLE
        )
    """)
    con.execute(f"""
        CREATE TABLE IF NOT EXISTS {WINDOWS_TABLE} (
            run_id VARCHAR, "window" INTEGER, predict_start TIMESTAMP, predict_end TIMESTAMP, report VARCHAR,
            stored_at TIMESTAMP
        )
    """)


def completed_windows(con: duckdb.DuckDBPyConnection, run_id: str) -> dict[int, dict]:
    """{window: its report} of the windows of `run_id` stored so far."""
    ensure_tables(con)
    rows = con.execute(f'SELECT "window", report FROM {WINDOWS_TABLE} WHERE run_id = ?', [run_id]).fetchall()
    return {int(w): json.loads(report) for w, report in rows}


def store_window(
    con: duckdb.DuckDBPyConnection,
    run_id: str,
    window: int,
    predict: tuple,
    predictions: pd.DataFrame,
    report: dict,
) -> int:
    """Store one window's forecasts (model, date, symbol, prediction) and its report in one transaction;
    a window stored before is replaced. Returns the rows written."""
    if predictions.duplicated(["model", "date", "symbol"]).any():
        raise ValueError(f"window {window}: duplicate (model, date, symbol) forecasts")
    if not pd.Series(predictions["prediction"]).map(pd.notna).all():
        raise ValueError(f"window {window}: missing forecasts")
    ensure_tables(con)
    rows = predictions.assign(run_id=run_id, window=window)[list(PREDICTION_COLUMNS)]
    con.register("_window_rows", rows)
    try:
        con.execute("BEGIN TRANSACTION")
        try:
            for table in (BACKTEST_TABLE, WINDOWS_TABLE):
                con.execute(f'DELETE FROM {table} WHERE run_id = ? AND "window" = ?', [run_id, window])
            con.execute(
                f'INSERT INTO {BACKTEST_TABLE} SELECT run_id, model, "window", date, symbol, prediction '
                "FROM _window_rows"
            )
            con.execute(
                f"INSERT INTO {WINDOWS_TABLE} VALUES (?, ?, ?, ?, ?, now())",
                [run_id, window, predict[0], predict[1], json.dumps(report, default=str)],
            )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    finally:
        con.unregister("_window_rows")
    return len(rows)


def read_forecasts(con: duckdb.DuckDBPyConnection, run_id: str) -> pd.DataFrame:
    """(date, symbol, window, one column per model) of `run_id`."""
    long = con.execute(
        f'SELECT model, "window", date, symbol, prediction FROM {BACKTEST_TABLE} WHERE run_id = ?', [run_id]
    ).df()
    wide = long.pivot_table(index=["date", "symbol", "window"], columns="model", values="prediction")
    wide.columns.name = None
    return wide.reset_index().sort_values(["date", "symbol"]).reset_index(drop=True)


def next_day_returns(
    con: duckdb.DuckDBPyConnection, start: pd.Timestamp, end: pd.Timestamp, table: str = "raw_market_data"
) -> pd.DataFrame:
    """(date, symbol, ret): close on the next market date over close on `date`, for dates in [start, end];
    NaN when the symbol has no close on the next market date (a gap or a delisting)."""
    return con.execute(
        f"""
        WITH calendar AS (SELECT DISTINCT date FROM {table}),
             following AS (SELECT date, lead(date) OVER (ORDER BY date) AS next_date FROM calendar)
        SELECT r.date, r.symbol, n.close / r.close - 1 AS ret
        FROM {table} r JOIN following f USING (date)
        LEFT JOIN {table} n ON n.symbol = r.symbol AND n.date = f.next_date
        WHERE r.date BETWEEN ? AND ?
    """,
        [start, end],
    ).df()
