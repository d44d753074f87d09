"""One cached step on the first retrieval and the first clustering batch of the demo sample;
saves the parameter gradients (rank 0) and, per rank, what DDP all-reduced. Run with
`python` (world 1) or `torchrun` (world N): tests/test_distributed.py compares the two (I1)
and counts the all-reduces (one per bucket per step)."""
import json
import os
import sys

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data as D  # noqa: E402
import model as M  # noqa: E402
import train  # noqa: E402


def step_gradients(tokenizer_dir, demo_dir, batch_size, chunk_tokens, max_length=48):
    rank, world, device = train.setup_distributed()
    tokenizer = M.AutoTokenizer.from_pretrained(tokenizer_dir)
    backbone = M.tiny_backbone(tokenizer, seed=0)
    # small buckets, so the tiny model's gradients travel in several all-reduces
    ddp = train.wrap_ddp(backbone, device, bucket_cap_mb=0.1) if world > 1 else None
    reduced = []  # (bucket index, elements) of every gradient all-reduce DDP issues

    def counting_hook(state, bucket):
        reduced.append((bucket.index(), bucket.buffer().numel()))
        return default_hooks.allreduce_hook(None, bucket)
    if ddp:
        ddp.register_comm_hook(None, counting_hook)
    stream = D.BatchStream(D.load_sources(demo_dir, seed=0), batch_size, seed=0)
    grads, losses, collectives = {}, {}, {}
    for task_type in ("retrieval", "clustering"):
        batch = next(b for b in stream if b.task_type == task_type).shard(rank, world)
        seqs, _ = train.batch_sequences(batch, tokenizer, max_length)
        reduced.clear()
        m = train.cached_step(backbone, seqs, train.step_loss(batch, 0.05), chunk_tokens, ddp=ddp)
        grads[task_type] = {n: p.grad.clone() for n, p in backbone.named_parameters()}
        losses[task_type] = train.all_mean(m["loss"], device)
        collectives[task_type] = dict(chunks=m["chunks"], allreduces=len(reduced),
                                      buckets=len({i for i, _ in reduced}),
                                      elements=sum(n for _, n in reduced),
                                      parameters=sum(p.numel() for p in backbone.parameters()))
        backbone.zero_grad(set_to_none=True)
    return rank, grads, losses, collectives


if __name__ == "__main__":
    tokenizer_dir, demo_dir, out, batch_size, chunk_tokens = sys.argv[1:6]
    rank, grads, losses, collectives = step_gradients(tokenizer_dir, demo_dir, int(batch_size), int(chunk_tokens))
    if rank == 0:
        torch.save({"grads": grads, "losses": losses}, out)
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump(collectives, f)
    train.teardown()
