"""Render the measured numbers and the CLI reference into README.md and docs/*.md: the one writer of docs numbers.

    python tools/render_docs.py            # rewrite every rendered block from docs/results/*.json and the parsers
    python tools/render_docs.py --check    # exit 1 and name the pages whose blocks differ (what the test runs)

A page holds a rendered block between ``<!-- render: NAME -->`` and ``<!-- /render -->``; NAME is one of `RENDERERS`.
A block renders from a results file in docs/results/ (JSON written by the command that measured it, with the machine,
versions, commit and command) or from the CLI's own parsers; a table carries a line saying where its numbers came
from. A multi-line block sits on lines of its own; a one-line value can sit inside a sentence.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
BLOCK = re.compile(r"<!-- render: (?P<name>[a-z0-9-]+) -->(?P<body>.*?)<!-- /render -->", re.S)


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def results(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / name).read_text())


def provenance_line(record: dict[str, Any], file: str) -> str:
    """Where a table's numbers come from: the command, the machine, the versions, the commit, the results file."""
    m = record.get("machine") or record.get("provenance") or record.get("meta", {}).get("provenance") or {}
    versions = ", ".join(f"{k} {m[k]}" for k in ("python", "torch", "torchvision", "onnxruntime", "openvino") if k in m)
    commit = (m.get("commit") or "unknown")[:12]
    return (f"Measured with `{m.get('command', '?')}` on {m.get('cpu', '?')} ({m.get('cores', '?')} cores, "
            f"{m.get('threads', '?')} threads); {versions}; fqn {m.get('fqn', '?')} at commit {commit}. "
            f"Data: [`docs/results/{file}`](results/{file}).")


# ---- the CLI reference ---------------------------------------------------------------------------------------------

def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.default in (None, argparse.SUPPRESS) or isinstance(action, argparse._StoreConstAction):
        return ""
    if isinstance(action.default, bool):
        return "on" if action.default else "off"
    if isinstance(action.default, (list, tuple)):
        return " ".join(map(str, action.default)) if action.default else "none"
    return str(action.default)


def _spelling(action: argparse.Action) -> str:
    flags = " / ".join(s for s in action.option_strings) if action.option_strings else (action.metavar or action.dest)
    if action.option_strings and action.nargs != 0:
        choices = f"{{{','.join(map(str, action.choices))}}}" if action.choices else action.dest.upper()
        meta = action.metavar or choices
        if isinstance(action.choices, range):
            meta = f"{action.metavar or 'N'} ({action.choices.start}-{action.choices.stop - 1})"
        flags += f" {meta}" + (" ..." if action.nargs in ("+", "*") else "")
    return f"`{flags}`"


def cli_reference() -> str:
    """Every fqn command's options, from the parsers themselves (LightningCLI's fit/validate/test summarised)."""
    from fqn.commands.cli import SUMMARIES, parsers

    lines = ["| command | what it does |", "|---|---|"]
    lines += [f"| [`fqn {n}`](#fqn-{n}) | {text} |" if n not in ("fit", "validate", "test") else
              f"| [`fqn {n}`](#fqn-fit--validate--test) | {text} |" for n, text in SUMMARIES.items()]
    for name, parser in parsers().items():
        positional = [a for a in parser._actions if not a.option_strings]
        usage = " ".join(["fqn", name, *(a.metavar or a.dest for a in positional), "[options]"])
        lines += ["", f"### fqn {name}", "", f"`{usage}`", "", parser.description.rstrip(".") + ".", "",
                  "| argument | default | meaning |", "|---|---|---|"]
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            text = (action.help or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {_spelling(action)} | {_default(action)} | {text} |")
    return "\n".join(lines)


# ---- the measured tables -------------------------------------------------------------------------------------------

QUICKSTART = "quickstart.json"


def _quickstart_rows() -> list[dict[str, Any]]:
    return [r for r in results(QUICKSTART)["rows"] if not r.get("error")]


def quickstart_table() -> str:
    """The whole comparison `fqn quickstart` printed, from its compare.json."""
    from fqn.commands.compare import TABLE
    from fqn.commands.report import markdown_table

    record = results(QUICKSTART)
    m = record["machine"]
    return (markdown_table(record["rows"], TABLE) + f"\n\n{m['val_images']} validation images of "
            f"{m['image_size'][0]}x{m['image_size'][1]} px, {m['calibration_batches']} calibration batches; latency: "
            f"median of {m['runs']} runs after {m['warmup']} warm-up, one image per call, speedups against FP32 eager "
            f"PyTorch. " + provenance_line(record, QUICKSTART))


def quickstart_headline() -> str:
    """The README's table: each model in ONNX Runtime (the deployable file), AP as a share of FP32's."""
    from fqn.commands.report import Column, markdown_table

    rows = _quickstart_rows()
    fp32 = next(r for r in rows if r["method"] == "fp32" and r["runtime"] == "PyTorch eager")
    keep = [fp32] + [r for r in rows if r["runtime"] in ("ONNX Runtime int8", "ONNX Runtime")
                     or r["method"] == "peer-torchao"]
    shown = [{**r, "share": 100 * r["AP"] / fp32["AP"]} for r in keep]
    cols = [Column("name", "model"), Column("runtime"), Column("AP"), Column("share", "% of FP32 AP", 1),
            Column("size_mb", "size MB", 1), Column("latency_ms", "latency ms", 1),
            Column("speedup", "speedup", 2, suffix="x")]
    return markdown_table(shown, cols) + "\n\n" + provenance_line(results(QUICKSTART), QUICKSTART)


def _row(name_start: str, runtime: str = "ONNX Runtime int8") -> dict[str, Any]:
    return next(r for r in _quickstart_rows() if r["name"].startswith(name_start) and r["runtime"] == runtime)


def quickstart_minutes() -> str:
    return f"{results(QUICKSTART)['quickstart_seconds']['total'] / 60:.1f} minutes"


def quickstart_qat_share() -> str:
    fp32 = next(r for r in _quickstart_rows() if r["method"] == "fp32" and r["runtime"] == "PyTorch eager")
    return f"{100 * _row('fqn QAT w4a4')['AP'] / fp32['AP']:.1f}%"


def quickstart_ptq_share() -> str:
    fp32 = next(r for r in _quickstart_rows() if r["method"] == "fp32" and r["runtime"] == "PyTorch eager")
    return f"{100 * _row('fqn PTQ w4a4')['AP'] / fp32['AP']:.1f}%"


def quickstart_max_gap() -> str:
    gaps = [abs(r["int8_gap_AP"]) for r in _quickstart_rows() if r.get("int8_gap_AP") is not None]
    return f"{max(gaps):.4f}"


BENCH = "bench_cpu.json"


def bench_table() -> str:
    from fqn.commands.bench import markdown

    record = results(BENCH)
    return markdown(record["rows"], record["machine"]).strip() + "\n\n" + provenance_line(record, BENCH)


TRAIN_STEP = "train_step_cpu.json"


def train_step_table() -> str:
    from fqn.commands.report import Column, markdown_table

    record = results(TRAIN_STEP)
    cols = [Column("backbone"), Column("size", "image px", fmt="d"), Column("batch", fmt="d"), Column("precision"),
            Column("quant"),
            Column("s_per_step", "s/step", 2), Column("qat_over_fp32", "QAT / FP32", 2),
            Column("cal_s", "calibration s", 0)]
    return markdown_table(record["rows"], cols) + "\n\n" + provenance_line(record, TRAIN_STEP)


ANALYZE = "analyze_qat_w4a4.json"


def analyze_table() -> str:
    from fqn.commands.report import Column, markdown_table

    record = results(ANALYZE)
    cols = [Column("layer"), Column("sqnr_db", "SQNR dB", 1), Column("rel_mean", "mean rel err", fmt=".3g"),
            Column("abs_max", "max abs err", fmt=".3g")]
    text = markdown_table(record["layers"][:8], cols)
    if record.get("sensitivity"):
        text += "\n\n" + markdown_table(record["sensitivity"][:5], [Column("layer", "layer kept float"),
                                                                    Column("sqnr_db", "output SQNR dB", 1),
                                                                    Column("cost_db", "gain dB", 2, signed=True)])
    return text + "\n\n" + provenance_line(record, ANALYZE)


EXACTNESS = "int8_exactness.json"


def exactness_table() -> str:
    from fqn.commands.report import markdown_table

    sys.path.insert(0, str(REPO / "tools"))
    from int8_exactness import TABLE

    record = results(EXACTNESS)
    m = record["machine"]
    cpu = "with VNNI" if m.get("vnni") else "AVX2, no VNNI" if m.get("avx2") else "no AVX2"
    return (markdown_table(record["rows"], TABLE) + f"\n\nThis CPU: {cpu}. " + provenance_line(record, EXACTNESS))


RECONSTRUCTION = {"synthetic": ["ptq_reconstruction_synthetic_w4.json", "ptq_reconstruction_synthetic_w8.json",
                                 "ptq_reconstruction_synthetic_iters.json", "ptq_reconstruction_synthetic_heads8.json",
                                 "ptq_reconstruction_synthetic_headsfloat.json"],
                  "street": ["ptq_reconstruction_street_w4.json", "ptq_reconstruction_street_w8.json"]}
RECONSTRUCTION_QAT = {"synthetic": ["reconstruction_qat_synthetic_200.json", "reconstruction_qat_synthetic_400.json"],
                      "street": ["reconstruction_qat_street_400.json", "reconstruction_qat_street_200.json"]}
EVERY_LAYER = "every layer"
ROUNDINGS = ("-", "nearest", "adaround", "brecq", "qdrop")


def _sources(files: list[str]) -> str:
    return "\n\n".join(provenance_line(results(f), f) for f in files if (RESULTS / f).is_file())


def _ptq_rows(data: str) -> list[dict[str, Any]]:
    """Every PTQ row of the data's result files (each file one run; the FP32 row once), in table order:
    bits, then scope, then rounding, then iterations."""
    rows: list[dict[str, Any]] = []
    for i, file in enumerate(RECONSTRUCTION[data]):
        if not (RESULTS / file).is_file():
            continue
        for r in results(file)["rows"]:
            if r["model"] == "FP32" and any(x["model"] == "FP32" for x in rows):
                continue
            scope = r.get("scope") or (EVERY_LAYER if r["model"] != "FP32" else "-")
            rows.append({**r, "scope": scope, "_order": 0 if scope in (EVERY_LAYER, "-") else i})
    return sorted(rows, key=lambda r: (r.get("bits", 0), r["_order"], ROUNDINGS.index(r["rounding"]),
                                       r.get("iters") or 0))


def reconstruction_table(data: str, scoped: bool = False) -> str:
    """PTQ by nearest rounding against learned rounding / block reconstruction, one row per bits, method, iterations
    (``scoped``: the 4-bit rows with other quantized scopes, beside the every-layer rows of the same methods)."""
    from fqn.commands.report import Column, markdown_table

    rows = _ptq_rows(data)
    if scoped:
        methods = {(r["rounding"], r.get("iters")) for r in rows if r["scope"] not in (EVERY_LAYER, "-")}
        rows = [r for r in rows if r["model"] == "FP32" or (r.get("bits") == 4 and (r["rounding"], r.get("iters"))
                                                             in methods)]
    else:
        rows = [r for r in rows if r["scope"] in (EVERY_LAYER, "-")]
    rows = [{**r, "iters": r.get("iters") or "-", "cal_images": r.get("cal_images") or "-"} for r in rows]
    cols = [Column("model"), *([Column("scope", "what is not at the row's bits")] if scoped else []),
            Column("rounding"), Column("iters", "iterations / unit", fmt="d"),
            Column("cal_images", "calibration images", fmt="d"), Column("AP"), Column("AP50"),
            Column("pct_fp32", "% of FP32", 1), Column("error_ratio", "unit error", 2),
            Column("int8_gap", "int8 - fake AP", 3, signed=True), Column("ptq_minutes", "PTQ minutes", 1)]
    files = [f for f in RECONSTRUCTION[data] if (RESULTS / f).is_file()
             and any((r.get("scope") or EVERY_LAYER) != EVERY_LAYER
                     for r in results(f)["rows"] if r["model"] != "FP32") == scoped]
    return markdown_table(rows, cols) + "\n\n" + _sources(files)


PTQ_TARGET = 95.0  # the level PTQ w4a4 is held to (% of FP32 AP), near the published record for W4A4 detectors


def reconstruction_best(data: str, bits: int = 4, scope: str = EVERY_LAYER) -> str:
    """The best reconstructed PTQ row at ``bits`` with quantized ``scope`` (a row's scope starts with it), and how
    far it is from the target, inline."""
    rows = [r for r in _ptq_rows(data) if r.get("bits") == bits and r["rounding"] != "nearest"
            and r["scope"].startswith(scope)]
    best = max(rows, key=lambda r: r["AP"])
    return f"`{best['rounding']}` at {best['iters']} iterations per unit, " + _against(best["pct_fp32"], PTQ_TARGET)


def _against(pct: float, target: float) -> str:
    """A share of FP32 AP and its distance from a target, as the docs' sentences state both."""
    gap = target - pct
    return f"{pct:.1f}% of FP32 AP, {abs(gap):.1f} points {'below' if gap > 0 else 'above'} {target:.0f}%"


def _qat_rows(data: str) -> list[dict[str, Any]]:
    """The QAT rows of the data's ablate results (one file per step count) with their steps, share of FP32, int8 gap
    and calibration images; the FP32 row first, and again before a file whose float model scores otherwise (the
    rows of a file are shares of their own float model)."""
    rows: list[dict[str, Any]] = []
    for file in RECONSTRUCTION_QAT.get(data, []):
        if not (RESULTS / file).is_file():
            continue
        record = results(file)
        grid = record["meta"]["grid"]
        fp32 = next(r for r in record["rows"] if r["row"] == "FP32")
        if not any(r.get("float") and r["AP"] == fp32["AP"] for r in rows):
            rows.append({**fp32, "steps": "-", "float": True,
                         "row": "FP32 (another float model: the rows below)" if rows else "FP32"})
        batch = grid.get("batch_size")
        rows += [{**r, "steps": grid["steps"], "pct_fp32": 100 * r["AP"] / fp32["AP"],
                  "int8_gap": r["int8_AP"] - r["AP"], "cal_images": r["config"]["n_cal"] * batch if batch else None}
                 for r in record["rows"] if r["row"] != "FP32"]
    return rows


def _qat_runs(data: str) -> list[dict[str, Any]]:
    """The QAT rows alone, without the FP32 rows they are shares of."""
    return [r for r in _qat_rows(data) if not r.get("float")]


def reconstruction_qat_table(data: str) -> str:
    """QAT from nearest-rounding PTQ against QAT from a reconstructed start, at each measured step count."""
    from fqn.commands.report import Column, markdown_table

    cols = [Column("row"), Column("steps", "QAT steps", fmt="d"),
            Column("cal_images", "calibration images", fmt="d"), Column("AP"), Column("AP50"),
            Column("pct_fp32", "% of FP32", 1),
            Column("int8_gap", "int8 - fake AP", 3, signed=True), Column("minutes", "minutes", 1)]
    return markdown_table(_qat_rows(data), cols) + "\n\n" + _sources(RECONSTRUCTION_QAT[data])


QAT_TARGET = 97.0  # the level QAT w4a4 from a PTQ start is held to within 400 steps (% of FP32 AP)


def reconstruction_qat_best(data: str) -> str:
    """The best QAT row at the longest measured run, and how far it is from the target, inline."""
    rows = _qat_runs(data)
    steps = max(r["steps"] for r in rows)
    best = max((r for r in rows if r["steps"] == steps), key=lambda r: r["AP"])
    return f"{best['row']} after {steps} steps, " + _against(best["pct_fp32"], QAT_TARGET)


GAP_TARGET = 0.003  # int8 within 0.3 AP points of the fake-quant model: the rows past it are named


def reconstruction_gap(data: str) -> str:
    """The largest int8 - fake-quant AP difference over the PTQ and QAT rows, and the rows past the target."""
    def name(r: dict[str, Any]) -> str:
        iters = f" {r['iters']}" if r.get("iters") else ""
        scope = f" ({r['scope']})" if r["scope"] != EVERY_LAYER else ""
        return f"{r['model']} {r['rounding']}{iters}{scope}"

    rows = [(name(r), r["int8_gap"]) for r in _ptq_rows(data) if r.get("int8_gap") is not None]
    rows += [(f"{r['row']} ({r['steps']} steps)", r["int8_gap"]) for r in _qat_runs(data)]
    worst_name, worst = max(rows, key=lambda r: abs(r[1]))
    over = [n for n, g in rows if abs(g) > GAP_TARGET]
    text = f"at most {abs(worst) * 100:.1f} AP points ({worst_name}) over the {len(rows)} PTQ and QAT rows"
    return text + (f"; more than 0.3 points: {', '.join(over)}" if over else ", all within 0.3 points")


def reconstruction_renderers(data: str) -> dict[str, Callable[[], str]]:
    """The blocks of one data set's reconstruction measurements, ``reconstruction-PART-DATA``: the scoped table and
    the QAT table only where the data set has those measurements (the docs must use every block registered)."""
    parts: dict[str, Callable[[], str]] = {
        "table": lambda: reconstruction_table(data), "best": lambda: reconstruction_best(data),
        "gap": lambda: reconstruction_gap(data)}
    if any(r["scope"] not in (EVERY_LAYER, "-") for r in _ptq_rows(data)):
        parts |= {"scope": lambda: reconstruction_table(data, scoped=True),
                  "best-heads8": lambda: reconstruction_best(data, scope="rpn.head.*: 8-bit")}
    if RECONSTRUCTION_QAT.get(data):
        parts |= {"qat": lambda: reconstruction_qat_table(data), "qat-best": lambda: reconstruction_qat_best(data)}
    return {f"reconstruction-{part}-{data}": render for part, render in parts.items()}


RENDERERS: dict[str, Callable[[], str]] = {
    **{name: render for data in RECONSTRUCTION for name, render in reconstruction_renderers(data).items()},
    "cli-reference": cli_reference,
    "quickstart-table": quickstart_table,
    "quickstart-headline": quickstart_headline,
    "quickstart-minutes": quickstart_minutes,
    "quickstart-qat-share": quickstart_qat_share,
    "quickstart-ptq-share": quickstart_ptq_share,
    "quickstart-max-gap": quickstart_max_gap,
    "bench-table": bench_table,
    "train-step-table": train_step_table,
    "analyze-table": analyze_table,
    "int8-exactness-table": exactness_table,
}


def render(text: str, where: str = "docs/page.md") -> str:
    """``text`` of the page at ``where`` (relative to the repository) with every block rendered anew; an unknown
    block name is an error. Links to results files are made relative to the page."""
    prefix = "docs/" if Path(where).parent == Path(".") else ""

    def one(match: re.Match) -> str:
        name = match["name"]
        if name not in RENDERERS:
            raise KeyError(f"{where}: unknown rendered block {name!r}; known: {sorted(RENDERERS)}")
        body = RENDERERS[name]().replace("](results/", f"]({prefix}results/")
        return f"<!-- render: {name} -->" + (f"\n{body}\n" if "\n" in body else body) + "<!-- /render -->"

    return BLOCK.sub(one, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a page is out of date")
    args = parser.parse_args(argv)
    stale = []
    for page in pages():
        text = page.read_text()
        rendered = render(text, str(page.relative_to(REPO)))
        if rendered != text:
            stale.append(str(page.relative_to(REPO)))
            if not args.check:
                page.write_text(rendered)
    if stale:
        print(("out of date: " if args.check else "rendered: ") + ", ".join(stale))
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    import os

    os.environ.setdefault("COLUMNS", "120")
    sys.exit(main())
