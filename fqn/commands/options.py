"""The options several ``fqn`` commands share, one builder each, so every command spells, types and defaults an option
the same way (``tests/test_cli.py`` checks it across the parsers; the vocabulary is in `fqn.commands.cli`'s docstring).
"""

from __future__ import annotations

import argparse

from fqn.ptq import CALIBRATIONS
from fqn.quant.reconstruction import METHODS, ReconstructionConfig

RUNTIMES = ("onnxruntime", "openvino")
PEERS = ("onnxruntime", "torchao")
BITS = range(2, 9)


def command_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The parser of ``fqn NAME``; its help shows every option's default."""
    return argparse.ArgumentParser(prog=f"fqn {name}", description=description,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def add_model(p: argparse.ArgumentParser, what: str) -> None:
    """The one model a command reads, as its first argument."""
    p.add_argument("model", metavar="MODEL", help=what)


def add_out(p: argparse.ArgumentParser, what: str, default: str | None = None) -> None:
    """``--out DIR``: required unless ``default``; ``what`` says what the command writes there."""
    p.add_argument("--out", metavar="DIR", required=default is None, default=default,
                   help=f"output folder: {what}; an earlier result there is never overwritten")


def add_config(p: argparse.ArgumentParser, what: str = "data") -> None:
    """``--config NAME|FILE``: the training config whose ``what`` the command uses instead of the checkpoint's."""
    p.add_argument("--config", metavar="NAME|FILE",
                   help=f"training config whose {what} to use: a config fqn ships (e.g. synthetic_w4a4) or a YAML "
                   "file (default: the data the model was trained on, as its checkpoint records it)")


def add_bits(p: argparse.ArgumentParser, flag: str, what: str, default: list[int] | int | None, many: bool = True,
             none: str | None = None) -> None:
    """``--ptq-bits`` / ``--qat-bits``; ``none``: the help of its ``--no-ptq`` / ``--no-qat`` switch."""
    p.add_argument(flag, type=int, choices=BITS, metavar="BITS", nargs="+" if many else None, default=default,
                   help=f"{what} (weights and activations, 2-8)")
    if none:
        p.add_argument(f"--no-{flag[2:].removesuffix('-bits')}", dest=flag[2:].replace("-", "_"),
                       action="store_const", const=[], help=none)


def add_ptq_options(p: argparse.ArgumentParser) -> None:
    """How fqn's PTQ quantizes: the activation-range rule, bias correction, calibration batches."""
    p.add_argument("--calibration", default="search", choices=CALIBRATIONS,
                   help="PTQ activation ranges: search (per layer, the least measured error of min/max, percentile "
                   "and L2), or one rule for every layer")
    p.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=False,
                   help="PTQ: remove each layer's weight-rounding shift of its output mean")
    p.add_argument("--n-cal", type=int, default=20, metavar="N", help="calibration batches (training images, "
                   "un-augmented, drawn with the data seed)")
    p.add_argument("--head-bits", type=int, choices=BITS, metavar="BITS",
                   help="PTQ: the detection heads' layers (RPN head, box predictor) at this bit-width, the rest at "
                   "--ptq-bits (default: the same as --ptq-bits)")
    add_reconstruction(p, "PTQ")


def add_reconstruction(p: argparse.ArgumentParser, what: str) -> None:
    """``--reconstruction METHOD`` and ``--reconstruction-iters N``: learned rounding after calibration."""
    p.add_argument("--reconstruction", choices=METHODS, help=f"{what}: after calibration, learn each weight's "
                   "rounding (and, brecq/qdrop, the activation steps) block by block on the calibration batches "
                   "(default: nearest rounding)")
    p.add_argument("--reconstruction-iters", type=int, default=ReconstructionConfig().iters, metavar="N",
                   help="optimisation steps per block of --reconstruction")


def add_threads(p: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's default (one per core) unless given."""
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: torch's, one per core)")


def add_runtime(p: argparse.ArgumentParser, many: bool) -> None:
    """``--runtime``: one runtime for an ``.onnx`` model, or (``many``) the runtimes every int8 file runs in."""
    if many:
        p.add_argument("--runtime", nargs="+", choices=RUNTIMES, metavar="RUNTIME",
                       help="where the .onnx files run: onnxruntime, openvino (default: both, where OpenVINO is "
                       "installed)")
    else:
        p.add_argument("--runtime", default="onnxruntime", choices=RUNTIMES, help="runtime of an .onnx model "
                       "(a checkpoint runs in PyTorch)")


def add_peers(p: argparse.ArgumentParser, default: list[str]) -> None:
    """``--peers`` and ``--no-peers``: the other PTQ tools compared on the same float model."""
    p.add_argument("--peers", nargs="+", choices=PEERS, default=default, metavar="PEER",
                   help="other PTQ tools on the same float model: onnxruntime (its quantize_static), torchao (pt2e "
                   "X86InductorQuantizer)")
    p.add_argument("--no-peers", dest="peers", action="store_const", const=[], help="no peer rows")


def add_num_val(p: argparse.ArgumentParser, default: int | None = None) -> None:
    """``--num-val N``: the synthetic set's validation images, instead of the data settings'."""
    p.add_argument("--num-val", type=int, metavar="N", default=default,
                   help="validation images of the synthetic set (default: the data settings')")


def add_ptq_measurement(p: argparse.ArgumentParser) -> None:
    """A PTQ measurement tool's inputs (``tools/ptq_*.py``): the FP32 checkpoint, its data, the output folder, the
    calibration batches, the validation images and the threads, spelled as the commands spell them."""
    p.add_argument("float_ckpt", metavar="CKPT", help="the FP32 checkpoint")
    add_config(p)
    p.add_argument("--out", metavar="DIR", required=True, help="output folder: the rows as JSON and Markdown")
    p.add_argument("--n-cal", type=int, default=20, metavar="N", help="calibration batches (training images, "
                   "un-augmented, drawn with the data seed)")
    add_num_val(p)
    p.add_argument("--threads", type=int, default=2, metavar="N", help="CPU threads")
    p.add_argument("--resume", action="store_true", help="keep the rows an interrupted run with the same inputs "
                   "already wrote to --out and measure only the rest")
