"""The GPU check: does the cached step run the paper's per-GPU batch fast and within the
memory plan? One script, no network, nothing beyond torch and transformers; ~2 minutes on
one 80 GB GPU.

    python gpu_check.py                 # on a GPU machine
    python gpu_check.py --cpu-smoke     # the same code path on a CPU with tiny shapes (tests)

Part 1: a 0.6b-shaped Qwen3 with random weights, bf16 autocast over fp32 master weights,
flash attention when installed (sdpa otherwise), the paper's per-GPU batch (32 queries, k=7:
288 sequences) with a realistic length mix, 10 cached steps: real tokens/s, MFU, peak memory
beside the memory plan. Part 2: a 4b-shaped model with 4 layers at the 4b chunk size: peak
memory beside the plan's figure for the same 4 layers (checks the per-layer terms).
"""
import argparse
import contextlib
import json
import math
import sys
import time

import torch

import data as D
import model as M
import train

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per card


def length_mix(b: int, k: int, max_length: int, rng: torch.Generator) -> list[int]:
    """Token lengths of one rank's batch: queries log-uniform in [20, 300] (instruction
    included), documents log-uniform in [32, max_length] (DESIGN §2: queries ~20-300
    tokens, documents up to 1024)."""
    def log_uniform(n, lo, hi):
        return [int(math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * u))
                for u in torch.rand(n, generator=rng).tolist()]
    return log_uniform(b, 20, 300) + log_uniform(b * (1 + k), 32, max_length)


def run_steps(config, b, k, chunk_size, max_length, steps, device, bf16, attn):
    torch.manual_seed(0)
    backbone = M.AutoModel.from_config(config, attn_implementation=attn, dtype=torch.float32).to(device)
    backbone.train()
    optimizer = torch.optim.AdamW(backbone.parameters(), lr=1e-5, betas=(0.9, 0.98), weight_decay=0.01)
    cfg = train.Config(chunk_size=chunk_size, max_length=max_length)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    batch = D.Batch("gpu_check", "retrieval", [""] * b, [""] * b, [[""] * k] * b)  # b, k, type
    rng = torch.Generator().manual_seed(0)
    times, tokens = [], 0
    for step in range(steps + 1):  # step 0 warms up (kernels, allocator)
        seqs = [torch.randint(0, config.vocab_size, (n,), generator=rng).tolist()
                for n in length_mix(b, k, max_length, rng)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        m = train.step_on_sequences(backbone, None, seqs, batch, 0, cfg, device, autocast)
        torch.nn.utils.clip_grad_norm_(backbone.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.time() - t0)
            tokens += m["real_tokens"]
    params = sum(p.numel() for p in backbone.parameters())
    embedding = backbone.embed_tokens.weight.numel()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return dict(seconds=sum(times), real_tokens=tokens, tokens_per_s=tokens / sum(times),
                params=params, non_embedding_params=params - embedding,
                padding_efficiency=m["real_tokens"] / m["padded_tokens"], peak_bytes=peak)


def report(name, r, plan, device_name):
    # model FLOPs: 6 per non-embedding parameter per token (forward + backward); the extra
    # no-grad forward of pass 1 is overhead, not model FLOPs, so MFU shows its cost
    peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)
    mfu = 6 * r["non_embedding_params"] * r["tokens_per_s"] / peak_flops if peak_flops else None
    r.update(name=name, mfu=mfu, plan_bytes=plan["total"],
             plan_activations_bytes=plan["activations_one_chunk"])
    gib = lambda x: f"{x / 2**30:.2f} GiB" if x is not None else "n/a"  # noqa: E731
    print(f"{name}: {r['tokens_per_s']:,.0f} real tokens/s, MFU {mfu:.1%}" if mfu is not None
          else f"{name}: {r['tokens_per_s']:,.0f} real tokens/s, MFU n/a (unknown card)")
    print(f"  padding efficiency {r['padding_efficiency']:.3f}; peak memory {gib(r['peak_bytes'])}, "
          f"plan {gib(plan['total'])} (activations {gib(plan['activations_one_chunk'])})")
    return r


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU, for the tests")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: no CUDA device; run it on a GPU machine or pass --cpu-smoke")
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    attn = M.attention_implementation(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, attention {attn}, torch {torch.__version__}")
    results = []
    parts = [("0.6b", None, 32, M.PRESETS["0.6b"]["chunk_size"]), ("4b", 4, 4, M.PRESETS["4b"]["chunk_size"])]
    for size, layers, b, chunk in parts:
        config = M.qwen3_config(size, layers)
        max_length = 1024
        if args.cpu_smoke:  # same code, tiny shapes
            config = M.qwen3_config_like(config, 2)
            config.hidden_size, config.intermediate_size, config.num_attention_heads = 64, 128, 4
            config.num_key_value_heads, config.head_dim, config.vocab_size = 2, 16, 500
            b, max_length = 4, 64
        k = D.K_BY_TYPE["retrieval"]
        r = run_steps(config, b, k, chunk, max_length, 2 if args.cpu_smoke else args.steps, device,
                      bf16=not args.cpu_smoke, attn=attn)
        plan = M.memory_plan(config, world=1, chunk_size=chunk, max_length=max_length,
                             sequences_per_rank=b * (2 + k), shard_optimizer=False)
        label = f"{size}-shaped" + (f", {layers} layers" if layers else "") + f", b={b}, chunk={chunk}"
        results.append(report(label, r, plan, name))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(dict(device=name, attention=attn, torch=torch.__version__, results=results), f, indent=2)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
