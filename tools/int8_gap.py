"""Is a row's int8 − fake-quant AP gap a conversion fault, or rounding noise? Its size beside rounding's own.

    python tools/int8_gap.py runs/beyond_w4_400 all_three all_three_range_lr_x100 --out runs/int8_gap.json

For rows of an `fqn ablate` grid, evaluates each row's checkpoint on the grid's validation set twice,
fake-quant in float32 (the table's AP) and in float64 (`fqn.quant.exact.float64_simulation`: the same
model in another arithmetic, whose layers give the integer kernels' codes), and sets them beside the
row's int8 AP. The float64 − float32 difference is what rounding alone does to that AP on that
validation set; an int8 − fake gap of the same size is not evidence of a conversion fault, one well
beyond it is. Prints and saves the numbers. A float64 evaluation takes about twice as long.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fqn.commands.ablate import GridSpec, grid_data
from fqn.commands.report import write_json
from fqn.evaluation import evaluate_map
from fqn.models.checkpoint import load_detector
from fqn.quant.exact import float64_simulation


def row_gap(grid: Path, slug: str, val: list) -> dict:
    """One row: AP of the float32 and float64 simulations and of the int8 file, and their differences in AP points."""
    row = json.loads((grid / "rows" / f"{slug}.json").read_text())
    if not row.get("checkpoint"):
        raise SystemExit(f"row {slug} has no checkpoint (a PTQ row): nothing to simulate")
    model, _ = load_detector(row["checkpoint"])
    start = time.perf_counter()
    fake32 = evaluate_map(model, val, progress=False)["AP"]
    fake64 = evaluate_map(float64_simulation(model), val, progress=False)["AP"]
    int8 = row["int8_AP"]
    return {"row": row["row"], "fake32_AP": fake32, "fake64_AP": fake64, "int8_AP": int8,
            "int8_minus_fake32": 100 * (int8 - fake32), "int8_minus_fake64": 100 * (int8 - fake64),
            "fake64_minus_fake32": 100 * (fake64 - fake32),
            "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("grid", type=Path, help="an `fqn ablate --out` folder")
    parser.add_argument("rows", nargs="+", help="row file names under GRID/rows, without .json")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: print only)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = GridSpec(**json.loads((args.grid / "grid.json").read_text())["spec"])
    data = grid_data(spec)
    data.setup("validate")
    val = list(data.val_dataloader())
    results = []
    for slug in args.rows:
        r = row_gap(args.grid, slug, val)
        results.append(r)
        print(f"{r['row']}: fake-quant float32 {r['fake32_AP']:.4f}, float64 {r['fake64_AP']:.4f}, int8 "
              f"{r['int8_AP']:.4f}; in AP points: int8 - fake32 {r['int8_minus_fake32']:+.2f}, rounding alone "
              f"(fake64 - fake32) {r['fake64_minus_fake32']:+.2f}", flush=True)
        if args.out:
            write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
