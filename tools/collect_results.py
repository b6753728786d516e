"""Collect FP32 / PTQ / QAT mAP from fqn's TensorBoard runs into a Markdown table and a JSON file.

    python tools/collect_results.py runs --float synthetic_float --qat synthetic_w8a8 synthetic_w4a4

FP32 and QAT rows are the last `val/*` values of their runs; the PTQ row of a QAT run is its
`ptq/*` values, logged right after calibration (before any fine-tuning).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fqn.commands.report import columns, markdown_table, write_json
from fqn.evaluation import MAP_COLUMNS

COLUMNS = list(MAP_COLUMNS.values())


def last_scalars(run_dir: Path, prefix: str) -> dict[str, float]:
    """The last value of each ``prefix/<column>`` scalar over all event files of a run (newest version wins)."""
    values: dict[str, tuple[float, int, float]] = {}
    for events in sorted(run_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for col in COLUMNS:
            tag = f"{prefix}/{col}"
            if tag in acc.Tags()["scalars"]:
                e = acc.Scalars(tag)[-1]
                if col not in values or (e.wall_time, e.step) > values[col][:2]:
                    values[col] = (e.wall_time, e.step, e.value)
    return {col: v[2] for col, v in values.items()}


def collect(root: Path, float_run: str, qat_runs: list[str]) -> list[dict]:
    rows = [{"model": "FP32", "run": float_run, **last_scalars(root / float_run, "val")}]
    for run in qat_runs:
        bits = run.rsplit("_", 1)[-1]
        rows.append({"model": f"PTQ {bits}", "run": run, **last_scalars(root / run, "ptq")})
        rows.append({"model": f"QAT {bits}", "run": run, **last_scalars(root / run, "val")})
    return rows


def markdown(rows: list[dict]) -> str:
    return markdown_table(rows, columns("model", *COLUMNS))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the runs/ folder of the TensorBoard logger")
    parser.add_argument("--float", dest="float_run", default="synthetic_float")
    parser.add_argument("--qat", nargs="+", default=["synthetic_w8a8", "synthetic_w4a4"])
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default: ROOT/results.json)")
    args = parser.parse_args(argv)
    rows = collect(args.root, args.float_run, args.qat)
    print(markdown(rows))
    out = args.out or args.root / "results.json"
    write_json(out, rows)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
