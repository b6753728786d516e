"""``fqn fit | validate | test``: LightningCLI on `DetectionModule` and `DetectionDataModule`, with stable run folders.

A run of ``--config NAME`` lives in ``runs/NAME/``: TensorBoard events, ``config.yaml``, ``hparams.yaml`` and
``checkpoints/last.ckpt`` (every 50 steps) and ``checkpoints/best-*.ckpt``. The folder is known before the run starts,
so the docs and the next config (``init_from: runs/synthetic_float/checkpoints/last.ckpt``) can name it; Lightning's
``version_N`` numbering, which sends a second run of a config elsewhere and leaves every written path pointing at the
first, is not used. A second ``fit`` into a folder that holds a run is refused (resume it with ``--ckpt_path``, or
name another folder with ``--trainer.logger.init_args.name``); ``validate`` and ``test`` log into ``runs/NAME/validate``
and ``runs/NAME/test``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from pytorch_lightning.cli import LightningCLI

from fqn.commands.config_files import config_name, expand_config_bases
from fqn.data.datamodule import DetectionDataModule
from fqn.train.module import DetectionModule

TENSORBOARD = "pytorch_lightning.loggers.TensorBoardLogger"


def run_name(argv: list[str]) -> str:
    """The run folder's name: the last ``--config``'s name (``configs/street_w4a4.yaml`` -> ``street_w4a4``)."""
    names = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    names += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    return config_name(names[-1]) if names else "fqn"


def held_run(folder: Path) -> str | None:
    """What an earlier run left in ``folder`` (a checkpoint, TensorBoard events), or None when it holds none."""
    ckpts = sorted((folder / "checkpoints").glob("*.ckpt"))
    if ckpts:
        return f"{ckpts[0]}"
    events = sorted(folder.glob("events.out.tfevents.*"))
    return f"TensorBoard events {events[0].name}" if events else None


class FqnCLI(LightningCLI):
    """LightningCLI with the data linked to the head's size and one run folder per config."""

    run_name = "fqn"

    def add_arguments_to_parser(self, parser: Any) -> None:
        # the data needs the head's size: a 91-class head is torchvision's COCO head (labels = category ids)
        parser.link_arguments("model.num_classes", "data.head_classes", apply_on="parse")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        logger = config.trainer.logger
        if not hasattr(logger, "class_path") or logger.class_path != TENSORBOARD:
            return  # no logger, or one the user chose: Lightning's own folders
        args = logger.init_args
        if not args.get("name"):
            args.name = self.run_name
        if args.get("version") is None:
            args.version = "" if self.subcommand == "fit" else self.subcommand
        folder = Path(args.save_dir or ".") / args.name
        rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
        if self.subcommand == "fit" and args.version == "" and config.get("ckpt_path") is None and rank == 0:
            earlier = held_run(folder)
            if earlier:
                raise FileExistsError(
                    f"{folder} already holds a run ({earlier}); fqn does not train over it. Resume it with "
                    f"--ckpt_path {folder / 'checkpoints' / 'last.ckpt'}, or start another run beside it with "
                    f"--trainer.logger.init_args.name {args.name}_2")


def run_lightning(argv: list[str]) -> None:
    """``fqn fit|validate|test ...``: the ``--config`` chains expanded for LightningCLI, the run folder named."""
    cli = type("FqnRunCLI", (FqnCLI,), {"run_name": run_name(argv)})
    sys.argv = sys.argv[:1]  # the arguments come through args=, expanded
    with tempfile.TemporaryDirectory(prefix="fqn-config-") as tmp:
        cli(DetectionModule, DetectionDataModule, args=expand_config_bases(argv, tmp), seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False})  # a parse error is one line from main(), not the usage
