"""The ``fqn`` command: it parses arguments and calls one function per command; it decides nothing.

    fqn fit --config synthetic_float              # LightningCLI: fit / validate / test
    fqn convert runs/synthetic_w4a4/checkpoints/last.ckpt --out int8/
    fqn evaluate int8/qat_w4a4.onnx --out scores/
    fqn --version

One vocabulary across commands (docs/cli.md lists every option; a test keeps it equal to these parsers):

* a command that reads one model takes it as its first argument (a checkpoint, or an ``.onnx`` file where it can
  run one); a command that sets several models side by side names their roles: ``--float``, ``--qat``;
* every command writes into ``--out DIR``, and never over an earlier result;
* ``--config NAME|FILE``: a config fqn ships, by name, or a file; without it, the data a model was trained on;
* ``--ptq-bits``, ``--qat-bits``: the bit-widths of the PTQ models made and the QAT runs trained;
  ``--no-ptq``, ``--no-qat``, ``--no-peers`` leave them out (a list option needs at least one value);
* ``--runtime``: onnxruntime | openvino; ``--peers``: onnxruntime (its quantize_static) | torchao (pt2e);
* ``--threads N``: CPU threads (default: torch's, one per core); ``--n-cal``: calibration batches (20).

A data or config error (a bad label, a missing image, ``bits_w: 3.5``) ends the command with one line naming the file
and what is wrong, exit status 1. ``fqn --debug ...`` (or ``FQN_DEBUG=1``) shows the full traceback instead.

The shared options are built in `fqn.commands.options`; each command's work is in ``fqn/commands/<command>.py``.
Those modules are imported inside the parser builders and runners, not here: they pull in Lightning, ONNX Runtime,
matplotlib and the rest, which ``fqn --help`` and every other command would otherwise wait for at start-up.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

import fqn
from fqn.commands.config_files import ConfigError, expand_config_bases, load_config, read_config_chain
from fqn.commands.errors import USER_ERRORS, error_line
from fqn.commands.options import (
    PEERS,
    add_bits,
    add_config,
    add_model,
    add_num_val,
    add_out,
    add_peers,
    add_ptq_options,
    add_runtime,
    add_threads,
    command_parser,
)
from fqn.quant.reconstruction import ReconstructionConfig

LIGHTNING_COMMANDS = ("fit", "validate", "test")


def _reconstruction(a: argparse.Namespace) -> object:
    """``--reconstruction`` with ``--reconstruction-iters`` as the `ReconstructionConfig` the library takes."""
    from fqn.ptq import reconstruction_config

    return reconstruction_config(a.reconstruction, a.reconstruction_iters) if a.reconstruction else None
__all__ = ["main", "parsers", "ConfigError", "expand_config_bases", "load_config", "read_config_chain"]


def lightning_main(argv: list[str]) -> None:
    """Run a LightningCLI subcommand on `DetectionModule` and `DetectionDataModule` (see `fqn.commands.lightning`)."""
    from fqn.commands.lightning import run_lightning

    run_lightning(argv)


# ---- the commands: a parser and the one call it makes ---------------------------------------------------------------

def convert_parser() -> argparse.ArgumentParser:
    p = command_parser("convert", "write a quantized model as one int8 ONNX file that ONNX Runtime and OpenVINO run "
                       "on integer kernels as they open it (at <= 4 bits, also a packed-INT4 copy for storage)")
    add_model(p, "a QAT checkpoint, or a float checkpoint with --ptq-bits")
    add_out(p, "qat_wXaX.onnx or ptq_wXaX.onnx per model, each with a .json record of how it was made")
    add_bits(p, "--ptq-bits", "post-training quantize a float checkpoint at these bit-widths: one file each", None)
    add_ptq_options(p)
    add_config(p, "data: section calibrates the PTQ")
    return p


def convert_main(a: argparse.Namespace) -> None:
    from fqn.commands.convert import run_convert

    run_convert(a.model, a.out, ptq_bits=a.ptq_bits, config=a.config, calibration=a.calibration,
                bias_correction=a.bias_correction, n_cal=a.n_cal, head_bits=a.head_bits,
                reconstruction=_reconstruction(a))


def evaluate_parser() -> argparse.ArgumentParser:
    p = command_parser("evaluate", "score one model on validation data: COCO mAP (AP, AP50, ... AR100) and images/s; "
                       "an int8 .onnx file in either runtime, or a checkpoint in PyTorch (float or fake-quant)")
    add_model(p, "an .onnx file written by fqn convert, or a checkpoint (.ckpt)")
    add_out(p, "metrics.json")
    add_config(p)
    add_runtime(p, many=False)
    add_threads(p)
    add_num_val(p)
    return p


def evaluate_main(a: argparse.Namespace) -> None:
    from fqn.commands.evaluate import run_evaluate

    run_evaluate(a.model, a.out, config=a.config, runtime=a.runtime, threads=a.threads, num_val=a.num_val)


def predict_parser() -> argparse.ArgumentParser:
    p = command_parser("predict", "run a model on an image, a folder of images or a video: detections as COCO-style "
                       "JSON, drawn images (or a drawn video), images/s")
    add_model(p, "an .onnx file written by fqn convert, or a checkpoint (.ckpt)")
    p.add_argument("source", metavar="SOURCE", help="an image, a folder of images, or a video (.mp4, .avi, ...)")
    add_out(p, "detections.json and drawn/")
    add_runtime(p, many=False)
    add_threads(p)
    p.add_argument("--min-score", type=float, default=0.05, metavar="S",
                   help="detections below are left out of the JSON")
    p.add_argument("--draw-score", type=float, default=0.5, metavar="S", help="detections below are not drawn")
    p.add_argument("--no-draw", action="store_true", help="write the JSON only")
    p.add_argument("--class-names", nargs="+", metavar="NAME", help="names of labels 1, 2, ... (default: those "
                   "the model file records, else class_1, class_2, ...)")
    return p


def predict_main(a: argparse.Namespace) -> None:
    from fqn.commands.predict import run_predict_command

    run_predict_command(a.model, a.source, a.out, runtime=a.runtime, threads=a.threads, min_score=a.min_score,
                        draw_score=a.draw_score, draw=not a.no_draw, class_names=a.class_names)


def compare_parser() -> argparse.ArgumentParser:
    p = command_parser("compare", "FP32 vs fqn PTQ vs fqn QAT vs the peers' PTQ, on the same validation and "
                       "calibration images: mAP, file size, CPU latency, each int8 file in each runtime")
    p.add_argument("--float", dest="float_ckpt", metavar="CKPT", help="the FP32 checkpoint (default: the float "
                   "model the first --qat checkpoint was fine-tuned from)")
    p.add_argument("--qat", nargs="+", default=[], metavar="CKPT", help="QAT checkpoints (any bit-widths); each "
                   "row is named after its run")
    add_out(p, "compare.json, the .onnx files, tensorboard/")
    add_config(p, "data: section gives the validation and calibration images")
    add_bits(p, "--ptq-bits", "fqn PTQ rows at these bit-widths", [8, 4], none="no fqn PTQ rows")
    add_ptq_options(p)
    add_peers(p, list(PEERS))
    add_runtime(p, many=True)
    p.add_argument("--runs", type=int, default=20, metavar="N", help="timed runs per model (median reported)")
    add_threads(p)
    add_num_val(p)
    return p


def compare_main(a: argparse.Namespace) -> None:
    from fqn.commands.compare import run_compare_command

    run_compare_command(a.float_ckpt, a.qat, a.out, config=a.config, num_val=a.num_val, ptq_bits=a.ptq_bits,
                        calibration=a.calibration, bias_correction=a.bias_correction, n_cal=a.n_cal, peers=a.peers,
                        runs=a.runs, threads=a.threads, runtimes=a.runtime, head_bits=a.head_bits,
                        reconstruction=_reconstruction(a))


def quickstart_parser() -> argparse.ArgumentParser:
    from fqn.commands.quickstart import QuickstartConfig

    d = QuickstartConfig()
    p = command_parser("quickstart", "the whole job on the embedded synthetic data, on a CPU, with no download (its "
                       "time on 2 cores is in docs/quickstart.md): float training, fqn QAT at 4 bits with learned "
                       "ranges, fqn PTQ at 8 and 4 bits, int8 ONNX files, and the comparison with FP32 and the peers")
    add_out(p, "checkpoints, TensorBoard runs, compare/ (a finished run there with the same settings is reused)",
            default=d.out)
    p.add_argument("--backbone", default=d.backbone, choices=["resnet18", "resnet34", "resnet50",
                                                               "mobilenet_v3_large"], help="the detector's backbone")
    p.add_argument("--size", type=int, default=d.size, metavar="PX", help="image side in pixels")
    p.add_argument("--float-steps", type=int, default=d.float_steps, metavar="N",
                   help="float training steps (from scratch, AdamW, 4 images a step)")
    p.add_argument("--qat-steps", type=int, default=d.qat_steps, metavar="N", help="QAT steps per bit-width")
    add_bits(p, "--qat-bits", "QAT runs at these bit-widths: `--qat-bits 8 4` adds the 8-bit one", list(d.qat_bits),
             none="no QAT run")
    add_bits(p, "--ptq-bits", "fqn PTQ rows at these bit-widths", list(d.ptq_bits), none="no fqn PTQ rows")
    add_num_val(p, d.num_val)
    p.add_argument("--n-cal", type=int, default=d.n_cal, metavar="N", help="calibration batches")
    add_peers(p, list(d.peers))
    p.add_argument("--runs", type=int, default=d.runs, metavar="N", help="timed runs per model (median reported)")
    add_threads(p)
    return p


def quickstart_main(a: argparse.Namespace) -> None:
    from fqn.commands.quickstart import run_quickstart_command

    run_quickstart_command(out=a.out, backbone=a.backbone, size=a.size, float_steps=a.float_steps,
                           qat_steps=a.qat_steps, qat_bits=a.qat_bits, ptq_bits=a.ptq_bits, num_val=a.num_val,
                           n_cal=a.n_cal, peers=a.peers, runs=a.runs, threads=a.threads)


def ablate_parser() -> argparse.ArgumentParser:
    from fqn.commands.ablate import TABLES

    p = command_parser("ablate", "the FQN paper's ablation tables as resumable grids of QAT/PTQ runs from one float "
                       "model")
    p.add_argument("--table", required=True, choices=TABLES)
    p.add_argument("--float", dest="float_ckpt", required=True, metavar="CKPT",
                   help="the FP32 checkpoint every row starts from")
    add_out(p, "rows/, runs/, table.md, table.csv, grid.json; re-running resumes the rows not yet done")
    p.add_argument("--config", metavar="NAME|FILE", required=True,
                   help="training config (model, data, trainer sections), e.g. synthetic_w4a4")
    add_bits(p, "--qat-bits", "the table's bit-width, every row's (the PTQ rows of --table calibration too)", 4,
             many=False)
    p.add_argument("--steps", type=int, metavar="N", help="QAT steps per row (default: the config's "
                   "trainer.max_steps)")
    p.add_argument("--rows", nargs="+", metavar="ROW", help="run only these rows (names as in the table)")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="rows in parallel processes")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads per row (default: the cores / --jobs)")
    p.add_argument("--seed", type=int, metavar="N", help="data seed (shuffle, augmentation, calibration batches) "
                   "instead of the config's data.data_seed: a second seed of a table, in its own --out folder")
    p.add_argument("--reconstruction-iters", type=int, default=ReconstructionConfig().iters, metavar="N",
                   help="optimisation steps per block of the reconstruction table's learned rounding")
    return p


def ablate_main(a: argparse.Namespace) -> None:
    from fqn.commands.ablate import run_ablate

    run_ablate(a.table, a.float_ckpt, a.out, a.config, bits=a.qat_bits, steps=a.steps, rows=a.rows, jobs=a.jobs,
               threads=a.threads, seed=a.seed, reconstruction_iters=a.reconstruction_iters)


def analyze_parser() -> argparse.ArgumentParser:
    p = command_parser("analyze", "per-layer activation error of a quantized model against its float phase: ranked "
                       "table, channel-max / error maps, hexbin plots, layer sensitivity, mixed-precision layer choice")
    add_model(p, "a QAT checkpoint, or a float checkpoint with --ptq-bits")
    add_out(p, "PNGs, report.md, layers.json, tensorboard/")
    add_bits(p, "--ptq-bits", "post-training quantize a float checkpoint at this bit-width first", None, many=False)
    add_ptq_options(p)
    add_config(p)
    p.add_argument("--images", type=int, default=4, metavar="N", help="validation images to analyse")
    p.add_argument("--plot-layers", nargs="+", metavar="LAYER", help="layers to draw (default: the 4 worst)")
    p.add_argument("--sensitivity", action="store_true", help="also rank layers by keeping each one float")
    p.add_argument("--layer-bits", type=float, metavar="BUDGET",
                   help="mixed precision: rank layers quantized one at a time and write the quant.layer_bits "
                   "(8-bit layers) whose added weight bits fit BUDGET, a fraction of the low-bit weight storage "
                   "(e.g. 0.25), to OUT/layer_bits.yaml")
    p.add_argument("--int8", nargs="?", const="", metavar="ONNX",
                   help="compare the int8 model's activations (ONNX Runtime integer kernels) instead of the "
                   "fake-quant ones; ONNX: a file fqn convert wrote from this model (without it: converted now)")
    return p


def analyze_main(a: argparse.Namespace) -> None:
    from fqn.commands.analyze import run_analyze

    run_analyze(a.model, a.out, ptq_bits=a.ptq_bits, config=a.config, calibration=a.calibration,
                bias_correction=a.bias_correction, n_cal=a.n_cal, head_bits=a.head_bits,
                reconstruction=_reconstruction(a), images=a.images,
                plot_layers=a.plot_layers,
                sensitivity=a.sensitivity, layer_bits=a.layer_bits, int8=a.int8)


def bench_parser() -> argparse.ArgumentParser:
    from fqn.commands.bench import PARTS, SIZES

    p = command_parser("bench", "latency and peak memory of every way to run a Faster R-CNN on this CPU, at the image "
                       "sizes users run: FP32 eager, FP32 ONNX, fqn's w8a8 and w4a4 files in ONNX Runtime and "
                       "OpenVINO, the packed-INT4 file, ONNX Runtime's quantize_static (random weights: latency, not "
                       "accuracy)")
    add_out(p, "bench.json, bench.md, the .onnx files")
    p.add_argument("--backbones", nargs="+", default=["resnet18", "resnet50"], metavar="BACKBONE",
                   help="random-weight R-CNNs to build (resnet18, resnet34, resnet50, mobilenet_v3_large)")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES),
                   help="160: 160x160; kitti: 375x1242; coco: 800x1333")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS,
                   help="the whole detector and/or the backbone+FPN alone")
    p.add_argument("--runs", type=int, default=5, metavar="N", help="timed runs per path (median reported)")
    p.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed runs per path first")
    add_threads(p)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    return p


def bench_main(a: argparse.Namespace) -> None:
    from fqn.commands.bench import run_bench

    run_bench(a.out, backbones=a.backbones, sizes=a.sizes, parts=a.parts, runs=a.runs, warmup=a.warmup,
              threads=a.threads, memory=not a.no_memory)


def demo_parser() -> argparse.ArgumentParser:
    p = command_parser("demo", "one-minute API demo: prepare, calibrate and compare w8a8/w4a4 detectors against a "
                       "random float one (no training, no data; SQNR, not accuracy)")
    p.add_argument("--backbone", default="resnet18", help="the detector's backbone")
    p.add_argument("--size", type=int, default=256, metavar="PX", help="image side in pixels")
    p.add_argument("--n-cal", type=int, default=4, metavar="N", help="calibration images")
    return p


def demo_main(a: argparse.Namespace) -> None:
    from fqn.commands.demo import run_demo_command

    run_demo_command(a.backbone, a.size, a.n_cal)


#: name -> (parser builder, runner); the order is the one `fqn --help` and docs/cli.md list them in
COMMANDS: dict[str, tuple[Callable[[], argparse.ArgumentParser], Callable[[argparse.Namespace], None]]] = {
    "quickstart": (quickstart_parser, quickstart_main),
    "convert": (convert_parser, convert_main),
    "evaluate": (evaluate_parser, evaluate_main),
    "predict": (predict_parser, predict_main),
    "compare": (compare_parser, compare_main),
    "analyze": (analyze_parser, analyze_main),
    "ablate": (ablate_parser, ablate_main),
    "bench": (bench_parser, bench_main),
    "demo": (demo_parser, demo_main),
}
SUMMARIES = {
    "fit": "train or fine-tune (QAT) a detector from a config (LightningCLI)",
    "validate": "score a checkpoint on a config's validation data (LightningCLI)",
    "test": "score a checkpoint on a config's test data (LightningCLI)",
    "quickstart": "the whole job on the embedded data: float, QAT, PTQ, int8 files, comparison",
    "convert": "a checkpoint to an int8 ONNX file (PTQ first for a float one)",
    "evaluate": "mAP of one model: an int8 file in ONNX Runtime or OpenVINO, or a checkpoint",
    "predict": "detections on images, a folder or a video: JSON and drawn pictures",
    "compare": "FP32 vs fqn PTQ vs fqn QAT vs peers: mAP, size, latency",
    "analyze": "per-layer activation error, pictures, layer sensitivity, mixed-precision choice",
    "ablate": "the FQN paper's ablation tables as resumable grids",
    "bench": "latency and memory of every runtime path at the sizes users run",
    "demo": "one-minute API demo on a random model (no data)",
}


def parsers() -> dict[str, argparse.ArgumentParser]:
    """Every fqn command's parser (not Lightning's), for the CLI reference page."""
    return {name: build() for name, (build, _) in COMMANDS.items()}


def usage() -> str:
    """What ``fqn --help`` prints: every command with its one-line summary.

    Example:
        >>> usage().splitlines()[2]
        'usage: fqn [--debug] COMMAND [options]     fqn COMMAND --help     fqn --version'
    """
    width = max(map(len, SUMMARIES))
    lines = [f"fqn {fqn.__version__}: fully quantized Faster R-CNN (FQN QAT, PTQ, int8 CPU files)", "",
             "usage: fqn [--debug] COMMAND [options]     fqn COMMAND --help     fqn --version", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in SUMMARIES.items()]
    lines += ["", "fit/validate/test take --config NAME|FILE (a config fqn ships, e.g. synthetic_w4a4, or a YAML file) "
              "and any --section.key value;", "  fqn fit --config NAME --print_config prints the resolved config.",
              "--debug (or FQN_DEBUG=1): show the traceback of a data or config error"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run one ``fqn`` command; a user error raises ``SystemExit("fqn CMD: one line")`` (exit status 1).

    ``fqn --debug CMD ...`` or the environment variable ``FQN_DEBUG=1`` lets the error through with its traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("FQN_DEBUG", "") not in ("", "0")
    while argv and argv[0] == "--debug":
        debug, argv = True, argv[1:]
    if argv[:1] == ["--version"]:
        print(f"fqn {fqn.__version__}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    command = argv[0] if argv else None
    if command not in LIGHTNING_COMMANDS and command not in COMMANDS:
        print(usage(), file=sys.stdout if command in ("-h", "--help") else sys.stderr)
        if command not in (None, "-h", "--help"):
            print(f"\nfqn: unknown command {command!r}", file=sys.stderr)
        return 0 if command in ("-h", "--help") else 2
    try:
        if command in LIGHTNING_COMMANDS:
            lightning_main(argv)
        else:
            build, run = COMMANDS[command]
            run(build().parse_args(argv[1:]))
    except USER_ERRORS as err:
        if debug:
            raise
        raise SystemExit(f"fqn {command}: {error_line(err)}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
