"""`fqn bench` end to end at a tiny size: every path timed or its failure said, memory measured."""

from __future__ import annotations

import json
import math

import pytest

from fqn.commands import bench as tool

pytestmark = pytest.mark.slow  # end to end: the fast tier (-m 'not slow') leaves it out


def test_every_path_is_timed_or_says_why_and_memory_is_measured(tmp_path, monkeypatch):
    monkeypatch.setitem(tool.SIZES, "160", (64, 96))  # the probe process reads the real table: time only here
    rows = tool.bench_group("resnet18", "160", tmp_path / "files", runs=1, warmup=0, threads=1,
                            parts=["detector", "backbone_fpn"], memory=False)
    assert [r["path"] for r in rows] == [p[0] for p in tool.PATHS]
    for row in rows:
        for part in ("detector", "backbone_fpn"):
            ms, err = row.get(f"{part}_ms"), row.get(f"{part}_error")
            assert (ms is not None and math.isfinite(ms) and ms > 0) != bool(err), (row["path"], part, row)
    by = {r["path"]: r for r in rows}
    assert by["FP32 eager PyTorch"]["detector_speedup"] == 1.0
    for path in ("fqn w8a8 ONNX Runtime", "fqn w4a4 ONNX Runtime", "fqn w8a8 OpenVINO", "fqn w4a4 OpenVINO"):
        assert by[path].get("detector_ms"), by[path]  # fqn's files run plainly in both runtimes
    assert by["fqn w4a4 packed-INT4, plain ONNX Runtime"]["file_mb"] < 0.6 * by["fqn w4a4 ONNX Runtime"]["file_mb"]
    md = tool.markdown(rows, {"cpu": "x", "threads": 1, "torch": "t", "onnxruntime": "o", "runs": 1})
    assert all(p[0] in md for p in tool.PATHS)
    # a fresh process's peak memory for one path (the probe rebuilds the model at the real 160 px)
    mem = tool.peak_memory({"backbone": "resnet18", "size": "160", "part": "detector", "runtime": "onnxruntime",
                            "how": "plain", "threads": 1, "file": str(tmp_path / "files" / "w8.onnx")})
    assert mem["peak_mb"] > mem["over_imports_mb"] > 0
    json.dumps(rows)  # what bench.json gets
