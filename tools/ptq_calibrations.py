"""PTQ accuracy per range rule and bit-width, with and without bias correction, against FP32.

    python tools/ptq_calibrations.py runs/synthetic_float/checkpoints/last.ckpt --out bench/ptq_synthetic
    python tools/ptq_calibrations.py runs/street_float/checkpoints/last.ckpt \\
        --config street_float --out bench/ptq_street

Every row post-training quantizes the same float model on the same calibration batches (the
data's first ``--n-cal`` un-augmented training batches) and evaluates the fake-quant model on the
validation split: the table that says which PTQ is the strongest on a data set. The JSON and
Markdown files are rewritten after every row, so an interrupted run keeps what it measured, and
``--resume`` measures only the rows it is missing (the same checkpoint content and data, or an error).
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import torch

from fqn.commands.common import ptq_header, ptq_inputs
from fqn.commands.options import add_ptq_measurement
from fqn.commands.report import RowLog, columns
from fqn.evaluation import evaluate_map
from fqn.ptq import CALIBRATIONS, post_training_quantize, ptq_config, ranges_summary

TABLE = columns("model", "ranges", "AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "gap_AP", "minutes")


def run(float_ckpt: str | Path, config: str | None, out: Path, *, bits: list[int], rules: list[str],
        bias_correction: list[bool], n_cal: int = 20, num_val: int | None = None, threads: int = 2,
        resume: bool = False, progress: bool = True) -> list[dict]:
    """Measure every (bits, rule, bias correction) row after the FP32 row; returns the rows."""
    unknown = set(rules) - set(CALIBRATIONS)
    if unknown:
        raise ValueError(f"unknown range rules {sorted(unknown)}; choose from {CALIBRATIONS}")
    torch.set_num_threads(threads)
    model, val, cal = ptq_inputs(float_ckpt, config, n_cal, num_val)
    log = RowLog(out, "ptq_calibrations", TABLE, ptq_header(float_ckpt, config, n_cal, num_val, threads), resume=resume)

    fp32 = log.measure({"model": "FP32"}, lambda: {"model": "FP32", "ranges": "-",
                                                   **evaluate_map(model, val, progress=progress)})["AP"]

    def ptq_row(b: int, rule: str, corrected: bool) -> dict:
        q = post_training_quantize(model, cal, ptq_config(b, rule), num_batches=n_cal, bias_correction=corrected,
                                   progress=progress)
        row = {"model": f"PTQ w{b}a{b}", "bits": b, "rule": rule, "bias_correction": corrected,
               "ranges": ranges_summary(q), **evaluate_map(q, val, progress=progress)}
        return {**row, "gap_AP": row["AP"] - fp32}

    for b in bits:
        for rule in rules:
            for corrected in bias_correction:
                log.measure({"bits": b, "rule": rule, "bias_correction": corrected},
                            partial(ptq_row, b, rule, corrected))
    print("\n" + log.table())
    return log.rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_ptq_measurement(parser)
    parser.add_argument("--ptq-bits", type=int, nargs="+", default=[8, 4])
    parser.add_argument("--rules", nargs="+", default=["search", "percentile", "histogram", "minmax"],
                        choices=CALIBRATIONS)
    parser.add_argument("--bias-correction", choices=["off", "on", "both"], default="both")
    args = parser.parse_args(argv)
    corrected = {"off": [False], "on": [True], "both": [False, True]}[args.bias_correction]
    run(args.float_ckpt, args.config, Path(args.out), bits=args.ptq_bits, rules=args.rules, bias_correction=corrected,
        n_cal=args.n_cal, num_val=args.num_val, threads=args.threads, resume=args.resume)


if __name__ == "__main__":
    main()
