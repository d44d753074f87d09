"""One cached step on the first retrieval and the first clustering batch of the demo sample;
saves the parameter gradients (rank 0). Run with `python` (world 1) or `torchrun` (world N):
tests/test_distributed.py compares the two (invariant I1)."""
import contextlib
import os
import sys

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data as D  # noqa: E402
import model as M  # noqa: E402
import train  # noqa: E402


def step_gradients(tokenizer_dir, demo_dir, batch_size, chunk_size, max_length=48):
    rank, world, device = train.setup_distributed()
    tokenizer = M.AutoTokenizer.from_pretrained(tokenizer_dir)
    backbone = M.tiny_backbone(tokenizer, seed=0)
    ddp = DDP(backbone) if world > 1 else None
    cfg = train.Config(batch_size=batch_size, chunk_size=chunk_size, max_length=max_length)
    stream = D.BatchStream(D.load_sources(demo_dir, seed=0), batch_size, seed=0)
    grads, losses = {}, {}
    for task_type in ("retrieval", "clustering"):
        batch = next(b for b in stream if b.task_type == task_type)
        m = train.cached_step(backbone, ddp, batch.shard(rank, world), tokenizer, cfg, device,
                              contextlib.nullcontext)
        grads[task_type] = {n: p.grad.clone() for n, p in backbone.named_parameters()}
        losses[task_type] = train.all_mean(m["loss"], device)
        backbone.zero_grad(set_to_none=True)
    return rank, grads, losses


if __name__ == "__main__":
    tokenizer_dir, demo_dir, out, batch_size, chunk_size = sys.argv[1:6]
    rank, grads, losses = step_gradients(tokenizer_dir, demo_dir, int(batch_size), int(chunk_size))
    if rank == 0:
        torch.save({"grads": grads, "losses": losses}, out)
    train.teardown()
