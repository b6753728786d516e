"""The ``fqn`` command. Thin: LightningCLI for fit/validate/test; convert, predict, compare, quickstart and demo.

    fqn fit --config configs/synthetic_float.yaml
    fqn fit --config configs/synthetic_w4a4.yaml --trainer.max_steps 500
    fqn validate --config configs/synthetic_w4a4.yaml --ckpt_path runs/.../last.ckpt
    fqn fit --print_config

A data or config error (a bad label, a missing image, ``bits_w: 3.5``) ends the command with one line naming the file
and what is wrong, exit status 1. ``fqn --debug ...`` (or ``FQN_DEBUG=1``) shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

from fqn.commands.config_files import ConfigError, expand_config_bases, load_config, read_config_chain

LIGHTNING_COMMANDS = ("fit", "validate", "test")
__all__ = ["main", "ConfigError", "expand_config_bases", "load_config", "read_config_chain"]


def lightning_main(argv: list[str]) -> None:
    """Run a LightningCLI subcommand on `DetectionModule` and `DetectionDataModule`."""
    import tempfile

    from pytorch_lightning.cli import LightningCLI

    from fqn.data.datamodule import DetectionDataModule
    from fqn.train.module import DetectionModule

    class FqnCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            # the data needs the head's size: a 91-class head is torchvision's COCO head (labels = category ids)
            parser.link_arguments("model.num_classes", "data.head_classes", apply_on="parse")

    sys.argv = sys.argv[:1]  # the arguments come through args=, expanded
    with tempfile.TemporaryDirectory(prefix="fqn-config-") as tmp:
        FqnCLI(DetectionModule, DetectionDataModule, args=expand_config_bases(argv, tmp),
               seed_everything_default=0, save_config_kwargs={"overwrite": True},
               parser_kwargs={"exit_on_error": False})  # a parse error is one line from main(), not the usage


def demo_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="fqn demo", description="one-minute API demo: prepare, calibrate and "
                                     "compare w8a8/w4a4 detectors against a random float one (no training)")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--n-cal", type=int, default=4)
    args = parser.parse_args(argv)
    from fqn.commands.demo import print_demo, run_demo

    print_demo(run_demo(args.backbone, args.size, args.n_cal))


def quickstart_main(argv: list[str]) -> None:
    from fqn.commands.quickstart import QuickstartConfig, run_quickstart

    d = QuickstartConfig()
    parser = argparse.ArgumentParser(
        prog="fqn quickstart", description="synthetic data, CPU, ~11 min on 2 cores: float training (cached), fqn "
        "QAT at 4 bits with learned ranges, PTQ at 8 and 4 bits, int8 ONNX files, and the comparison with FP32 "
        "and the ORT / torchao peers")
    parser.add_argument("--out", default=d.out, help="output folder (checkpoints, TensorBoard, int8 files)")
    parser.add_argument("--backbone", default=d.backbone)
    parser.add_argument("--size", type=int, default=d.size, help="image side in pixels")
    parser.add_argument("--float-steps", type=int, default=d.float_steps)
    parser.add_argument("--qat-steps", type=int, default=d.qat_steps)
    parser.add_argument("--qat-bits", type=int, nargs="*", default=list(d.qat_bits), choices=range(2, 9),
                        help="QAT runs (default: 4; `--qat-bits 8 4` adds the 8-bit one, about 2.5 min)")
    parser.add_argument("--ptq-bits", type=int, nargs="*", default=list(d.ptq_bits), choices=range(2, 9))
    parser.add_argument("--num-val", type=int, default=d.num_val)
    parser.add_argument("--n-cal", type=int, default=d.n_cal)
    parser.add_argument("--peers", nargs="*", default=list(d.peers), choices=["ort", "torchao"])
    parser.add_argument("--runs", type=int, default=d.runs, help="timed runs per model")
    parser.add_argument("--threads", type=int, default=d.threads)
    a = parser.parse_args(argv)
    cfg = QuickstartConfig(out=a.out, backbone=a.backbone, size=a.size, float_steps=a.float_steps,
                           qat_steps=a.qat_steps, qat_bits=tuple(a.qat_bits), ptq_bits=tuple(a.ptq_bits),
                           num_val=a.num_val, n_cal=a.n_cal,
                           peers=tuple(a.peers), runs=a.runs, threads=a.threads)
    run_quickstart(cfg)


def ablate_main(argv: list[str]) -> None:
    from fqn.commands.ablate import TABLES, grid_spec, markdown, run_grid, table_rows

    parser = argparse.ArgumentParser(
        prog="fqn ablate", description="the FQN paper's ablation tables as resumable grids of QAT/PTQ runs")
    parser.add_argument("--table", required=True, choices=TABLES)
    parser.add_argument("--float", dest="float_ckpt", required=True, help="the FP32 checkpoint every row starts from")
    parser.add_argument("--out", required=True, help="grid folder; re-running resumes the rows not yet done")
    parser.add_argument("--config", default=None, help="training config (model, data, trainer sections), e.g. "
                        "configs/synthetic_w4a4.yaml")
    parser.add_argument("--bits", type=int, default=4, choices=range(2, 9))
    parser.add_argument("--steps", type=int, help="QAT steps per row (default: the config's trainer.max_steps)")
    parser.add_argument("--rows", nargs="*", help="run only these rows (names as in the table)")
    parser.add_argument("--jobs", type=int, default=1, help="rows in parallel processes")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per row")
    parser.add_argument("--seed", type=int, help="data seed (shuffle, augmentation, calibration batches) instead of "
                        "the config's data.seed: a second seed of a table, in its own --out folder")
    a = parser.parse_args(argv)
    spec = grid_spec(a.float_ckpt, a.out, load_config(a.config), bits=a.bits, steps=a.steps, seed=a.seed)
    rows = table_rows(a.table, spec.steps)
    if a.rows:
        unknown = set(a.rows) - {r.name for r in rows}
        if unknown:
            raise ValueError(f"unknown rows {sorted(unknown)}; the table has {[r.name for r in rows]}")
        rows = [r for r in rows if r.name in a.rows]
    results = run_grid(spec, rows, jobs=a.jobs, threads=a.threads)
    print(markdown(results))
    print(f"\ntable: {a.out}/table.md, {a.out}/table.csv; TensorBoard: tensorboard --logdir {a.out}/tensorboard")


def analyze_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="fqn analyze", description="per-layer activation error of a quantized checkpoint against its float "
        "phase: ranked table, channel-max / error maps, hexbin plots, layer sensitivity")
    parser.add_argument("checkpoint", help="a QAT checkpoint (a float one needs --ptq-bits)")
    parser.add_argument("--out", required=True, help="folder for the PNGs, report.md, layers.json, TensorBoard")
    parser.add_argument("--ptq-bits", type=int, choices=range(2, 9), metavar="{2..8}",
                        help="post-training quantize a float checkpoint at this bit-width first (e.g. 4 with "
                        "--layer-bits: pick the 8-bit layers before any QAT)")
    _add_ptq_arguments(parser)
    parser.add_argument("--n-cal", type=int, default=20, help="calibration batches (PTQ)")
    parser.add_argument("--config", help="training config whose data: section gives the images")
    parser.add_argument("--images", type=int, default=4, help="validation images to analyse")
    parser.add_argument("--plot-layers", nargs="*", help="layers to draw (default: the 4 worst)")
    parser.add_argument("--sensitivity", action="store_true", help="also rank layers by keeping each one float")
    parser.add_argument("--layer-bits", type=float, metavar="BUDGET",
                        help="mixed precision: quantize each layer alone, rank them, and write the quant.layer_bits "
                        "(8-bit layers) whose added weight bits fit BUDGET, a fraction of the low-bit weight storage "
                        "(e.g. 0.25), to OUT/layer_bits.yaml for a fit config")
    parser.add_argument("--int8", nargs="?", const="", metavar="ONNX",
                        help="compare the int8 model's activations (ONNX Runtime integer kernels) instead of the "
                        "fake-quant ones; ONNX: a file `fqn convert` wrote from this checkpoint (default: convert "
                        "it now into OUT/model_int8.onnx)")
    a = parser.parse_args(argv)
    import itertools
    import pathlib

    from fqn.commands import analyze

    model, _ = _quantized_model(a, "fqn analyze", "analyze", 4)
    data = _data_module(a.config, None)
    data.setup("validate")
    pairs = list(itertools.islice(((img, t) for b in data.val_dataloader() for img, t in zip(*b)),
                                  max(1, a.images)))
    images = [p[0] for p in pairs]
    int8 = a.int8
    if int8 == "":
        from fqn.int8 import convert_int8

        int8 = convert_int8(model, pathlib.Path(a.out) / "model_int8.onnx", images[:1])
        print(f"int8 model: {int8}")
    stats, pictures = analyze.analyze_layers(model, images, keep=a.plot_layers or None, progress=True, int8=int8)
    if not a.plot_layers:  # the 4 worst layers that have pictures (conv feature maps)
        worst = [s.layer for s in stats if s.layer in pictures][:4]
        pictures = {k: pictures[k] for k in worst}
    ranking = analyze.layer_sensitivity(model, images, progress=True) if a.sensitivity else None
    if int8:  # the boxes drawn come from the model whose activations were compared
        from fqn.int8 import load_int8

        prediction = load_int8(int8)([images[0]])[0]
    else:
        prediction = model.eval()([images[0]])[0]
    if a.layer_bits is not None:
        _write_layer_bits(model, images, a.layer_bits, pathlib.Path(a.out))
    source = f"int8 model {int8}" if int8 else "fake-quant model"
    out = analyze.write_report(a.out, stats, pictures, images[0], pairs[0][1], prediction, ranking,
                               data.class_names, source=source)
    print(analyze.report_markdown(stats, ranking, source=source))
    print(f"pictures and tables: {out}; TensorBoard: tensorboard --logdir {out / 'tensorboard'}")


def _write_layer_bits(model: Any, images: list, budget: float, out: Path) -> None:
    """`choose_layer_bits` on a one-layer-at-a-time ranking, as a ``layer_bits:`` block to paste into a config."""
    import yaml

    from fqn.commands import analyze

    cfg = model.fqn_config
    if min(cfg.bits_w, cfg.bits_a) >= 8:
        raise SystemExit("fqn analyze --layer-bits: this checkpoint is already 8-bit; mixed precision raises the "
                         "layers of a lower-bit (e.g. w4a4) model to 8 bits")
    ranking = analyze.layer_sensitivity(model, images, mode="only", progress=True)
    bits = analyze.choose_layer_bits(ranking, low=min(cfg.bits_w, cfg.bits_a), high=8, budget=budget)
    out.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump({"layer_bits": bits}, sort_keys=False)
    (out / "layer_bits.yaml").write_text(f"# fqn analyze --layer-bits {budget}: the layers that quantized alone at "
                                         f"{cfg.bits_w} bits add the most output noise per weight bit\n{text}")
    print(f"mixed precision, {len(bits)} layers at 8 bits within {budget:g} of the {cfg.bits_w}-bit weight storage "
          f"(model.quant.layer_bits, also in {out / 'layer_bits.yaml'}):\n{text}")


def _quantized_model(args: argparse.Namespace, prog: str, verb: str, example_bits: int) -> tuple[Any, dict]:
    """The quantized model of ``args.checkpoint``: a QAT checkpoint as it is, a float one post-training quantized
    with the PTQ options (``--ptq-bits``, ``--calibration``, ``--bias-correction``, ``--n-cal``, ``--config``)."""
    from fqn.models.checkpoint import load_detector

    model, hp = load_detector(args.checkpoint)
    quantized = getattr(model, "fqn_config", None) is not None
    if quantized and args.ptq_bits:
        raise SystemExit(f"{prog}: --ptq-bits needs a float checkpoint; this one is already quantized")
    if not quantized and not args.ptq_bits:
        raise SystemExit(f"{prog}: {args.checkpoint} is a float-only checkpoint: {verb} a QAT checkpoint, "
                         f"or add --ptq-bits {example_bits} to post-training quantize it first")
    if args.ptq_bits:
        from fqn.ptq import post_training_quantize, ptq_config

        cfg = ptq_config(args.ptq_bits, args.calibration, n_cal=args.n_cal)
        batches = _data_module(args.config, None).calibration_batches(args.n_cal)
        model = post_training_quantize(model, batches, cfg, bias_correction=args.bias_correction)
    return model, hp


def _data_module(config: str | None, num_val: int | None):
    """The data of a training config (default: the synthetic set), un-augmented, told the model's head size."""
    from fqn.data.datamodule import DetectionDataModule

    overrides = {"augment": False, **({"num_val": num_val} if num_val is not None else {})}
    return DetectionDataModule.from_config(load_config(config), **overrides)


def _add_ptq_arguments(parser: argparse.ArgumentParser) -> None:
    """How a PTQ row quantizes: the activation-range rule and bias correction (convert and compare alike)."""
    from fqn.ptq import CALIBRATIONS

    parser.add_argument("--calibration", default="search", choices=CALIBRATIONS,
                        help="PTQ activation ranges: search (per layer, the least measured error of min/max, "
                        "percentile and L2; default), or one rule for every layer")
    parser.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=False,
                        help="PTQ: remove each layer's weight-rounding shift of its output mean (default: off; it "
                        "did not pay on the synthetic benchmark, see the README)")


def convert_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="fqn convert", description="write a QAT checkpoint (or, with --ptq-bits, a PTQ of a float checkpoint) "
        "as one int8 ONNX file that ONNX Runtime and OpenVINO run on integer kernels (at <= 4 bits, also a "
        "packed-INT4 copy for storage)")
    parser.add_argument("checkpoint", help="a QAT checkpoint (runs/.../last.ckpt); a float one needs --ptq-bits")
    parser.add_argument("output", help="the .onnx file to write")
    parser.add_argument("--ptq-bits", type=int, choices=range(2, 9), metavar="{2..8}",
                        help="post-training quantize a float checkpoint at this bit-width first")
    _add_ptq_arguments(parser)
    parser.add_argument("--n-cal", type=int, default=20, help="calibration batches (PTQ)")
    parser.add_argument("--config", help="training config whose data: section gives the calibration data")
    args = parser.parse_args(argv)
    from fqn.data.synthetic import synthetic_scenes
    from fqn.int8 import convert_int8

    model, hp = _quantized_model(args, "fqn convert", "convert", 8)
    example = synthetic_scenes(1, hp["min_size"])
    cfg = model.fqn_config
    meta = {"source": str(args.checkpoint)}
    path = convert_int8(model, args.output, example, metadata=meta)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {cfg.flags} w{cfg.bits_w}a{cfg.bits_a}): the file to "
          "deploy; ONNX Runtime and OpenVINO run it on integer kernels as they open it. Try it with "
          f"`fqn predict {path} IMAGE_OR_FOLDER --out OUT` or fqn.load_int8('{path}')")
    if cfg.bits_w <= 4:
        packed = convert_int8(model, Path(args.output).with_suffix(".int4.onnx"), example, metadata=meta,
                              pack_int4=True)
        print(f"wrote {packed} ({packed.stat().st_size / 1e6:.1f} MB): the same model with packed INT4 weights, "
              "for storage and transfer; fqn.load_int8 runs it (widening the weights in memory), a plain runtime "
              "session runs it slower than float")


def compare_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="fqn compare", description="FP32 vs fqn PTQ vs fqn QAT vs ORT / torchao PTQ: accuracy, size, latency")
    parser.add_argument("--float", dest="float_ckpt", help="the FP32 checkpoint (default: the float model the first "
                        "--qat checkpoint was fine-tuned from: its init_from, or its torchvision weights)")
    parser.add_argument("--qat", nargs="*", default=[], help="QAT checkpoints (any bit-widths)")
    parser.add_argument("--out", required=True, help="output folder (compare.json, .onnx files, tensorboard/)")
    parser.add_argument("--config", help="training config whose data: section gives the val/calibration data")
    parser.add_argument("--ptq-bits", type=int, nargs="*", default=[8, 4])
    _add_ptq_arguments(parser)
    parser.add_argument("--n-cal", type=int, default=20)
    parser.add_argument("--peers", nargs="*", default=["ort", "torchao"], choices=["ort", "torchao"])
    parser.add_argument("--runs", type=int, default=20, help="timed runs per model (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-val", type=int, help="synthetic validation images (default: the config's)")
    parser.add_argument("--runtimes", nargs="+", choices=["onnxruntime", "openvino"],
                        help="where the ONNX files run (default: ONNX Runtime, and OpenVINO when installed)")
    args = parser.parse_args(argv)
    from fqn.commands.compare import run_compare

    cmp = run_compare(args.float_ckpt, args.qat, args.out, _data_module(args.config, args.num_val),
                      ptq_bits=args.ptq_bits, calibration=args.calibration,
                      bias_correction=args.bias_correction, n_cal=args.n_cal, peers=args.peers,
                      runs=args.runs, threads=args.threads, runtimes=args.runtimes)
    print(cmp.markdown())
    print(f"\nresults: {cmp.out / 'compare.json'}; TensorBoard: tensorboard --logdir {cmp.out / 'tensorboard'}")


def predict_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="fqn predict", description="run an int8 .onnx file (or a checkpoint) on an image, a folder of images or "
        "a video: detections as COCO-style JSON, drawn images (or a drawn video), images/s")
    parser.add_argument("model", help="a .onnx file written by fqn convert, or a checkpoint (.ckpt)")
    parser.add_argument("source", help="an image, a folder of images, or a video (.mp4, .avi, ...)")
    parser.add_argument("--out", required=True, help="output folder: detections.json and drawn/")
    parser.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime", "openvino"],
                        help="runtime of a .onnx model (a checkpoint runs in PyTorch)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--min-score", type=float, default=0.05, help="detections below are left out of the JSON")
    parser.add_argument("--draw-score", type=float, default=0.5, help="detections below are not drawn")
    parser.add_argument("--no-draw", action="store_true", help="write the JSON only")
    parser.add_argument("--class-names", nargs="+", help="names of labels 1, 2, ... (default: class_1, ...)")
    a = parser.parse_args(argv)
    from fqn.commands.predict import run_predict

    r = run_predict(a.model, a.source, a.out, runtime=a.runtime, threads=a.threads, min_score=a.min_score,
                    draw_score=a.draw_score, draw=not a.no_draw, class_names=a.class_names)
    print(f"{r.images} image(s), {r.detections} detections >= {a.min_score}; {r.images_per_second:.2f} images/s in "
          f"the detector ({r.images / r.total_seconds:.2f} images/s with reading and drawing)")
    if r.skipped:
        print(f"skipped {len(r.skipped)}: " + "; ".join(s["reason"] for s in r.skipped[:5]))
    print(f"detections: {r.json_path}" + (f"; drawn: {r.drawn}" if r.drawn else ""))


SUBCOMMANDS = {"convert": convert_main, "predict": predict_main,
               "compare": compare_main, "ablate": ablate_main, "analyze": analyze_main,
               "quickstart": quickstart_main, "demo": demo_main}


#: What a person can fix from one line: bad data or config values, missing files, bad command-line arguments.
USER_ERRORS = (ValueError, OSError, argparse.ArgumentError)
_NOISE = ("Subtypes:", "Given value", "Errors:", "Does not validate against any of the Union subtypes",
          "- Expected a <class 'NoneType'>")


def error_line(err: BaseException) -> str:
    r"""One line of ``err``'s message: a DataLoader worker's re-raise keeps the original message, jsonargparse's
    nested type errors keep their reasons, and an error raised outside fqn points to ``--debug``.

    Example:
        >>> error_line(ValueError("Parser key 'model.quant':\n  Errors:\n    - bits_w must be an integer"))
        "Parser key 'model.quant': bits_w must be an integer (fqn --debug shows the traceback)"
    """
    text, raised_in_fqn = str(err), _raised_in_fqn(err)
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: the last line is "module.Error: message"
        files = re.findall(r'File "([^"]+)"', text)
        raised_in_fqn = bool(files) and _in_fqn(files[-1])
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    lines = [line.strip().removeprefix("- ") for line in text.splitlines()]
    line = " ".join(x for x in lines if x and not x.startswith(_NOISE)) or type(err).__name__
    if isinstance(err, argparse.ArgumentError):
        return f"{line} (--help lists the options)"
    return line if raised_in_fqn else f"{line} (fqn --debug shows the traceback)"


def _raised_in_fqn(err: BaseException) -> bool:
    """Whether ``err`` was raised by fqn's own code, whose messages say what to do (not by a library below it)."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return _in_fqn(tb.tb_frame.f_code.co_filename)


def _in_fqn(filename: str) -> bool:
    return Path(filename).resolve().is_relative_to(Path(__file__).resolve().parents[1])  # the fqn package


def main(argv: list[str] | None = None) -> int:
    """Run one ``fqn`` command; a user error raises ``SystemExit("fqn CMD: one line")`` (exit status 1).

    ``fqn --debug CMD ...`` or the environment variable ``FQN_DEBUG=1`` lets the error through with its traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("FQN_DEBUG", "") not in ("", "0")
    while argv and argv[0] == "--debug":
        debug, argv = True, argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    command = argv[0] if argv else None
    if command not in LIGHTNING_COMMANDS and command not in SUBCOMMANDS:
        print("usage: fqn [--debug] {fit,validate,test} [--config FILE] [--key value ...]\n"
              f"       fqn [--debug] {{{','.join(SUBCOMMANDS)}}} --help\n"
              "       fqn fit --help | fqn fit --print_config\n"
              "--debug (or FQN_DEBUG=1): show the traceback of a data or config error", file=sys.stderr)
        return 0 if command in ("-h", "--help") else 2
    try:
        if command in LIGHTNING_COMMANDS:
            lightning_main(argv)
        else:
            SUBCOMMANDS[command](argv[1:])
    except USER_ERRORS as err:
        if debug:
            raise
        raise SystemExit(f"fqn {command}: {error_line(err)}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
