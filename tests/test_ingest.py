"""Ingestion: aliases, date formats, the quarantine with exact counts, idempotence, atomic replace."""

import datetime
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from modeling.data.ingest import (
    REJECT_REASONS,
    MissingColumnsError,
    discover_files,
    ingest_market_data,
    skipped_entries,
)

GOOD = "{d},{s},10.0,11.0,9.5,10.5,1000,Tech"


def _write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


@pytest.fixture()
def planted_csv(tmp_path: Path) -> tuple[Path, dict[str, int], int]:
    """Alias/case-mixed header, YYYYMMDD and ISO dates, and a known number of bad rows per reason."""
    header = "DATE,Ticker,Open,HIGH,low,Close,Volume,Sector"
    good = [GOOD.format(d=f"202001{day:02d}", s=sym) for day in range(1, 21) for sym in ("AAA", "BBB")]
    good += [GOOD.format(d=f"2020-02-{day:02d}", s="CCC") for day in range(1, 11)]  # ISO dates
    bad = {
        "unparseable_date": ["2020-13-45,AAA,10,11,9,10,100,Tech", "yesterday,AAA,10,11,9,10,100,Tech"],
        "missing_symbol": ["20200301,,10,11,9,10,100,Tech"],
        "missing_price": [
            "20200302,AAA,,11,9,10,100,Tech",
            "20200303,AAA,10,abc,9,10,100,Tech",
            "20200304,AAA,10,11,nan,10,100,Tech",
        ],
        "non_positive_price": ["20200305,AAA,0,11,9,10,100,Tech", "20200306,AAA,10,11,9,-1,100,Tech"],
        "missing_volume": ["20200307,AAA,10,11,9,10,,Tech"],
        "negative_volume": ["20200309,AAA,10,11,9,10,-5,Tech", "20200310,AAA,10,11,9,10,-1,Tech"],
        "high_below_open_close": ["20200311,AAA,10,10.5,9,11,100,Tech"],
        "low_above_open_close": [
            "20200312,AAA,10,11,9.8,9.5,100,Tech",
            "20200313,AAA,10,11,10.2,10.5,100,Tech",
        ],
        # exact copy of a good row: one copy kept, the extra one rejected
        "duplicate_date_symbol": [GOOD.format(d="20200102", s="AAA")],
        # two versions of the same (date, symbol): both rejected
        "conflicting_duplicate": ["20200316,DDD,10,11,9,10,100,Tech", "20200316,DDD,10,11,9,10.5,100,Tech"],
    }
    rows = good + [r for rs in bad.values() for r in rs]
    path = _write_csv(tmp_path / "prices.csv", header, rows)
    return path, {k: len(v) for k, v in bad.items()}, len(good)


def test_reject_counts_per_reason_are_exact(planted_csv):
    path, expected, n_good = planted_csv
    con = duckdb.connect()
    report = ingest_market_data(con, sources=[path])
    assert report.rejects_by_reason == {r: expected.get(r, 0) for r in REJECT_REASONS}
    assert report.n_read == n_good + sum(expected.values())
    assert report.n_accepted == n_good
    table_counts = dict(
        con.execute("SELECT reason, count(*) FROM raw_market_data_rejects GROUP BY reason").fetchall()
    )
    assert table_counts == {k: v for k, v in expected.items() if v}
    # every input row is in exactly one of the two tables: nothing is lost silently
    n_raw = con.execute("SELECT count(*) FROM raw_market_data").fetchone()[0]
    n_rej = con.execute("SELECT count(*) FROM raw_market_data_rejects").fetchone()[0]
    assert n_raw + n_rej == report.n_read
    # the rejects keep the raw text, the file and the row number so that a user can find the row
    row = con.execute(
        "SELECT date, symbol, high, source_file, source_row FROM raw_market_data_rejects "
        "WHERE reason = 'missing_price' AND high = 'abc'"
    ).fetchone()
    assert row[:3] == ("20200303", "AAA", "abc")
    assert row[3] == str(path) and row[4] == n_good + 2 + 1 + 2


def test_aliases_dates_and_types_are_normalised(planted_csv):
    path, _, n_good = planted_csv
    con = duckdb.connect()
    ingest_market_data(con, sources=[path])
    frame = con.execute("SELECT * FROM raw_market_data ORDER BY symbol, date").df()
    assert list(frame.columns) == ["date", "symbol", "open", "high", "low", "close", "volume", "sector"]
    assert len(frame) == n_good
    assert set(frame.symbol) == {"AAA", "BBB", "CCC"}
    assert str(frame.date.min().date()) == "2020-01-01" and str(frame.date.max().date()) == "2020-02-10"
    assert frame.loc[frame.symbol == "CCC", "date"].dt.month.eq(2).all()
    assert frame.close.dtype == "float64" and (frame.sector == "Tech").all()
    # the kept copy of the exact duplicate is there once
    assert ((frame.symbol == "AAA") & (frame.date == "2020-01-02")).sum() == 1


def test_missing_columns_error_names_found_and_expected(tmp_path):
    path = _write_csv(tmp_path / "bad.csv", "date,symbol,open,close", ["20200101,AAA,1,1"])
    with pytest.raises(MissingColumnsError) as err:
        ingest_market_data(duckdb.connect(), sources=[path])
    message = str(err.value)
    assert "bad.csv" in message
    assert "['high', 'low', 'volume']" in message  # what is missing
    assert "['date', 'symbol', 'open', 'close']" in message  # what it found
    assert "'date', 'symbol', 'open', 'high', 'low', 'close', 'volume'" in message  # what it expected


def test_reingestion_is_idempotent(planted_csv):
    path, _, _ = planted_csv
    con = duckdb.connect()
    ingest_market_data(con, sources=[path])
    first = con.execute("SELECT * FROM raw_market_data ORDER BY ALL").df()
    first_rej = con.execute("SELECT * FROM raw_market_data_rejects ORDER BY ALL").df()
    ingest_market_data(con, sources=[path])
    pd.testing.assert_frame_equal(first, con.execute("SELECT * FROM raw_market_data ORDER BY ALL").df())
    pd.testing.assert_frame_equal(
        first_rej, con.execute("SELECT * FROM raw_market_data_rejects ORDER BY ALL").df()
    )


def test_failed_load_keeps_previous_tables(planted_csv, tmp_path):
    path, _, n_good = planted_csv
    con = duckdb.connect()
    ingest_market_data(con, sources=[path])
    broken = _write_csv(tmp_path / "broken.csv", "date,symbol", ["20200101,AAA"])
    with pytest.raises(MissingColumnsError):
        ingest_market_data(con, sources=[path, broken])
    assert con.execute("SELECT count(*) FROM raw_market_data").fetchone()[0] == n_good


def test_failure_inside_the_transaction_rolls_back(planted_csv, tmp_path, monkeypatch):
    path, _, n_good = planted_csv
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    ingest_market_data(con, sources=[path])
    import modeling.data.ingest as ingest

    small = _write_csv(
        tmp_path / "small.csv",
        "date,symbol,open,high,low,close,volume,sector",
        [GOOD.format(d="20200102", s="ZZZ")],
    )
    monkeypatch.setattr(ingest, "REJECTS_TABLE", "no_such_schema.rejects")  # fails after the raw table
    with pytest.raises(duckdb.Error):
        ingest.ingest_market_data(con, sources=[small])
    assert con.execute("SELECT count(*) FROM raw_market_data").fetchone()[0] == n_good
    assert con.execute("SELECT count(*) FROM raw_market_data WHERE symbol = 'ZZZ'").fetchone()[0] == 0


def test_directory_of_csv_and_parquet_files_is_concatenated(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _write_csv(
        src / "a.csv",
        "date,symbol,open,high,low,close,volume",
        [GOOD.format(d=f"2021-01-{d:02d}", s="AAA").rsplit(",", 1)[0] for d in range(4, 9)],
    )
    pd.DataFrame(
        {
            "Date": [20210104, 20210105],
            "TICKER": ["BBB", "BBB"],
            "open": [5.0, 5.1],
            "high": [5.2, 5.3],
            "low": [4.9, 5.0],
            "close": [5.1, 5.2],
            "volume": [100, 200],
        }
    ).to_parquet(src / "b.parquet")
    (src / "notes.txt").write_text("ignored")
    (src / "part=1").mkdir()
    (src / "_SUCCESS").write_text("")
    files = discover_files(src)
    assert [f.name for f in files] == ["a.csv", "b.parquet"]
    # what is not read is named (the asset logs it and puts it in its metadata), markers aside
    assert skipped_entries(src) == ["notes.txt", "part=1/"]
    con = duckdb.connect()
    report = ingest_market_data(con, sources=files)
    assert report.n_accepted == 7 and report.n_rejected == 0
    rows = con.execute(
        "SELECT symbol, count(*), min(date)::VARCHAR, any_value(sector) FROM raw_market_data "
        "GROUP BY symbol ORDER BY symbol"
    ).fetchall()
    assert rows == [("AAA", 5, "2021-01-04", None), ("BBB", 2, "2021-01-04", None)]


def test_duplicates_across_files_are_detected(tmp_path):
    a = _write_csv(
        tmp_path / "a.csv",
        "date,symbol,open,high,low,close,volume,sector",
        [GOOD.format(d="20200102", s="AAA")],
    )
    b = _write_csv(
        tmp_path / "b.csv",
        "date,symbol,open,high,low,close,volume,sector",
        [GOOD.format(d="20200102", s="AAA")],
    )
    con = duckdb.connect()
    report = ingest_market_data(con, sources=[a, b])
    assert report.rejects_by_reason["duplicate_date_symbol"] == 1
    kept = con.execute("SELECT count(*) FROM raw_market_data").fetchone()[0]
    assert kept == 1
    assert con.execute("SELECT source_file FROM raw_market_data_rejects").fetchone()[0] == str(b)


def test_missing_path_and_empty_directory_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover_files(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no CSV or Parquet"):
        discover_files(tmp_path)


def test_malformed_csv_lines_are_quarantined_with_their_file_row(tmp_path):
    header = "date,symbol,open,high,low,close,volume"
    lines = [
        "2020-01-02,AAA,10,11,9,10.5,100",  # data row 1
        "2020-01-03,AAA,10,11,9,10.5,100,EXTRA",  # 2: too many fields
        "2020-01-06,AAA,10,11,9,10.5",  # 3: too few fields
        "2020-01-07,AAA,10,11,9,10.5,100",  # 4
        "2020-01-08,AAA,10,11,9,-1,100",  # 5: parsed, then rejected for its price
        "2020-01-09,AAA,10,11,9,10.5,100,1,2",  # 6: too many fields
        "2020-01-10,AAA,10,11,9,10.5,100",  # 7
    ]
    path = _write_csv(tmp_path / "m.csv", header, lines)
    con = duckdb.connect()
    report = ingest_market_data(con, sources=[path])
    assert (report.n_read, report.n_accepted, report.n_rejected) == (7, 3, 4)
    assert report.rejects_by_reason["malformed_line"] == 3
    assert report.rejects_by_reason["non_positive_price"] == 1
    rejects = con.execute(
        "SELECT source_row, reason, raw_line FROM raw_market_data_rejects ORDER BY source_row"
    ).fetchall()
    assert [(r[0], r[1]) for r in rejects] == [
        (2, "malformed_line"),
        (3, "malformed_line"),
        (5, "non_positive_price"),
        (6, "malformed_line"),
    ]
    assert rejects[0][2] == lines[1]  # the whole line is kept for the user
    kept = con.execute("SELECT date::VARCHAR FROM raw_market_data ORDER BY date").fetchall()
    assert [k[0] for k in kept] == ["2020-01-02", "2020-01-07", "2020-01-10"]
    # the load leaves no temp tables of its own behind
    assert not con.execute("SELECT table_name FROM duckdb_tables() WHERE temporary").fetchall()


def test_malformed_first_data_line_does_not_break_column_detection(tmp_path):
    path = _write_csv(
        tmp_path / "m.csv",
        "date,symbol,open,high,low,close,volume",
        ["2020-01-02,AAA,10,11,9,10.5,100,EXTRA", "2020-01-03,AAA,10,11,9,10.5,100"],
    )
    con = duckdb.connect()
    report = ingest_market_data(con, sources=[path])
    assert (report.n_accepted, report.rejects_by_reason["malformed_line"]) == (1, 1)
    assert con.execute("SELECT source_row FROM raw_market_data_rejects").fetchall() == [(1,)]


def test_the_same_file_twice_keeps_one_copy_of_each_row(tmp_path):
    path = _write_csv(
        tmp_path / "a.csv",
        "date,symbol,open,high,low,close,volume",
        [f"2020-01-0{d},AAA,10,11,9,10.5,100" for d in (2, 3, 6)],
    )
    con = duckdb.connect()
    report = ingest_market_data(con, sources=[path, path])
    assert (report.n_read, report.n_accepted) == (6, 3)
    assert report.rejects_by_reason["duplicate_date_symbol"] == 3


def test_no_sources_is_a_clear_error():
    with pytest.raises(ValueError, match="no sources"):
        ingest_market_data(duckdb.connect(), sources=[])


@pytest.mark.parametrize("machine_zone", ["UTC", "America/New_York", "Asia/Tokyo"])
def test_time_zone_aware_dates_keep_their_own_calendar_date(tmp_path, machine_zone):
    """A tz-aware timestamp is dated in the zone it was written with, whatever the machine's zone."""
    dates = pd.to_datetime(["2020-01-02", "2020-01-03"])
    frame = pd.DataFrame(
        {
            "symbol": ["AAA", "AAA"],
            "open": [10.0, 10.0],
            "high": [11.0, 11.0],
            "low": [9.0, 9.0],
            "close": [10.5, 10.5],
            "volume": [100.0, 100.0],
        }
    )
    utc = frame.assign(date=dates.tz_localize("UTC"))
    tokyo = frame.assign(date=dates.tz_localize("Asia/Tokyo"), symbol="BBB")
    utc.to_parquet(tmp_path / "utc.parquet")
    tokyo.to_parquet(tmp_path / "tokyo.parquet")
    con = duckdb.connect()
    con.execute(f"SET TimeZone = '{machine_zone}'")
    ingest_market_data(con, sources=[tmp_path / "utc.parquet", tmp_path / "tokyo.parquet"])
    got = con.execute("SELECT symbol, date::VARCHAR FROM raw_market_data ORDER BY ALL").fetchall()
    expected_dates = ["2020-01-02", "2020-01-03"]
    assert got == [("AAA", d) for d in expected_dates] + [("BBB", d) for d in expected_dates]
    # a fixed offset (no zone name) is honoured too
    fixed = frame.assign(date=dates.tz_localize(datetime.timezone(datetime.timedelta(hours=9))))
    fixed.to_parquet(tmp_path / "fixed.parquet")
    ingest_market_data(con, sources=[tmp_path / "fixed.parquet"])
    assert con.execute("SELECT date::VARCHAR FROM raw_market_data ORDER BY 1").fetchall() == [
        (d,) for d in expected_dates
    ]
    # the in-memory path (the synthetic market's) too
    ingest_market_data(con, frame=tokyo)
    assert con.execute("SELECT date::VARCHAR FROM raw_market_data ORDER BY 1").fetchall() == [
        (d,) for d in expected_dates
    ]
