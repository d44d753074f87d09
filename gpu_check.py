"""The GPU check: does the cached step run the paper's per-GPU batch fast and within the
memory plan? One script, no network, nothing beyond torch, transformers, numpy and pyarrow
(no flash-attn or mteb needed); about 3 minutes on one H100/H200.

    python gpu_check.py                 # on a GPU machine; writes gpu_check.json
    python gpu_check.py --cpu-smoke     # the same code path on a CPU with tiny shapes (tests)

For 0.6b and 1.7b at full depth, and 4b at full depth when the GPU has >= 120 GB (else at
reduced depth; per-layer figures scale with depth): random weights, bf16 autocast over fp32
master weights, the paper's per-GPU batch (b = 64 queries, k = 7: 576 sequences) drawn from
plan.length_mix, the preset's packed token budget. It prints s/step, real tokens/s, MFU
(6 N real tokens / time / the GPU's bf16 peak, N = non-embedding parameters), the time split
(pass 1, loss, pass 2, optimizer), chunks and host syncs per step, peak allocated and reserved
memory beside plan.memory_plan, the largest packed-vs-padded embedding difference, the
attention that ran; and the count-chunk step it replaced (bench.count_chunk_step) on the
same batch, for 0.6b and 1.7b.
"""
import argparse
import json
import sys
import time
import warnings

import numpy as np
import torch
from transformers import AutoModel

import bench
import model as M
import plan
import train
from loss import f2llm_loss

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12,
                   "B200": 2250e12}  # dense, per card
OLD_CHUNK_SIZE = {"0.6b": 16, "1.7b": 8, "4b": 2}  # the sequences-per-chunk presets before packing


class Clock:
    """Phase boundaries of a step: CUDA events (no host sync until read) or wall time on a CPU."""

    def __init__(self, device):
        self.device, self.marks = device, []

    def __call__(self, phase: str):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((phase, event))
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


def check_size(size, config, device, attn, steps, b, k, max_length, chunk_tokens, run_old):
    backbone = build(config, device, attn)
    optimizer = torch.optim.AdamW(backbone.parameters(), lr=1e-5, betas=(0.9, 0.98),
                                  weight_decay=0.01)
    bf16 = device.type == "cuda"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, splits, tokens, chunks, syncs = [], [], 0, 0, None
    for step in range(steps + 1):  # step 0 warms up (kernels, allocator)
        seqs, loss_fn = batch_of(config, b, k, max_length, seed=step)
        clock = Clock(device)
        clock("start")
        run = lambda: train.cached_step(backbone, seqs, loss_fn, chunk_tokens, bf16,
                                        clock=clock)  # noqa: E731
        if step == 1:
            out = {}
            syncs = host_syncs(device, lambda: out.update(m=run()))
            m = out["m"]
        else:
            m = run()
        torch.nn.utils.clip_grad_norm_(backbone.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock("optimizer")
        split = clock.split()
        if step:
            times.append(sum(split.values()))
            splits.append(split)
            tokens += m["real_tokens"]
            chunks = m["chunks"]
    counts = plan.parameter_counts(config)
    n = counts["all"] - counts["embedding"]
    r = dict(size=size, layers=config.num_hidden_layers, b=b, k=k, chunk_tokens=chunk_tokens,
             chunks_per_step=chunks,
             host_syncs_per_step=syncs, s_per_step=float(np.median(times)),
             real_tokens_per_s=tokens / sum(times),
             non_embedding_params=n,
             time_split_s={p: float(np.median([s[p] for s in splits])) for p in splits[0]})
    if device.type == "cuda":
        r.update(peak_allocated_gib=torch.cuda.max_memory_allocated(device) / 2**30,
                 peak_reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30)
    p = plan.memory_plan(config, world=1, chunk_tokens=chunk_tokens, sequences_per_rank=b * (2 + k),
                         shard_optimizer=False)
    r["plan_gib"] = {name: v / 2**30 for name, v in p.items()}
    # the same sequences packed and padded, under the step's precision
    seqs, _ = batch_of(config, 8, 1, max_length, seed=99)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        packed = M.embed_packed(backbone, M.pack(seqs, M.row_width(backbone, seqs)).to(device))
        padded = M.embed(backbone, *(t.to(device) for t in M.pad(seqs, 0)))
    r["packed_vs_padded_max_abs"] = (packed - padded).abs().max().item()
    if run_old:  # the count-chunk step it replaced, one timed step after a warm-up
        seqs, loss_fn = batch_of(config, b, k, max_length, seed=1)
        old = []
        for _ in range(2):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            m_old = bench.count_chunk_step(backbone, seqs, loss_fn, OLD_CHUNK_SIZE[size], 0, bf16)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            old.append(time.perf_counter() - t0)
            backbone.zero_grad(set_to_none=True)
        r["old_step"] = dict(chunk_size=OLD_CHUNK_SIZE[size], chunks=m_old["chunks"],
                             s_per_step=old[-1],
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
    gib = r["plan_gib"]
    if "peak_reserved_gib" in r:
        print(f"  memory: peak allocated {r['peak_allocated_gib']:.1f} GiB, reserved "
              f"{r['peak_reserved_gib']:.1f} GiB; plan {gib['total']:.1f} GiB (reserved / plan = "
              f"{r['peak_reserved_gib'] / gib['total']:.3f})")
    print(f"  packed vs padded embeddings: max |diff| {r['packed_vs_padded_max_abs']:.2e}")
    if "old_step" in r:
        o = r["old_step"]
        print(f"  count-chunk step (C={o['chunk_size']}, {o['chunks']} chunks): "
              f"{o['s_per_step']:.2f} s/step, {o['real_tokens_per_s']:,.0f} real tokens/s -> "
              f"packed is {r['real_tokens_per_s'] / o['real_tokens_per_s']:.2f}x")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny shapes on CPU, for the tests")
    parser.add_argument("--steps", type=int, default=3,
                        help="timed steps per size, after one warm-up")
    parser.add_argument("--sizes", default="0.6b,1.7b,4b")
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: no CUDA device; run it on a GPU machine or pass "
                         "--cpu-smoke")
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    attn = M.attention_implementation(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    kernel = M.varlen_kernel(device) or "sdpa rows with block-diagonal masks"
    print(f"device {name} ({total / 2**30:.0f} GiB), attention {attn} ({kernel}), "
          f"torch {torch.__version__}")
    peak_flops = next((v for key, v in PEAK_BF16_FLOPS.items() if key in name), None)
    results = []
    for size in args.sizes.split(","):
        b, k, max_length, chunk_tokens = 64, 7, 1024, train.PRESETS[size]["chunk_tokens"]
        config = plan.qwen3_config(size, None if size != "4b" or total >= 120e9 else 12)
        if args.cpu_smoke:  # the same code with tiny shapes: 2 layers of width 64
            config = plan.config_like(config, 2, vocab_size=500)
            config.hidden_size, config.intermediate_size, config.num_attention_heads = 64, 128, 4
            config.num_key_value_heads, config.head_dim = 2, 16
            config.bos_token_id, config.eos_token_id = 0, 1
            b, max_length, chunk_tokens = 4, 64, 256
        steps = 1 if args.cpu_smoke else args.steps
        r = check_size(size, config, device, attn, steps, b, k, max_length, chunk_tokens,
                       run_old=size != "4b")
        if device.type == "cuda":  # the size's model and optimizer are gone: hand their memory back
            torch.cuda.empty_cache()
        r.update(size=size, attention=attn, kernel=kernel)
        results.append(report(r, peak_flops) or r)
    out = dict(device=name, memory_gib=total / 2**30, torch=torch.__version__, attention=attn,
               kernel=kernel,
               results=results)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
