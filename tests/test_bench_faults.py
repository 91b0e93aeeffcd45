"""The pure helpers of bench/bench_faults.py: the seeded kill plan, the digests and the comparisons."""

import sqlite3
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_faults as bf  # noqa: E402


def test_kill_plan_is_seeded_and_covers_every_kind():
    plan = bf.kill_plan(0, 4, 6)
    assert plan == bf.kill_plan(0, 4, 6) and plan != bf.kill_plan(1, 4, 6)
    faults = [f for day in plan for f in day]
    assert len(plan) == 4 and len(faults) == 6
    assert {f.kind for f in faults} == set(bf.KINDS)  # every kind before any twice
    for f in faults:
        assert 0.05 <= f.u <= 0.95
        if f.kind == "hook":
            assert f.point in bf.HOOK_POINTS and 1 <= f.n <= bf.HOOK_HITS[f.point]
            assert f.env() == {"REGRESSOR_FAULT_POINT": f"{f.point}:{f.n}"}
        else:
            assert f.env() == {}
    assert bf.kill_plan(3, 2, 0) == [[], []]


def test_frame_digest_ignores_row_order_and_excluded_columns_only():
    a = pd.DataFrame({"x": [1.0, 2.0, 3.0], "s": ["a", "b", None], "t": pd.to_datetime(["2024"] * 3)})
    b = a.iloc[::-1].reset_index(drop=True).assign(t=pd.to_datetime(["2025"] * 3))
    assert bf.frame_digest(a) != bf.frame_digest(b)
    assert bf.frame_digest(a, ("t",)) == bf.frame_digest(b, ("t",))
    c = a.copy()
    c.loc[1, "x"] = 2.0 + 1e-15  # one bit
    assert bf.frame_digest(c)["sha"] != bf.frame_digest(a)["sha"]
    assert bf.frame_digest(a.head(0))["rows"] == 0


def test_compare_digests_names_each_difference():
    ref = {"t1": {"rows": 3, "sha": "aa"}, "t2": {"rows": 1, "sha": "bb"}}
    assert bf.compare_digests(ref, dict(ref)) == []
    other = {"t1": {"rows": 3, "sha": "ab"}, "t3": {"rows": 1, "sha": "cc"}}
    problems = bf.compare_digests(ref, other)
    assert len(problems) == 3
    assert any(p.startswith("t1:") for p in problems) and any("only in" in p for p in problems)


def test_compare_predictions_tolerance_duplicates_and_missing():
    ref = pd.DataFrame(
        {"date": ["d1", "d1", "d2"], "symbol": ["A", "B", "A"], "prediction": [0.1, 0.2, 0.3],
         "rank": [2, 1, 1], "decile": [1, 10, 10], "model_version": ["3", "3", "4"]}
    )  # fmt: skip
    assert bf.compare_predictions(ref, ref.copy())["ok"]
    close = ref.assign(prediction=ref["prediction"] + 1e-9)
    result = bf.compare_predictions(ref, close)
    assert result["ok"] and 0 < result["max_abs_diff"] < 1e-6
    dup = pd.concat([ref, ref.tail(1)], ignore_index=True)
    assert bf.compare_predictions(ref, dup)["duplicated"] == 1 and not bf.compare_predictions(ref, dup)["ok"]
    missing = bf.compare_predictions(ref, ref.head(2))
    assert missing["missing"] == 1 and not missing["ok"]
    relabelled = bf.compare_predictions(ref, ref.assign(model_version="5"))
    assert relabelled["changed"]["model_version"] == 3 and not relabelled["ok"]


def _registry(path: Path, versions: dict[int, str], champion: int) -> Path:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE model_versions (name TEXT, version INT, status TEXT)")
    con.execute("CREATE TABLE model_version_tags (name TEXT, version INT, key TEXT, value TEXT)")
    con.execute("CREATE TABLE registered_model_aliases (name TEXT, alias TEXT, version INT)")
    for version, sha in versions.items():
        con.execute("INSERT INTO model_versions VALUES ('return-regressor', ?, 'READY')", (version,))
        con.execute(
            "INSERT INTO model_version_tags VALUES ('return-regressor', ?, 'inputs_sha', ?)", (version, sha)
        )
        con.execute(
            "INSERT INTO model_version_tags VALUES ('return-regressor', ?, 'gate', 'done')", (version,)
        )
    con.execute(
        "INSERT INTO registered_model_aliases VALUES ('return-regressor', 'champion', ?)", (champion,)
    )
    con.commit()
    con.close()
    return path


def test_registry_comparison_finds_duplicates_and_another_champion(tmp_path):
    ref = bf.registry_state(_registry(tmp_path / "a.db", {1: "x", 2: "y"}, 2))
    assert ref["aliases"] == {"champion": "2"} and ref["versions"]["1"]["inputs_sha"] == "x"
    assert bf.compare_registries(ref, ref) == []
    dup = bf.registry_state(_registry(tmp_path / "b.db", {1: "x", 2: "x", 3: "y"}, 3))
    assert bf.duplicate_inputs(dup["versions"]) == {"x": ["1", "2"]}
    problems = bf.compare_registries(ref, dup)
    assert len(problems) == 3  # the duplicate, the version count, the champion


def test_trainer_detection_and_phase():
    assert bf.is_trainer(["/v/bin/python", "-m", "modeling.run_job", "--job", "j.json"])
    assert not bf.is_trainer(
        ["/v/bin/python", "/v/bin/accelerate", "launch", "-m", "modeling.run_job", "--job", "j"]
    )
    log = "launching: x\nresumed from step-00000003 (step 3)\ncheckpoint step-00000006 saved\n"
    assert bf.trainer_phase(log) == "training (after a checkpoint)"
    assert bf.trainer_phase("launching: x\n") == "starting (imports, data, model)"


def test_explicit_plan_parses_each_kind_and_refuses_bad_items():
    plan = bf.parse_plan("3:run@0.33, 1:hook:checkpoint_rename:2,3:child@0.5", 4)
    assert plan[0] == [bf.Fault("hook", 0.0, "checkpoint_rename", 2)] and plan[1] == plan[3] == []
    assert [f.kind for f in plan[2]] == ["run", "child"] and plan[2][0].u == 0.33
    for bad in ("5:run@0.1", "1:hook:nowhere:1", "1:explode@0.5", "1:run@1.5"):
        with pytest.raises(ValueError):
            bf.parse_plan(bad, 4)
