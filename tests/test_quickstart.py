"""`fqn quickstart`'s settings. The quickstart itself runs end to end, from an installed wheel, in test_install.py."""

from __future__ import annotations

import json

import pytest

from fqn.commands.cli import main
from fqn.commands.quickstart import QuickstartConfig, finished_comparison


def test_quickstart_rejects_bad_settings():
    with pytest.raises(SystemExit, match="must be >= 1"):
        main(["quickstart", "--float-steps", "0"])
    with pytest.raises(SystemExit):  # a list option with no value is an error, not "none": --no-qat says that
        main(["quickstart", "--qat-bits"])


def test_a_finished_comparison_is_reused_only_with_the_same_settings(tmp_path):
    settings = {"size": 96, "ptq_bits": [4]}
    assert finished_comparison(tmp_path, settings) is None  # nothing there yet
    rows = [{"name": "FP32", "latency_ms": 3.0}, {"name": "fqn PTQ w4a4", "latency_ms": None}]
    (tmp_path / "compare.json").write_text(json.dumps({"machine": {"settings": settings}, "rows": rows}))
    assert finished_comparison(tmp_path, settings) is None  # interrupted before its timing: to be redone
    rows[1]["latency_ms"] = 2.0
    (tmp_path / "compare.json").write_text(json.dumps({"machine": {"settings": settings}, "rows": rows}))
    assert [r["name"] for r in finished_comparison(tmp_path, settings).rows] == ["FP32", "fqn PTQ w4a4"]
    with pytest.raises(FileExistsError, match="other settings"):
        finished_comparison(tmp_path, {**settings, "ptq_bits": [8]})
    assert QuickstartConfig().threads is None  # torch's default, as in every command
