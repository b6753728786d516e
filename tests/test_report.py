"""The shared report writer and round-robin timer of the commands."""

from __future__ import annotations

import csv
import json
import math

import pytest

from fqn.commands.report import Column, RoundRobinTimer, RowLog, Timed, columns, markdown_table, write_report


def test_cells_write_missing_values_one_way():
    assert Column("AP").cell(0.71234) == "0.712"
    assert Column("AP").cell(0.0) == "0.000"  # a measured zero is not missing
    for missing in (None, float("nan"), -1):
        assert Column("APs").cell(missing) == "–"
    assert Column("gap", signed=True, digits=4).cell(-1.0) == "-1.0000"  # a difference of -1 is a value
    assert Column("speedup", digits=2, suffix="x").cell(2.0) == "2.00x"
    assert Column("name").cell("fqn QAT w4a4") == "fqn QAT w4a4"


def test_write_report_keeps_json_markdown_and_csv_in_step(tmp_path):
    rows = [{"model": "FP32", "AP": 0.5, "APs": -1.0, "_private": object()},
            {"model": "broken", "AP": float("nan"), "APs": None}]
    md = write_report(tmp_path, "table", rows, columns("model", "AP", "APs"), meta={"cmd": "x"}, footer="note")
    assert md.read_text().splitlines() == ["| model | AP | APs |", "|---|---|---|", "| FP32 | 0.500 | – |",
                                           "| broken | – | – |", "note"]
    saved = json.loads((tmp_path / "table.json").read_text())  # strict JSON: NaN became null
    assert saved == {"meta": {"cmd": "x"}, "rows": [{"model": "FP32", "AP": 0.5, "APs": -1.0},
                                                    {"model": "broken", "AP": None, "APs": None}]}
    with open(tmp_path / "table.csv") as f:
        assert list(csv.DictReader(f)) == [{"model": "FP32", "AP": "0.5", "APs": "-1.0"},
                                           {"model": "broken", "AP": "", "APs": ""}]
    assert markdown_table([], columns("a")) == "| a |\n|---|"


def test_round_robin_timer_interleaves_and_reports_a_median():
    calls: list[str] = []

    def make(name: str):
        return lambda x: calls.append(f"{name}{x}")

    medians = RoundRobinTimer(runs=3, warmup=1, progress=False).run(
        {"a": Timed(make("a"), [0, 1]), "b": Timed(make("b"), [7])})
    assert calls == ["a0", "b7", "a0", "b7", "a1", "b7", "a0", "b7"]  # warm-up, then one call of each per round
    assert set(medians) == {"a", "b"} and all(v >= 0 and not math.isnan(v) for v in medians.values())
    with pytest.raises(ValueError):
        RoundRobinTimer(runs=0)


def test_row_log_resumes_only_a_file_measured_with_the_same_inputs(tmp_path):
    header = {"float": "a.ckpt", "float_sha256": "0123", "n_cal": 20, "provenance": {"host": "one"}}
    log = RowLog(tmp_path, "t", columns("model", "AP"), header)
    log.add({"model": "FP32", "AP": 0.5})
    log.add({"model": "PTQ", "bits": 4, "rounding": "qdrop", "iters": 50, "AP": 0.4})
    # an interrupted run resumed on another machine: the provenance differs, the inputs do not
    resumed = RowLog(tmp_path, "t", columns("model", "AP"), {**header, "provenance": {"host": "two"}}, resume=True)
    assert resumed.earlier(model="FP32") == {"model": "FP32", "AP": 0.5}
    assert resumed.earlier(bits=4, rounding="qdrop", iters=50)["AP"] == 0.4
    assert resumed.earlier(bits=4, rounding="qdrop", iters=200) is None  # not measured yet
    assert resumed.rows == []  # the caller decides which earlier rows this run keeps, in its own order
    assert RowLog(tmp_path, "t", columns("model"), header).earlier(model="FP32") is None  # no resume: fresh
    for changed in ({"float_sha256": "4567"}, {"n_cal": 10}, {"extra": 1}):
        with pytest.raises(ValueError, match=f"other inputs \\({next(iter(changed))}\\)"):
            RowLog(tmp_path, "t", columns("model"), {**header, **changed}, resume=True)
    assert RowLog(tmp_path / "new", "t", columns("model"), header, resume=True).earlier(model="FP32") is None
    calls = []

    def measured_now():
        calls.append(1)
        return {"model": "PTQ", "bits": 4, "rounding": "qdrop", "iters": 200, "AP": 0.45}

    kept = resumed.measure({"bits": 4, "rounding": "qdrop", "iters": 50}, measured_now)
    new = resumed.measure({"bits": 4, "rounding": "qdrop", "iters": 200}, measured_now)
    assert kept["AP"] == 0.4 and "minutes" not in kept and new["AP"] == 0.45 and new["minutes"] >= 0
    assert calls == [1] and resumed.rows == [kept, new]
    assert [r["AP"] for r in json.loads((tmp_path / "t.json").read_text())["rows"]] == [0.4, 0.45]
