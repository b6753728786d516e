"""Run by test_ddp.py: 2-process DDP QAT on a tiny model (CPU: gloo; CUDA: NCCL); each rank dumps ranges and weights."""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fqn import QuantConfig  # noqa: E402
from fqn.quant.fake_quant import quantizers  # noqa: E402
from tests.train.tiny import tiny_data, tiny_module, tiny_trainer  # noqa: E402


def act_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: torch.cat([fq.scale, fq.zero_point.float()]).cpu() for n, fq in quantizers(model, "act")}


class Dump(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0:  # right after calibration
            torch.save(act_state(pl_module.model), self.out / f"calibrated_rank{trainer.global_rank}.pt")

    def on_train_end(self, trainer, pl_module):
        weights = {k: v.cpu() for k, v in pl_module.model.state_dict().items()}
        torch.save({"acts": act_state(pl_module.model), "weights": weights,
                    "first_image_sum": float(self.first)}, self.out / f"final_rank{trainer.global_rank}.pt")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1:
            self.first = batch[0][0].sum()  # proves the ranks saw different shards


def main(out: Path, init_from: Path, accelerator: str = "cpu") -> None:
    cfg = QuantConfig(bits_w=4, bits_a=4, n_cal=2, percentile=False)  # EMA ranges keep moving in training
    model = tiny_module(quant=cfg, init_from=str(init_from))
    trainer = tiny_trainer(str(out), max_steps=3, limit_val_batches=0, devices=2, strategy="ddp",
                           accelerator=accelerator, callbacks=[Dump(out)])
    trainer.fit(model, tiny_data())


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:])
