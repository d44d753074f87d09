"""One cached step on the first retrieval and the first clustering batch of the demo sample,
for the recipe and each option of tests/options.py (Matryoshka, LoRA, the official detached
gather, no in-batch term, another temperature, distillation from another tiny model in each
mode); saves the trained parameters' gradients (rank 0) and, per rank, what DDP all-reduced.
Run under `torchrun` (world N); tests/test_distributed.py calls `step_gradients` in its own
process for world 1, compares the two (I1) and counts the all-reduces (one per bucket per
step)."""
import contextlib
import gc
import json
import os
import sys

gc.disable()  # as train.py: the imports' objects are frozen out of every collection
import torch
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from options import OPTIONS, backbone, config, teacher
from transformers import AutoTokenizer

import data as D
import model as M
import train
from loss import f2llm_loss, hard_negative_loss, in_batch_loss
from runtime import attention as A
from runtime import tokens as T

gc.freeze()
gc.enable()


def official_reference_loss(batch, teacher_states=None):
    """What the official code's detached gather amounts to, written for ONE process: the
    in-batch term sees every positive without gradient (its own rank's included)."""
    b, k = len(batch.queries), len(batch.negatives[0])

    def loss_fn(reps):
        q, p = reps[:b], reps[b:2 * b]
        hard = hard_negative_loss(q, p, reps[2 * b:].view(b, k, -1))
        in_batch = in_batch_loss(q,
                                 p.detach()) if batch.task_type == "retrieval" else torch.zeros(())
        return hard + in_batch, hard, in_batch
    return loss_fn


def official_kd_loss(batch, teacher_states):
    """F2LLM v2's loss with a teacher, written for ONE process from its utils.py: the recipe +
    F.mse_loss of the raw query, positive and negative states, the teacher cut to D."""
    b, k = len(batch.queries), len(batch.negatives[0])

    def loss_fn(states):
        total, hard, in_batch = f2llm_loss(states, b, k, batch.task_type == "retrieval")
        t = teacher_states[:, :states.shape[1]]
        kd = sum(F.mse_loss(states[g], t[g]) for g in (slice(0, b), slice(b, 2 * b),
                                                        slice(2 * b, None)))
        return total + kd, hard, in_batch, kd
    return loss_fn


# the one-process references some options are held to instead of train.step_loss: their
# formula written out (2 ranks of train.step_loss must give these gradients)
ONE_PROCESS_REFERENCES = {"detached": official_reference_loss, "kd-v2": official_kd_loss}


def step_gradients(tokenizer_dir, demo_dir, batch_size, chunk_tokens, max_length=48,
                   options=tuple(OPTIONS), varlen=False, world_info=None):
    """For each option, a fresh tiny model (options.backbone: with LoRA adapters for "lora")
    and one cached step on a retrieval batch (the recipe: and a clustering batch), on the
    attention train.py chooses on this CPU: sdpa rows, or with varlen the CUDA layout (one
    varlen row per chunk, forced). world_info: train.setup_distributed()'s (rank, world,
    device); one process by default."""
    rank, world, device = world_info or (0, 1, torch.device("cpu"))
    attn = A.attention_implementation(device, bf16=False, forced=varlen)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    sources = T.load_tokenized(demo_dir, tokenizer, max_length, demo_dir + "_tokens", seed=0)
    grads, losses, collectives = {}, {}, {}
    teacher_net = teacher(tokenizer, attn)
    for option in options:
        cfg = config(option)
        net = backbone(tokenizer, cfg, attn)
        # small buckets, so the tiny model's gradients travel in several all-reduces
        ddp = train.wrap_ddp(net, device, bucket_cap_mb=0.1) if world > 1 else None
        reduced = []  # (bucket index, elements) of every gradient all-reduce DDP issues

        def counting_hook(state, bucket):
            reduced.append((bucket.index(), bucket.buffer().numel()))
            return default_hooks.allreduce_hook(None, bucket)
        if ddp:
            ddp.register_comm_hook(None, counting_hook)
        stream = D.BatchStream(sources, batch_size, seed=0)
        for task_type in ("retrieval", "clustering") if option == "recipe" else ("retrieval",):
            batch = next(b for b in stream if b.task_type == task_type).shard(rank, world)
            teacher_states = train.embed_chunks(  # the teacher embeds this rank's sequences
                teacher_net, M.packed_chunks(teacher_net, batch.sequences(), chunk_tokens),
                contextlib.nullcontext()) if cfg.teacher else None
            loss_fn = ONE_PROCESS_REFERENCES[option](batch, teacher_states) if (
                world == 1 and option in ONE_PROCESS_REFERENCES) else train.step_loss(
                batch, cfg, teacher_states)
            reduced.clear()
            seqs = batch.sequences()
            chunks = M.packed_chunks(net, seqs, chunk_tokens)
            step_losses = train.cached_step(ddp or net, chunks, loss_fn, contextlib.nullcontext())
            key = f"{option}/{task_type}"
            grads[key] = {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}
            losses[key] = train.all_means(step_losses[:1])[0]
            collectives[key] = dict(chunks=len(chunks), allreduces=len(reduced), attention=attn,
                                    computed_tokens=sum(p.computed_tokens for p, _ in chunks),
                                    real_tokens=sum(len(s) for s in seqs),
                                    buckets=len({i for i, _ in reduced}),
                                    elements=sum(n for _, n in reduced),
                                    parameters=sum(p.numel() for p in net.parameters() if p.requires_grad))
            net.zero_grad(set_to_none=True)
    return rank, grads, losses, collectives


if __name__ == "__main__":
    # TOKENIZER DATA OUT BATCH CHUNK_TOKENS PATH=OPTIONS ...: for each attention path (sdpa or
    # varlen) the step of those options, in OUT.PATH.pt (rank 0) and OUT.PATH.rankN.json
    tokenizer_dir, demo_dir, out, batch_size, chunk_tokens, *runs = sys.argv[1:]
    world_info = train.setup_distributed()
    for run in runs:
        path, options = run.split("=")
        rank, grads, losses, collectives = step_gradients(
            tokenizer_dir, demo_dir, int(batch_size), int(chunk_tokens),
            options=options.split(","), varlen=path == "varlen", world_info=world_info)
        if rank == 0:
            torch.save({"grads": grads, "losses": losses}, f"{out}.{path}.pt")
        with open(f"{out}.{path}.rank{rank}.json", "w") as f:
            json.dump(collectives, f)
    train.teardown()
