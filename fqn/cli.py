"""The ``fqn`` command. Thin: LightningCLI for fit/validate/test, plus the quickstart.

    fqn fit --config configs/synthetic_float.yaml
    fqn fit --config configs/synthetic_w4a4.yaml --trainer.max_steps 500
    fqn validate --config configs/synthetic_w4a4.yaml --ckpt_path runs/.../last.ckpt
    fqn fit --print_config
"""

from __future__ import annotations

import argparse
import logging
import sys

LIGHTNING_COMMANDS = ("fit", "validate", "test")


def lightning_main(argv: list[str]) -> None:
    """Run a LightningCLI subcommand on `DetectionModule` and `DetectionDataModule`."""
    import tempfile

    from pytorch_lightning.cli import LightningCLI

    from fqn.data.datamodule import DetectionDataModule
    from fqn.train.module import DetectionModule

    sys.argv = sys.argv[:1]  # the arguments come through args=, expanded
    with tempfile.TemporaryDirectory(prefix="fqn-config-") as tmp:
        LightningCLI(DetectionModule, DetectionDataModule, args=expand_config_bases(argv, tmp),
                     seed_everything_default=0, save_config_kwargs={"overwrite": True})


def expand_config_bases(argv: list[str], tmp_dir: str) -> list[str]:
    """Replace ``--config FILE`` by the chain of its ``__base__`` files followed by FILE itself.

    A config may start with ``__base__: base.yaml`` (a path relative to it), so overrides stay short;
    each file of the chain is passed to LightningCLI as its own ``--config``, base first; the
    overrides, stripped of ``__base__``, are written to ``tmp_dir``.
    """
    from pathlib import Path

    import yaml

    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        path = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        if path is None:
            out.append(arg)
            i += 1
            continue
        chain = []
        current = Path(path)
        while True:
            if not current.is_file():
                raise SystemExit(f"fqn: config file {current} not found")
            data = yaml.safe_load(current.read_text()) or {}
            base = data.pop("__base__", None) if isinstance(data, dict) else None
            if base is None:
                chain.append(str(current))
                break
            stripped = Path(tmp_dir) / f"{len(out)}_{len(chain)}_{current.name}"
            stripped.write_text(yaml.safe_dump(data))
            chain.append(str(stripped))
            current = current.parent / base
        for item in reversed(chain):
            out += ["--config", item]
        i += 1 if arg.startswith("--config=") else 2
    return out


def quickstart_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="fqn quickstart", description="demo: prepare, calibrate and compare "
                                     "w8a8/w4a4 detectors against the float one")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--n-cal", type=int, default=4)
    args = parser.parse_args(argv)
    from fqn.demo import print_demo, run_demo

    print_demo(run_demo(args.backbone, args.size, args.n_cal))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] in LIGHTNING_COMMANDS:
        lightning_main(argv)
    elif argv and argv[0] == "quickstart":
        quickstart_main(argv[1:])
    else:
        print("usage: fqn {fit,validate,test,quickstart} [--config FILE] [--key value ...]\n"
              "       fqn fit --help | fqn fit --print_config", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
