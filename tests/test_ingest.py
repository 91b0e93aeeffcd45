"""Ingestion: aliases, date formats, the quarantine with exact counts, idempotence, atomic replace,
revised data (newest file wins), the shrink guard, the calendar, literal and hidden file names."""

import datetime
import os
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from modeling.data.ingest import (
    REJECT_REASONS,
    REVISIONS_TABLE,
    MissingColumnsError,
    ShrinkingLoadError,
    discover_files,
    ingest_market_data,
    skipped_entries,
)
from modeling.data.revisions import PREVIOUS_LOAD, REMOVED

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
        ingest.ingest_market_data(con, sources=[small], max_shrink_share=1.0)
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
    # everything not read is named (the asset logs it and puts it in its metadata), markers too
    assert skipped_entries(src) == ["_SUCCESS", "notes.txt", "part=1/"]
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
    # b is the newer file (written last, or the same mtime and a later name): its copy is kept
    assert con.execute("SELECT source_file FROM raw_market_data_rejects").fetchone()[0] == str(a)


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
    ingest_market_data(con, sources=[tmp_path / "fixed.parquet"], max_shrink_share=1.0)
    assert con.execute("SELECT date::VARCHAR FROM raw_market_data ORDER BY 1").fetchall() == [
        (d,) for d in expected_dates
    ]
    # the in-memory path (the synthetic market's) too
    ingest_market_data(con, frame=tokyo, max_shrink_share=1.0)
    assert con.execute("SELECT date::VARCHAR FROM raw_market_data ORDER BY 1").fetchall() == [
        (d,) for d in expected_dates
    ]


# --- revised data, the shrink guard, the calendar, literal and hidden file names ---------------------

HEADER = "date,symbol,open,high,low,close,volume,sector"
BDAYS = [d.strftime("%Y-%m-%d") for d in pd.bdate_range("2020-01-02", periods=12)]


def _row(date: str, symbol: str, close: float = 10.5, volume: int = 1000) -> str:
    return f"{date},{symbol},10.0,12.0,9.5,{close},{volume},Tech"


def _set_mtime(path: Path, seconds: int) -> Path:
    os.utime(path, ns=(seconds * 10**9, seconds * 10**9))
    return path


def _revisions(con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    return con.execute(f"SELECT * FROM {REVISIONS_TABLE} ORDER BY symbol, date").df()


def test_a_revised_copy_of_a_file_replaces_it_and_is_audited(tmp_path):
    """The reproduced bug: a corrected copy made the whole table empty (all 72 rows conflicting)."""
    rows = [
        (d, s, round(10.0 + 0.05 * i + 0.5 * j, 2)) for i, d in enumerate(BDAYS) for j, s in enumerate("ABC")
    ]
    a = _write_csv(tmp_path / "a.csv", HEADER, [_row(d, s * 3, c) for d, s, c in rows])
    b = _write_csv(
        tmp_path / "b_revised.csv", HEADER, [_row(d, s * 3, round(c * 1.001, 6)) for d, s, c in rows]
    )
    _set_mtime(a, 1_600_000_000)
    _set_mtime(b, 1_600_000_100)
    con = duckdb.connect()
    report = ingest_market_data(con, sources=discover_files(tmp_path))
    assert (report.n_read, report.n_accepted, report.n_rejected, report.n_revised) == (72, 36, 0, 36)
    assert report.rejects_by_reason["conflicting_duplicate"] == 0
    raw = con.execute(
        "SELECT symbol, date::VARCHAR, close FROM raw_market_data ORDER BY symbol, date"
    ).fetchall()
    expected = sorted((s * 3, d, round(c * 1.001, 6)) for d, s, c in rows)
    assert [(s, d) for s, d, _ in raw] == [(s, d) for s, d, _ in expected]
    assert [c for *_, c in raw] == pytest.approx([c for *_, c in expected], abs=1e-9)
    assert con.execute("SELECT count(*) FROM raw_market_data_rejects").fetchone()[0] == 0
    rev = _revisions(con)
    assert list(rev.columns) == [
        "date", "symbol",
        "old_open", "old_high", "old_low", "old_close", "old_volume", "old_sector",
        "new_open", "new_high", "new_low", "new_close", "new_volume", "new_sector",
        "old_source_file", "old_source_row", "new_source_file", "new_source_row", "revised_at",
    ]  # fmt: skip
    assert len(rev) == 36
    assert set(rev.old_source_file) == {str(a)} and set(rev.new_source_file) == {str(b)}
    assert (rev.old_source_row == rev.new_source_row).all()  # the same row of each file
    assert rev.new_close.to_numpy() == pytest.approx(rev.old_close.to_numpy() * 1.001, abs=1e-9)
    assert (rev.old_volume == rev.new_volume).all() and rev.revised_at.notna().all()
    # loading the same files again gives the same tables (the revisions are recomputed by each load)
    first = (con.execute("SELECT * FROM raw_market_data").df(), rev.drop(columns="revised_at"))
    ingest_market_data(con, sources=discover_files(tmp_path))
    pd.testing.assert_frame_equal(first[0], con.execute("SELECT * FROM raw_market_data").df())
    pd.testing.assert_frame_equal(first[1], _revisions(con).drop(columns="revised_at"))


def test_a_file_re_sent_under_its_name_keeps_the_old_value_in_the_audit(tmp_path):
    """A vendor re-sends prices.csv with a corrected old close: the warehouse takes it, and the value it
    replaced (no longer in any file) is audited against the previous load, counted, and kept through
    later corrections and later loads of the same files."""

    rows = [(d, s) for d in BDAYS[:6] for s in ("AAA", "BBB")]
    prices = _write_csv(tmp_path / "prices.csv", HEADER, [_row(d, s) for d, s in rows])
    con = duckdb.connect()
    assert ingest_market_data(con, sources=[prices]).n_revised == 0
    assert _revisions(con).empty

    for close in (10.2, 10.4):  # corrected twice, in place
        _write_csv(
            prices, HEADER, [_row(d, s, close if (d, s) == (BDAYS[2], "BBB") else 10.5) for d, s in rows]
        )
        assert ingest_market_data(con, sources=[prices]).n_revised == 1
    rev = _revisions(con)
    assert rev[["old_close", "new_close"]].values.tolist() == [[10.5, 10.2], [10.2, 10.4]]
    assert set(rev.old_source_file) == {PREVIOUS_LOAD} and rev.old_source_row.isna().all()
    assert set(rev.new_source_file) == {str(prices)} and (rev.date == pd.Timestamp(BDAYS[2])).all()
    assert (rev.old_volume == rev.new_volume).all() and (
        rev.revised_at.diff().dropna() >= pd.Timedelta(0)
    ).all()
    close = "SELECT close FROM raw_market_data WHERE symbol = 'BBB' AND date = ?"
    assert con.execute(close, [BDAYS[2]]).fetchone()[0] == 10.4
    # the same file again: nothing new to audit, the history stays
    assert ingest_market_data(con, sources=[prices]).n_revised == 0
    pd.testing.assert_frame_equal(_revisions(con), rev)


def test_a_daily_file_resending_yesterday_replaces_only_that_row(tmp_path):
    history = _write_csv(
        tmp_path / "history.csv", HEADER, [_row(d, s) for d in BDAYS[:5] for s in ("AAA", "BBB")]
    )
    day1 = _write_csv(
        tmp_path / "day1.csv", HEADER, [_row(BDAYS[5], "AAA", volume=500), _row(BDAYS[5], "BBB", volume=700)]
    )
    # day 2 re-sends day 1 with AAA's final volume (BBB's unchanged) and adds day 2
    day2 = _write_csv(
        tmp_path / "day2.csv",
        HEADER,
        [_row(BDAYS[5], "AAA", volume=1500), _row(BDAYS[5], "BBB", volume=700)]
        + [_row(BDAYS[6], s, volume=900) for s in ("AAA", "BBB")],
    )
    for i, path in enumerate((history, day1, day2)):
        _set_mtime(path, 1_600_000_000 + 86_400 * i)
    con = duckdb.connect()
    report = ingest_market_data(con, sources=discover_files(tmp_path))
    assert (report.n_read, report.n_accepted, report.n_revised, report.n_rejected) == (16, 14, 1, 1)
    assert report.rejects_by_reason["duplicate_date_symbol"] == 1  # BBB's identical older copy
    assert report.rejects_by_reason["conflicting_duplicate"] == 0
    vols = dict(
        con.execute(f"SELECT symbol, volume FROM raw_market_data WHERE date = '{BDAYS[5]}'").fetchall()
    )
    assert vols == {"AAA": 1500.0, "BBB": 700.0}
    assert con.execute("SELECT count(*) FROM raw_market_data").fetchone()[0] == 14
    rev = con.execute(
        "SELECT date::VARCHAR, symbol, old_volume, new_volume, old_source_file, new_source_file "
        f"FROM {REVISIONS_TABLE}"
    ).fetchall()
    assert rev == [(BDAYS[5], "AAA", 500.0, 1500.0, str(day1), str(day2))]
    assert con.execute("SELECT source_file FROM raw_market_data_rejects").fetchall() == [(str(day1),)]


def test_the_newest_file_by_mtime_wins_even_when_its_name_sorts_first(tmp_path):
    old = _write_csv(tmp_path / "z_old.csv", HEADER, [_row(d, "AAA", 10.5) for d in BDAYS[:3]])
    new = _write_csv(tmp_path / "a_new.csv", HEADER, [_row(d, "AAA", 10.6) for d in BDAYS[:3]])
    _set_mtime(old, 1_600_000_000)
    _set_mtime(new, 1_600_000_001)
    con = duckdb.connect()
    report = ingest_market_data(con, sources=discover_files(tmp_path))
    assert (report.n_accepted, report.n_revised, report.n_rejected) == (3, 3, 0)
    assert con.execute("SELECT DISTINCT close FROM raw_market_data").fetchall() == [(10.6,)]
    assert con.execute(f"SELECT DISTINCT old_source_file, old_close FROM {REVISIONS_TABLE}").fetchall() == [
        (str(old), 10.5)
    ]


def test_the_same_mtime_is_broken_by_name_whatever_the_list_order(tmp_path):
    a = _write_csv(tmp_path / "a.csv", HEADER, [_row(d, "AAA", 10.5) for d in BDAYS[:3]])
    b = _write_csv(tmp_path / "b.csv", HEADER, [_row(d, "AAA", 10.7) for d in BDAYS[:3]])
    for path in (a, b):
        _set_mtime(path, 1_600_000_000)
    for order in ([a, b], [b, a]):
        con = duckdb.connect()
        report = ingest_market_data(con, sources=order)
        assert (report.n_accepted, report.n_revised) == (3, 3)
        assert con.execute("SELECT DISTINCT close FROM raw_market_data").fetchall() == [(10.7,)]
        assert con.execute(f"SELECT DISTINCT new_source_file FROM {REVISIONS_TABLE}").fetchall() == [
            (str(b),)
        ]


def test_copies_that_conflict_inside_the_newest_file_are_all_rejected(tmp_path):
    d = BDAYS[0]
    a = _write_csv(
        tmp_path / "a.csv",
        HEADER,
        [_row(d, "AAA", 10.5), _row(d, "BBB", 10.5), _row(d, "CCC", 10.1), _row(d, "CCC", 10.2)],
    )
    b = _write_csv(
        tmp_path / "b.csv",
        HEADER,
        # AAA twice with different closes (nothing says which is right), BBB revised, CCC settles a's conflict
        [_row(d, "AAA", 10.6), _row(d, "AAA", 10.7), _row(d, "BBB", 10.6), _row(d, "CCC", 10.3)],
    )
    _set_mtime(a, 1_600_000_000)
    _set_mtime(b, 1_600_000_100)
    con = duckdb.connect()
    report = ingest_market_data(con, sources=[a, b])
    assert report.rejects_by_reason["conflicting_duplicate"] == 3  # all copies of AAA, a's one included
    assert (report.n_read, report.n_accepted, report.n_revised, report.n_rejected) == (8, 2, 3, 3)
    assert con.execute("SELECT symbol, close FROM raw_market_data ORDER BY symbol").fetchall() == [
        ("BBB", 10.6),
        ("CCC", 10.3),
    ]
    assert con.execute(
        f"SELECT symbol, old_close, new_close, old_source_row FROM {REVISIONS_TABLE} ORDER BY ALL"
    ).fetchall() == [("BBB", 10.5, 10.6, 2), ("CCC", 10.1, 10.3, 3), ("CCC", 10.2, 10.3, 4)]
    conflicting = con.execute(
        "SELECT source_file, close FROM raw_market_data_rejects WHERE symbol = 'AAA' ORDER BY ALL"
    ).fetchall()
    assert conflicting == [(str(a), "10.5"), (str(b), "10.6"), (str(b), "10.7")]


def test_a_load_that_shrinks_the_table_too_much_fails_and_keeps_it(tmp_path):
    symbols = [f"S{i:02d}" for i in range(10)]
    full = [_row(d, s) for d in BDAYS[:10] for s in symbols]  # 100 symbol-days
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    src = _write_csv(tmp_path / "full.csv", HEADER, full + ["2020-01-02,S00,10,11,9,10,-1,Tech"])
    ingest_market_data(con, sources=[src])
    before = [
        con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall()
        for t in ("raw_market_data", "raw_market_data_rejects")
    ]
    assert len(before[0]) == 100 and len(before[1]) == 1
    # S09's last two days went missing from a re-sent file: 98 of 100 symbol-days, 2% > 1%
    short = _write_csv(tmp_path / "short.csv", HEADER, full[:-2])
    with pytest.raises(
        ShrinkingLoadError, match=r"remove 2 of the 100 symbol-days of raw_market_data \(2\.00%"
    ):
        ingest_market_data(con, sources=[short])
    after = [
        con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall()
        for t in ("raw_market_data", "raw_market_data_rejects")
    ]
    assert after == before
    assert con.execute(f"SELECT count(*) FROM {REVISIONS_TABLE}").fetchone()[0] == 0
    # rejected rows count as lost too: the same 100 rows, two of them now with a negative volume
    bad = _write_csv(
        tmp_path / "bad.csv", HEADER, full[:-2] + [r.replace("10.5,1000", "10.5,-1") for r in full[-2:]]
    )
    with pytest.raises(ShrinkingLoadError):
        ingest_market_data(con, sources=[bad])
    # within the share (1 of 100 = 1%) the load passes; a larger share (3 of 99) is a parameter
    assert (
        ingest_market_data(con, sources=[_write_csv(tmp_path / "s99.csv", HEADER, full[:-1])]).n_accepted
        == 99
    )
    report = ingest_market_data(
        con, sources=[_write_csv(tmp_path / "s96.csv", HEADER, full[:-4])], max_shrink_share=0.05
    )
    assert (report.n_accepted, report.n_removed) == (96, 3)
    assert con.execute("SELECT count(*) FROM raw_market_data").fetchone()[0] == 96
    # every symbol-day a load dropped is audited with its old values, once: the last day's S09 (dropped by
    # the 99-row load), then its S06-S08 (by the 96-row one)
    removed = _revisions(con)
    assert removed["new_source_file"].eq(REMOVED).all()
    assert removed["date"].dt.strftime("%Y-%m-%d").eq(BDAYS[9]).all()
    assert sorted(removed["symbol"]) == ["S06", "S07", "S08", "S09"] and removed["old_close"].eq(10.5).all()
    assert removed["new_close"].isna().all() and removed["old_source_file"].eq(PREVIOUS_LOAD).all()


def test_new_dates_do_not_hide_the_history_a_load_drops(tmp_path):
    """The guard counts the old symbol-days a load no longer holds, not the change in the row count: an
    old file that went missing while a new one arrived must not delete its history."""
    symbols = [f"S{i:02d}" for i in range(10)]
    part1 = [_row(d, s) for d in BDAYS[:4] for s in symbols]
    part2 = [_row(d, s) for d in BDAYS[4:8] for s in symbols]
    part3 = [_row(d, s) for d in BDAYS[8:12] for s in symbols]
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    files = [_write_csv(tmp_path / f"p{i}.csv", HEADER, rows) for i, rows in enumerate((part1, part2, part3))]
    ingest_market_data(con, sources=files[:2])
    with pytest.raises(ShrinkingLoadError, match="remove 40 of the 80 symbol-days"):
        ingest_market_data(con, sources=files[1:])  # as many rows as before, half of them new
    assert con.execute("SELECT count(*), min(date) FROM raw_market_data").fetchone() == (
        80,
        pd.Timestamp(BDAYS[0]).date(),
    )
    # with the guard opened on purpose the load passes, and the dropped history is audited
    report = ingest_market_data(con, sources=files[1:], max_shrink_share=1.0)
    assert (report.n_accepted, report.n_removed) == (80, 40)
    assert len(_revisions(con)) == 40


def test_a_stray_row_on_a_date_nobody_trades_is_off_calendar(tmp_path):
    symbols = [f"S{i:02d}" for i in range(10)]
    rows = [_row(d, s) for d in BDAYS for s in symbols]
    rows.append(_row("2020-01-11", "S03"))  # a Saturday between BDAYS[6] and BDAYS[7]
    path = _write_csv(tmp_path / "p.csv", HEADER, rows)
    con = duckdb.connect()
    report = ingest_market_data(con, sources=[path])
    assert report.rejects_by_reason["off_calendar_date"] == 1
    assert (report.n_accepted, report.n_rejected) == (120, 1)
    assert con.execute(
        "SELECT date::VARCHAR, symbol, source_row, reason FROM raw_market_data_rejects"
    ).fetchall() == [("2020-01-11", "S03", 121, "off_calendar_date")]
    by_date = dict(con.execute("SELECT date::VARCHAR, count(*) FROM raw_market_data GROUP BY ALL").fetchall())
    assert by_date == {d: 10 for d in BDAYS}  # the neighbouring dates keep every symbol
    assert REJECT_REASONS[-1] == "off_calendar_date"  # after the row-level reasons and the duplicates
    # min_calendar_share=0 turns the test off
    assert ingest_market_data(con, sources=[path], min_calendar_share=0).n_accepted == 121


def test_the_calendar_keeps_edges_holidays_and_a_universe_that_grows_in_one_step(tmp_path):
    days = [d.strftime("%Y-%m-%d") for d in pd.bdate_range("2020-01-02", periods=30)]
    holiday = days.pop(12)  # nobody trades: no rows at all
    rows = [_row(d, "AAA") for d in days]  # the one symbol with a long history
    rows += [_row(d, f"S{i:02d}") for d in days[15:] for i in range(20)]  # 20 listed at once
    rows += [_row(days[0], "BBB"), _row(days[-1], "CCC")]  # a thin first and a thin last date
    path = _write_csv(tmp_path / "p.csv", HEADER, rows)
    report = ingest_market_data(duckdb.connect(), sources=[path])
    assert report.n_rejected == 0 and report.n_accepted == len(rows)
    assert holiday not in {r.split(",")[0] for r in rows}


def test_file_names_with_glob_characters_are_read_literally(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    bracket = _write_csv(
        src / "prices[1].csv",
        HEADER,
        [_row(d, "AAA") for d in BDAYS[:4]] + [f"{BDAYS[4]},AAA,10,12,9.5,10.5,-1,Tech"],
    )
    _write_csv(src / "prices1.csv", HEADER, [_row(d, "BBB") for d in BDAYS[:3]])
    _write_csv(src / "prices*.csv", HEADER, [_row(d, "CCC") for d in BDAYS[:2]])
    frame = pd.DataFrame(
        {
            "date": BDAYS[:2],
            "symbol": "DDD",
            "open": 10.0,
            "high": 12.0,
            "low": 9.5,
            "close": 10.5,
            "volume": 1000,
        }
    )
    frame.to_parquet(src / "p[1].parquet")
    frame.assign(symbol="EEE").head(1).to_parquet(src / "p1.parquet")
    files = discover_files(src)
    assert len(files) == 5
    con = duckdb.connect()
    report = ingest_market_data(con, sources=files)
    assert (report.n_read, report.n_accepted, report.n_rejected) == (5 + 3 + 2 + 2 + 1, 12, 1)
    assert report.rejects_by_reason["duplicate_date_symbol"] == 0
    counts = dict(con.execute("SELECT symbol, count(*) FROM raw_market_data GROUP BY ALL").fetchall())
    assert counts == {"AAA": 4, "BBB": 3, "CCC": 2, "DDD": 2, "EEE": 1}
    # the rejects name the real file
    assert con.execute("SELECT source_file, source_row FROM raw_market_data_rejects").fetchall() == [
        (str(bracket), 5)
    ]


def test_hidden_appledouble_and_lock_files_are_skipped_and_listed(tmp_path):
    _write_csv(tmp_path / "prices.csv", HEADER, [_row(d, "AAA") for d in BDAYS[:3]])
    _write_csv(tmp_path / ".hidden.csv", HEADER, [_row(d, "HID") for d in BDAYS[:3]])
    (tmp_path / "._prices.csv").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    (tmp_path / "~$prices.csv").write_bytes(b"\x0bsomeone\x00\x00")
    (tmp_path / "_SUCCESS").write_text("")
    assert [f.name for f in discover_files(tmp_path)] == ["prices.csv"]
    assert skipped_entries(tmp_path) == ["._prices.csv", ".hidden.csv", "_SUCCESS", "~$prices.csv"]
    report = ingest_market_data(duckdb.connect(), sources=discover_files(tmp_path))
    assert (report.n_sources, report.n_accepted) == (1, 3)
    # a directory with only such files has no data files; a file named explicitly is read
    only = tmp_path / "only"
    only.mkdir()
    (only / "~$x.csv").write_bytes(b"\x0b")
    with pytest.raises(FileNotFoundError, match="no CSV or Parquet"):
        discover_files(only)
    assert discover_files(tmp_path / ".hidden.csv") == [tmp_path / ".hidden.csv"]


def test_the_asset_reports_revisions_and_off_calendar_rows(tmp_path):
    from dagster import materialize

    from pipeline.assets.raw_market_data import raw_market_data
    from pipeline.resources import build_resources
    from pipeline.settings import Settings

    src = tmp_path / "market"
    src.mkdir()
    old = _write_csv(
        src / "a.csv", HEADER, [_row(d, s) for d in BDAYS for s in ("AAA", "BBB", "CCC", "DDD", "EEE", "FFF")]
    )
    new = _write_csv(src / "b.csv", HEADER, [_row(BDAYS[-1], "AAA", 10.6), _row("2020-01-11", "AAA")])
    _set_mtime(old, 1_600_000_000)
    _set_mtime(new, 1_600_000_100)
    settings = Settings.from_env({"DATA_DIR": str(tmp_path / "data"), "MARKET_DATA_PATH": str(src)})
    result = materialize([raw_market_data], resources=build_resources(settings))
    meta = result.get_asset_materialization_events()[0].materialization.metadata
    assert meta["rows_revised"].value == 1 and meta["revisions_table"].value == REVISIONS_TABLE
    assert meta["rejects_by_reason"].value["off_calendar_date"] == 1
    assert meta["rows_rejected"].value == 1 and meta["rows_read"].value == 74


def test_split_like_jumps_are_flagged_and_genuine_crashes_are_not(tmp_path):
    """An unadjusted 2-for-1 split (close halves, volume doubles) and a 1-for-10 reverse split are
    suspected; a -50% day on unchanged volume and a 3-for-2-sized drop are not."""
    from modeling.data.split_jumps import suspected_split_jumps

    def path(symbol: str, closes: list[float], volumes: list[int]) -> list[str]:
        return [
            f"{d},{symbol},{c},{c * 1.01:.4f},{c * 0.99:.4f},{c},{v},Tech"
            for d, c, v in zip(BDAYS, closes, volumes, strict=False)
        ]

    flat = [100.0] * 6
    rows = (
        path("SPLT", flat[:3] + [51.0, 51.0, 51.0], [1000] * 3 + [2100] * 3)  # 2:1, the day's return +2%
        + path("REVS", flat[:3] + [1010.0] * 3, [1000] * 3 + [95] * 3)  # 1:10 reverse split
        + path("CRSH", flat[:3] + [50.0] * 3, [1000] * 6)  # -50%, volume unchanged: a real move
        + path("THRD", flat[:3] + [66.0] * 3, [1000] * 3 + [1600] * 3)  # -34%: 3-for-2 is not flagged
    )
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    ingest_market_data(con, sources=[_write_csv(tmp_path / "p.csv", HEADER, rows)], min_calendar_share=0)
    jumps = suspected_split_jumps(con)
    assert jumps[["symbol", "split_ratio"]].values.tolist() == [["REVS", 0.1], ["SPLT", 2.0]]
    assert jumps["date"].dt.strftime("%Y-%m-%d").eq(BDAYS[3]).all()
    assert jumps.set_index("symbol")["close_ratio"].round(4).to_dict() == {"REVS": 10.1, "SPLT": 0.51}
