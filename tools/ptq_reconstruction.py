"""PTQ accuracy with learned rounding and block reconstruction (AdaRound, BRECQ, QDrop) against nearest rounding.

    python tools/ptq_reconstruction.py runs/quickstart/float/last.ckpt --out bench/recon_synthetic
    python tools/ptq_reconstruction.py runs/street_float/checkpoints/last.ckpt --config street_float \\
        --out bench/recon_street --iters 20 50 200

Every row post-training quantizes the same float model on the same calibration batches (the data's
first ``--n-cal`` un-augmented training batches; their image count is in every row), with the
default range search, then rounds to nearest or reconstructs (``--methods``, ``--iters`` per unit),
and evaluates the fake-quant model on the validation split; with ``--int8`` also the int8 file in
ONNX Runtime (``int8_AP``, ``int8_gap``: int8 minus fake-quant). Each row has its time. The JSON
and Markdown files are rewritten after every row, so an interrupted run keeps what it measured, and
``--resume`` measures only the rows it is missing (the same checkpoint content, data and scope, or an error).

``--layer-bits PATTERN=BITS`` and ``--keep-float PATTERN`` (module-name patterns, as `QuantConfig.layer_bits`
and ``keep_float``) change the quantized scope of every row, e.g. the heads' layers at 8 bits or float, as
published block-reconstruction results on detectors keep them; the scope is written in each row.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from fqn.commands.common import ptq_header, ptq_inputs
from fqn.commands.options import add_ptq_measurement
from fqn.commands.report import Column, RowLog, columns
from fqn.evaluation import evaluate_map
from fqn.ptq import post_training_quantize, ptq_config
from fqn.quant.calibrate import batch_images
from fqn.quant.reconstruction import METHODS, ReconstructionConfig
from fqn.quant.state import quant_state

TABLE = columns("model", "scope", "rounding", Column("iters", fmt="d"), Column("cal_images", fmt="d"), "AP", "AP50",
                "AP75", "pct_fp32", "int8_AP", "int8_gap", "error_ratio", "minutes")


def _int8_ap(model: torch.nn.Module, val: list, example: list, threads: int, progress: bool) -> float:
    from fqn.int8.convert import convert_int8, load_int8

    with tempfile.TemporaryDirectory() as tmp:
        path = convert_int8(model, Path(tmp) / "m.onnx", example)
        return evaluate_map(load_int8(path, threads=threads), val, progress=progress)["AP"]


def scope_label(layer_bits: dict[str, int], keep_float: list[str]) -> str:
    """A row's quantized scope in words: every layer at the row's bits, or what differs."""
    parts = [f"{p}: {b}-bit" for p, b in layer_bits.items()] + [f"{p}: float" for p in keep_float]
    return "; ".join(parts) or "every layer"


def parse_layer_bits(specs: list[str]) -> dict[str, int]:
    """``["rpn.head.*=8", ...]`` -> ``{"rpn.head.*": 8}``; a malformed item is an error naming it."""
    out = {}
    for spec in specs:
        pattern, _, bits = spec.rpartition("=")
        if not pattern or not bits.isdigit():
            raise ValueError(f"--layer-bits takes PATTERN=BITS (e.g. 'rpn.head.*=8'), got {spec!r}")
        out[pattern] = int(bits)
    return out


def run(float_ckpt: str | Path, config: str | None, out: Path, *, bits: list[int], methods: list[str],
        iters: list[int], n_cal: int = 20, num_val: int | None = None, threads: int = 2, int8: bool = False,
        layer_bits: dict[str, int] | None = None, keep_float: list[str] | None = None,
        resume: bool = False, progress: bool = True) -> list[dict]:
    """Measure every (bits, method, iters) row after the FP32 row; returns the rows."""
    layer_bits, keep_float = dict(layer_bits or {}), list(keep_float or [])
    scope = scope_label(layer_bits, keep_float)
    unknown = set(methods) - {"nearest", *METHODS}
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from nearest, {', '.join(METHODS)}")
    torch.set_num_threads(threads)
    model, val, cal = ptq_inputs(float_ckpt, config, n_cal, num_val)
    example = batch_images(cal[0])[:1]
    cal_images = sum(len(batch_images(b)) for b in cal)
    log = RowLog(out, "ptq_reconstruction", TABLE,
                 ptq_header(float_ckpt, config, n_cal, num_val, threads, cal_images=cal_images, scope=scope),
                 resume=resume)

    fp32 = log.measure({"model": "FP32"}, lambda: {"model": "FP32", "rounding": "-",
                                                   **evaluate_map(model, val, progress=progress)})["AP"]

    def ptq_row(b: int, method: str, n: int) -> dict:
        started = time.perf_counter()
        rcfg = None if method == "nearest" else ReconstructionConfig(method, iters=n)
        cfg = ptq_config(b, layer_bits=layer_bits, keep_float=keep_float)
        q = post_training_quantize(model, cal, cfg, num_batches=n_cal, reconstruction=rcfg, progress=progress)
        ptq_minutes = (time.perf_counter() - started) / 60
        rec = (quant_state(q).ptq or {}).get("reconstruction") or {}
        row = {"model": f"PTQ w{b}a{b}", "bits": b, "scope": scope, "layer_bits": layer_bits,
               "keep_float": keep_float, "rounding": method, "iters": n or None,
               "cal_batches": n_cal, "cal_images": cal_images, "ptq_minutes": ptq_minutes, "int8": int8,
               "error_ratio": rec.get("error_ratio"), **evaluate_map(q, val, progress=progress)}
        row["pct_fp32"] = 100 * row["AP"] / fp32 if fp32 > 0 else None  # an untrained float model scores 0
        if int8:
            row["int8_AP"] = _int8_ap(q, val, example, threads, progress)
            row["int8_gap"] = row["int8_AP"] - row["AP"]
        return row

    for b in bits:
        for method in methods:
            for n in ([0] if method == "nearest" else iters):
                log.measure({"bits": b, "rounding": method, "iters": n or None, "int8": int8},
                            partial(ptq_row, b, method, n))
    print("\n" + log.table())
    return log.rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_ptq_measurement(parser)
    parser.add_argument("--ptq-bits", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--methods", nargs="+", default=["nearest", *METHODS], choices=["nearest", *METHODS])
    parser.add_argument("--iters", type=int, nargs="+", default=[ReconstructionConfig().iters],
                        help="iterations per unit, one row each")
    parser.add_argument("--int8", action="store_true", help="also evaluate each row's int8 file in ONNX Runtime")
    parser.add_argument("--layer-bits", nargs="+", default=[], metavar="PATTERN=BITS",
                        help="layers (module-name patterns) at other bit-widths in every row, e.g. 'rpn.head.*=8'")
    parser.add_argument("--keep-float", nargs="+", default=[], metavar="PATTERN",
                        help="layers (module-name patterns) left float in every row, e.g. 'roi_heads.*'")
    args = parser.parse_args(argv)
    run(args.float_ckpt, args.config, Path(args.out), bits=args.ptq_bits, methods=args.methods, iters=args.iters,
        n_cal=args.n_cal, num_val=args.num_val, threads=args.threads, int8=args.int8,
        layer_bits=parse_layer_bits(args.layer_bits), keep_float=args.keep_float, resume=args.resume)


if __name__ == "__main__":
    main()
