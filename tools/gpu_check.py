"""The GPU check: does the cached step run the paper's per-GPU batch fast and within the
memory plan? One script, no network, nothing beyond torch, transformers, numpy and pyarrow
(no flash-attn or mteb needed; torch >= 2.10 for its varlen attention); about 5 minutes on
one H200.

    python -m tools.gpu_check                 # on a GPU machine; writes gpu_check.json
    python -m tools.gpu_check --cpu-smoke     # the same code path on a CPU with tiny shapes (tests;
                                              # writes out/gpu_check_cpu_smoke.json)

Each size runs as ONE RANK of the paper's run: the step inside DDP (a 1-process group, NCCL;
gloo on the CPU smoke), so the gradients live in DDP's buckets as on a rank of 8, with the
training loop's own optimizer, schedule, clip and zero_grad (train.setup_optimizer,
train.optimizer_step); random weights at full depth, bf16 autocast over fp32 master weights,
the paper's per-GPU batch (b = 64 queries, k = 7: 576 sequences) drawn from plan.length_mix,
the preset's packed token budget. A size whose plan does not fit the GPU found is skipped,
saying why (on >= 120 GB all three run; --layers N runs fewer layers). It prints s/step, real
tokens/s, MFU (6 N real tokens / time / the GPU's bf16 peak, N = non-embedding parameters),
the time split (pass 1, loss, pass 2, optimizer), chunks and host syncs per step; memory term
by term beside plan.memory_plan (weights, DDP's gradient buckets, AdamW states, pass 2's
transient, the peak) and the margin a rank of 8 would leave on an 80 GB card; the largest
packed-vs-padded embedding difference, the attention that ran; and the count-chunk step it
replaced (bench.count_chunk_step) on the same batch, for 0.6b and 1.7b. --cpu-smoke runs the
CUDA attention path (one varlen row per chunk, model.FORCE_VARLEN) with sdpa per sequence.
"""
import argparse
import gc
import json
import os
import sys
import time
import warnings

SIZES = ("0.6b", "1.7b", "4b")


def flags() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.gpu_check", allow_abbrev=False,
        description="The GPU check: each size's cached step on the paper's per-GPU batch at full "
                    "depth, its speed (MFU) and its memory beside the plan; about 5 minutes on "
                    "one H200.")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny shapes on CPU, the CUDA attention path, for the tests")
    parser.add_argument("--steps", type=int, default=3,
                        help="timed steps per size, after one warm-up")
    parser.add_argument("--sizes", default=",".join(SIZES),
                        help="the sizes to check, comma-separated (default: all three)")
    parser.add_argument("--layers", type=int, default=0,
                        help="run each size at this depth (0 = full; per-layer figures scale)")
    parser.add_argument("--out", default="",
                        help="the JSON of the results (default: gpu_check.json on a GPU, "
                             "out/gpu_check_cpu_smoke.json with --cpu-smoke)")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = flags()
    args = parser.parse_args(argv)
    if unknown := [s for s in args.sizes.split(",") if s not in SIZES]:
        parser.error(f"--sizes: unknown {','.join(unknown)}; use some of {','.join(SIZES)}")
    return args


if __name__ == "__main__":  # -h and a misspelt flag answer before torch and transformers load
    parse_args(sys.argv[1:])

import numpy as np
import torch
import torch.distributed as dist
from transformers import AutoModel

import model as M
import train
from bench import step as bench
from loss import f2llm_loss
from runtime import attention as A
from tools import plan

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12,
                   "B200": 2250e12}  # dense, per card
OLD_CHUNK_SIZE = {"0.6b": 16, "1.7b": 8, "4b": 2}  # the sequences-per-chunk presets before packing
CARD_80GB = 85_520_809_984  # bytes torch reports for an H100 80GB (79.65 GiB): the paper's card
PAPER_WORLD = 8  # ranks of the run a check stands for: AdamW states sharded 8 ways there
# the plan's terms that live only while pass 2 runs a chunk (the rest are held all step)
PASS_2_TERMS = ("bf16_weight_copies", "activations_bf16", "activations_fp32", "embedding_grad")
GIB = 2**30


class Clock:
    """Phase boundaries of a step: CUDA events (no host sync until read) or wall time on a
    CPU; on CUDA also the memory allocated at each boundary and its peak since the previous
    one (the caching allocator's own counters: no sync either)."""

    def __init__(self, device):
        self.device, self.marks, self.memory = device, [], {}

    def __call__(self, phase: str):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((phase, event))
            self.memory[phase] = (torch.cuda.memory_allocated(self.device),
                                  torch.cuda.max_memory_allocated(self.device),
                                  torch.cuda.max_memory_reserved(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.marks.append((phase, time.perf_counter()))

    def split(self) -> dict:
        """Seconds per phase, from the first mark ('start') on."""
        start = self.marks[0][1]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            t = [(p, start.elapsed_time(e) / 1e3) for p, e in self.marks]
        else:
            t = [(p, s - self.marks[0][1]) for p, s in self.marks]
        return {p: t1 - t0 for (_, t0), (p, t1) in zip(t, t[1:])}


class TimedChunks(list):
    """The step's chunks, marking the clock as each pass over them ends ('pass 1', 'pass 2')
    and as the second begins ('loss': the loss and its backward are done): the phases are
    timed from outside the step, which has no hook for it."""

    def __init__(self, chunks, clock):
        super().__init__(chunks)
        self.clock, self.passes = clock, 0

    def __iter__(self):
        if self.passes == 1:
            self.clock("loss")
        yield from super().__iter__()
        self.passes += 1
        self.clock(f"pass {self.passes}")


def smoke_config(config):
    """The same code with tiny shapes: 2 layers of width 64, a 500-token vocabulary."""
    config = plan.config_like(config, 2, vocab_size=500)
    config.hidden_size, config.intermediate_size, config.num_attention_heads = 64, 128, 4
    config.num_key_value_heads, config.head_dim = 2, 16
    config.bos_token_id, config.eos_token_id = 0, 1
    return config


def build(config, device, attn):
    torch.manual_seed(0)
    with torch.device(device):
        backbone = AutoModel.from_config(config, attn_implementation=attn, dtype=torch.float32)
    return backbone.train()


def batch_of(config, b, k, max_length, seed):
    lengths = plan.length_mix(np.random.default_rng(seed), b, k, max_length)
    rng = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, config.vocab_size, (n,), generator=rng).tolist() for n in lengths]
    return seqs, lambda reps: f2llm_loss(reps, b, k, in_batch=True)


def host_syncs(device, fn) -> int | None:
    """Host syncs `fn()` issues (CUDA's sync debug mode warns once per synchronising call)."""
    if device.type != "cuda":
        fn()
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def one_process_group(device) -> bool:
    """A 1-process group, so the step runs inside DDP as on one rank of many: NCCL on CUDA,
    gloo on a CPU; an in-process store, so no port is needed. False if one already exists."""
    if dist.is_initialized():
        return False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            store=dist.HashStore(), rank=0, world_size=1)
    return True


def plans(config, chunk_tokens: int, sequences: int) -> tuple[dict, dict]:
    """(what this 1-process check holds: AdamW unsharded, what the fullest rank of 8 holds)."""
    one = plan.memory_plan(config, world=1, chunk_tokens=chunk_tokens,
                           sequences_per_rank=sequences, shard_optimizer=False)
    rank = plan.memory_plan(config, world=PAPER_WORLD, chunk_tokens=chunk_tokens,
                            sequences_per_rank=sequences, shard_optimizer=True)
    return one, rank


def why_not(size: str, config, chunk_tokens: int, sequences: int, gpu_bytes: int) -> str | None:
    """None if the 1-process plan of this size fits the GPU, else the reason to skip it."""
    one, rank = plans(config, chunk_tokens, sequences)
    if one["total"] <= gpu_bytes:  # the plan's total holds the CUDA context and NCCL reserve
        return None
    return (f"{size} at {config.num_hidden_layers} layers plans {one['total'] / GIB:.1f} GiB in "
            f"one process (its AdamW states unsharded: {one['adamw_states'] / GIB:.1f} GiB; a "
            f"rank of {PAPER_WORLD} holds {rank['total'] / GIB:.1f} GiB), more than this GPU's "
            f"{gpu_bytes / GIB:.1f} GiB: run it on a GPU of >= 120 GB, or pass --layers N")


def check_size(size, config, device, attn, steps, b, k, max_length, chunk_tokens, run_old):
    cuda = device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)  # reused per pass
    allocated = (lambda: torch.cuda.memory_allocated(device)) if cuda else (lambda: 0)
    before = allocated()
    backbone = build(config, device, attn)
    weights = allocated()
    ddp = train.wrap_ddp(backbone, device)  # its buckets hold the gradients from here on
    buckets = allocated()
    cfg = train.Config(**train.PRESETS[size])  # the paper's optimizer settings for this size
    optimizer, scheduler = train.setup_optimizer(cfg, backbone, world=1, total_steps=steps + 1)
    trained = [p for p in backbone.parameters() if p.requires_grad]
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times, splits, tokens, chunks, syncs, norms, losses = [], [], 0, None, None, [], []
    pass_2, peak, peak_reserved, adamw = 0, 0, 0, 0
    for step in range(steps + 1):  # step 0 warms up (kernels, allocator)
        seqs, loss_fn = batch_of(config, b, k, max_length, seed=step)
        clock = Clock(device)
        clock("start")

        def run(out):  # the loop's step: the cached step, then clip, step, zero_grad
            chunks = TimedChunks(M.packed_chunks(backbone, seqs, chunk_tokens), clock)
            step_losses = train.cached_step(ddp, chunks, loss_fn, autocast)
            out["losses"], out["norm"], _ = train.optimizer_step(
                optimizer, scheduler, trained, cfg.grad_clip, step_losses, ddp)
            out["chunks"] = len(chunks)
        out = {}
        if step == 1:
            syncs = host_syncs(device, lambda: run(out))
        else:
            run(out)
        norms.append(out["norm"])
        losses.append(out["losses"][0])
        clock("optimizer")
        split = clock.split()
        if cuda:
            mem = clock.memory
            if step == 0:  # AdamW allocates its states at the first step
                adamw = mem["optimizer"][0] - mem["start"][0]
            pass_2 = max(pass_2, mem["pass 2"][1] - mem["loss"][0])
            peak = max(peak, *(v[1] for v in mem.values()))
            peak_reserved = max(peak_reserved, *(v[2] for v in mem.values()))
        if step:
            times.append(sum(split.values()))
            splits.append(split)
            tokens += sum(len(s) for s in seqs)
            chunks = out["chunks"]
    counts = plan.parameter_counts(config)
    n = counts["all"] - counts["embedding"]
    r = dict(size=size, layers=config.num_hidden_layers, b=b, k=k, chunk_tokens=chunk_tokens,
             chunks_per_step=chunks,
             host_syncs_per_step=syncs, s_per_step=float(np.median(times)),
             real_tokens_per_s=tokens / sum(times),
             non_embedding_params=n, losses=losses, grad_norms=norms,
             time_split_s={p: float(np.median([s[p] for s in splits])) for p in splits[0]})
    one, rank = plans(config, chunk_tokens, b * (2 + k))
    r["plan_gib"] = {name: v / GIB for name, v in one.items()}
    r["plan_rank_of_8_gib"] = rank["total"] / GIB
    if cuda:
        # what the process holds beside the allocator: CUDA context, NCCL, cuBLAS workspaces
        free, total = torch.cuda.mem_get_info(device)
        outside = total - free - torch.cuda.memory_reserved(device)
        adamw_saved = one["adamw_states"] - rank["adamw_states"]  # the fullest rank's share kept
        measured = dict(weights_fp32=weights - before, gradients_fp32=buckets - weights,
                        adamw_states=adamw, pass_2_transient=pass_2, peak_allocated=peak)
        planned = dict(weights_fp32=one["weights_fp32"], gradients_fp32=one["gradients_fp32"],
                       adamw_states=one["adamw_states"],
                       pass_2_transient=sum(one.get(t, 0) for t in PASS_2_TERMS),
                       peak_allocated=one["total"] - one["cuda_context_nccl"])
        r["memory_gib"] = {t: dict(measured=measured[t] / GIB, plan=planned[t] / GIB)
                           for t in measured}
        rank_peak = peak_reserved + outside - adamw_saved
        r.update(peak_reserved_gib=peak_reserved / GIB, outside_allocator_gib=outside / GIB,
                 rank_of_8_peak_gib=rank_peak / GIB,
                 margin_on_80gb_gib=(CARD_80GB - rank_peak) / GIB)
    # the same sequences packed and padded, under the step's precision (padded runs as sdpa)
    seqs, _ = batch_of(config, 8, 1, max_length, seed=99)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        packed = M.embed_packed(backbone, M.pack(seqs, M.row_width(backbone, seqs)).to(device))
        padded = M.embed(backbone, *(t.to(device) for t in M.pad(seqs, 0)))
    r["packed_vs_padded_max_abs"] = (packed - padded).abs().max().item()
    if run_old:  # the count-chunk step it replaced, one timed step after a warm-up
        seqs, loss_fn = batch_of(config, b, k, max_length, seed=1)
        old = []
        for _ in range(2):
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            m_old = bench.count_chunk_step(backbone, seqs, loss_fn, OLD_CHUNK_SIZE[size], 0, cuda)
            if cuda:
                torch.cuda.synchronize(device)
            old.append(time.perf_counter() - t0)
            # outside DDP's forward its hooks are off: this step's gradients are fresh
            # tensors beside the buckets; freed here
            backbone.zero_grad(set_to_none=True)
        r["old_step"] = dict(chunk_size=OLD_CHUNK_SIZE[size], chunks=m_old["chunks"],
                             s_per_step=old[-1], loss=m_old["loss"],
                             real_tokens_per_s=m_old["real_tokens"] / old[-1],
                             padding_efficiency=m_old["real_tokens"] / m_old["computed_tokens"])
    return r


def report(r, peak_flops):
    flops = 6 * r["non_embedding_params"] * r["real_tokens_per_s"]
    r["mfu"] = mfu = flops / peak_flops if peak_flops else None
    split = ", ".join(f"{p} {s:.2f}s" for p, s in r["time_split_s"].items())
    print(f"{r['size']} ({r['layers']} layers), b={r['b']} k={r['k']}, {r['chunks_per_step']} "
          f"chunks of <= {r['chunk_tokens']} tokens: {r['s_per_step']:.2f} s/step, "
          f"{r['real_tokens_per_s']:,.0f} real tokens/s, "
          f"MFU {f'{mfu:.1%}' if mfu is not None else 'n/a'}; split: {split}; "
          f"host syncs/step {r['host_syncs_per_step']}")
    if "memory_gib" in r:
        print("  memory, measured / planned GiB: " + ", ".join(
            f"{t} {v['measured']:.2f} / {v['plan']:.2f}" for t, v in r["memory_gib"].items()))
        print(f"  peak reserved {r['peak_reserved_gib']:.1f} GiB + {r['outside_allocator_gib']:.1f}"
              f" outside the allocator; as a rank of {PAPER_WORLD} (AdamW sharded): "
              f"{r['rank_of_8_peak_gib']:.1f} GiB, plan {r['plan_rank_of_8_gib']:.1f}; margin on "
              f"an 80 GB card ({CARD_80GB / GIB:.2f} GiB): {r['margin_on_80gb_gib']:.1f} GiB")
    print(f"  packed vs padded embeddings: max |diff| {r['packed_vs_padded_max_abs']:.2e}")
    if "old_step" in r:
        o = r["old_step"]
        print(f"  count-chunk step (C={o['chunk_size']}, {o['chunks']} chunks): "
              f"{o['s_per_step']:.2f} s/step, {o['real_tokens_per_s']:,.0f} real tokens/s -> "
              f"packed is {r['real_tokens_per_s'] / o['real_tokens_per_s']:.2f}x")


def main(argv=None):
    args = parse_args(argv)
    if note := train.use_expandable_segments():  # before CUDA starts, as train.py does
        print(note)
    sizes = args.sizes.split(",")
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("tools/gpu_check.py: no CUDA device; run it on a GPU machine or pass "
                         "--cpu-smoke")
    device = (torch.device("cpu") if args.cpu_smoke
              else torch.device("cuda", torch.cuda.current_device()))
    # bf16 on CUDA; the CPU smoke forces the CUDA layout (varlen rows) in fp32
    attn, kernel = A.setup_attention(device, bf16=device.type == "cuda", forced=args.cpu_smoke)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    print(f"device {name} ({total / GIB:.0f} GiB), attention {attn} ({kernel}), "
          f"torch {torch.__version__}")
    peak_flops = next((v for key, v in PEAK_BF16_FLOPS.items() if key in name), None)
    created = one_process_group(device)
    results, skipped = [], {}
    try:
        for size in sizes:
            b, k, max_length, chunk_tokens = 64, 7, 1024, train.PRESET_CHUNK_TOKENS[size]
            config = plan.qwen3_config(size, args.layers or None)
            if args.cpu_smoke:
                config = smoke_config(config)
                b, max_length, chunk_tokens = 4, 64, 256
            elif reason := why_not(size, config, chunk_tokens, b * (2 + k), total):
                print(f"{size}: skipped: {reason}")
                skipped[size] = reason
                continue
            steps = 1 if args.cpu_smoke else args.steps
            r = check_size(size, config, device, attn, steps, b, k, max_length, chunk_tokens,
                           run_old=size != "4b")
            if device.type == "cuda":  # the size's model and optimizer are gone: free them
                gc.collect()
                torch.cuda.empty_cache()
            r.update(size=size, attention=attn, kernel=kernel)
            results.append(report(r, peak_flops) or r)
    finally:
        if created:
            dist.destroy_process_group()
    out = dict(device=name, memory_gib=total / GIB, torch=torch.__version__, attention=attn,
               kernel=kernel, results=results, skipped=skipped)
    path = args.out or ("out/gpu_check_cpu_smoke.json" if args.cpu_smoke else "gpu_check.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
