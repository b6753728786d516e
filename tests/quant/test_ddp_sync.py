"""Under DDP (2 CPU processes, gloo) every rank ends calibration with identical activation ranges."""

from __future__ import annotations

import os
import pickle
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fqn.quant.observers import EMAMinMaxObserver, MinMaxObserver, PercentileObserver
from fqn.quant.range_search import L2HistogramObserver, SearchObserver


def rank_data(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    scale = 1.0 if rank == 0 else 7.0  # very different ranges, so the ranks' histogram grids differ
    return [torch.randn(4000, generator=g) * scale + rank for _ in range(3)] + [torch.empty(0)]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    observers = {"percentile": PercentileObserver(0.999), "ema": EMAMinMaxObserver(0.9), "minmax": MinMaxObserver(),
                 "histogram": L2HistogramObserver(4), "search": SearchObserver(4)}
    for obs in observers.values():
        for x in rank_data(rank):
            obs(x)
        obs.sync()
    ranges = {k: [float(t) for t in obs.compute_range()] for k, obs in observers.items()}
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(ranges, f)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # spawns two processes (DDP on gloo)
def test_ranks_hold_identical_ranges_after_sync(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = pickle.loads((tmp_path / "rank0.pkl").read_bytes())
    r1 = pickle.loads((tmp_path / "rank1.pkl").read_bytes())
    assert r0 == r1  # bit-identical on both ranks
    data = torch.cat([x for r in (0, 1) for x in rank_data(r)]).double()
    lo, hi = r0["minmax"]
    assert (lo, hi) == (float(data.min().float()), float(data.max().float()))
    single = PercentileObserver(0.999)
    single(data.float())
    lb, ub = r0["percentile"]
    assert abs(lb - float(torch.quantile(data, 0.001))) <= 2 * single.bin_width
    assert abs(ub - float(torch.quantile(data, 0.999))) <= 2 * single.bin_width
