"""DDP without the per-step buffer broadcast (jobs.train_worker._ddp): two real gloo ranks in child
processes train on different data; every pass ends with the BatchNorm statistics of the model and
its EMA averaged over the ranks, so both ranks validate and checkpoint the same model."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from imgcls_core.config import load_config
from imgcls_core.engine import Engine, setup_runtime
from imgcls_core.engine.loop import ddp_without_buffer_broadcast
from imgcls_core.models import create_model
from jobs.common import free_port


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        cfg = load_config(None, ["model.name=cnn3", "model.width=0.25", "data.batch_size=8", "train.ema_decay=0.9"])
        model = create_model("cnn3", 3, width=0.25)
        # the wrap jobs.train_worker uses, without Ray: no buffer broadcast in forward
        engine = Engine(cfg, model, setup_runtime(cfg.train), steps_per_epoch=3, world_size=2, rank=rank,
                        wrap=lambda m: DistributedDataParallel(m, **ddp_without_buffer_broadcast()))
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own data: its own BN statistics
        batches = [(torch.randn(8, 3, 16, 16, generator=g) * (1 + rank), torch.randint(0, 3, (8,), generator=g))
                   for _ in range(3)]
        engine.train_epoch(batches[:1])
        state = {k: v for k, v in engine.model.state_dict().items() if v.is_floating_point()}
        ema = {k: v for k, v in engine.ema.module.state_dict().items() if v.is_floating_point()}
        torch.save({"model": state, "ema": ema}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_end_each_pass_with_the_same_buffers(tmp_path):

    port = free_port()
    mp.start_processes(_rank, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    running = [k for k in r0["model"] if k.endswith("running_mean")]
    assert running, "cnn3 has BatchNorm layers"
    for part in ("model", "ema"):
        for key, value in r0[part].items():
            torch.testing.assert_close(value, r1[part][key], msg=f"{part} {key} differs between ranks")
    # the ranks saw different data, so the averaged statistics are not the initial ones (0 mean)
    assert any(r0["model"][k].abs().sum() > 0 for k in running)


def test_one_process_has_nothing_to_sync():
    cfg = load_config(None, ["model.name=cnn3", "model.width=0.25"])
    engine = Engine(cfg, create_model("cnn3", 3, width=0.25), setup_runtime(cfg.train), steps_per_epoch=1)
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    engine.sync_buffers()
    assert all(torch.equal(before[k], v) for k, v in engine.model.state_dict().items())
