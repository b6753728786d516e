"""The ``fqn`` command. Thin: parses arguments and calls the library."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fqn", description="Fully quantized Faster R-CNN (FQN)")
    sub = parser.add_subparsers(dest="command", required=True)
    quick = sub.add_parser("quickstart", help="demo: prepare, calibrate and compare w8a8/w4a4 detectors")
    quick.add_argument("--backbone", default="resnet18")
    quick.add_argument("--size", type=int, default=256)
    quick.add_argument("--n-cal", type=int, default=4)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "quickstart":
        from fqn.demo import print_demo, run_demo

        print_demo(run_demo(args.backbone, args.size, args.n_cal))
    return 0


if __name__ == "__main__":
    sys.exit(main())
