"""Checkpoint save and load: the consolidated way (ZeroRedundancyOptimizer.consolidate_state_dict
to rank 0, one torch.save; every rank torch.loads the whole file) against runtime/checkpoint.py's
(every rank writes and reads its own part with DCP), as ratios measured side by side.

    python -m bench.checkpoint                    # a random ~100M Qwen3 on CPU, 1 and 2 ranks
    python -m bench.checkpoint --layers 40        # ~300M

For each world size, old and new run in turns (old, new, old, new, ...), each as its own
`torchrun` launch of this file with --worker: the worker builds the model, takes one AdamW
step with random gradients (so every state tensor exists), then saves and loads once. Seconds
are the slowest rank's, between barriers. Memory is each rank's private memory (RssAnon of
/proc/PID/status), sampled every 5 ms: the peak during the operation and the level
before it, summed over ranks (freed memory stays with the allocator, so the level before the
load still holds the optimizer state the load replaces; compare peaks). The load starts with
no optimizer state, as a fresh process does. Prints medians (min-max) and old / new ratios.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch
import torch.distributed as dist

import train
from data import HERE
from runtime import checkpoint
from runtime.parallel import barrier


def rss_anon_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024


class PeakMemory:
    """`with PeakMemory() as m:` -> m.start and m.peak, private MB before and at the peak."""

    def __enter__(self):
        self.start = self.peak = rss_anon_mb()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss_anon_mb())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss_anon_mb())


def measured(fn) -> tuple[float, float, float]:
    """(seconds of the slowest rank, peak private MB during fn and private MB before it, each
    summed over ranks)."""
    barrier()
    with PeakMemory() as m:
        t0 = time.perf_counter()
        fn()
        barrier()
        seconds = time.perf_counter() - t0
    t = torch.tensor([m.peak, m.start], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t)
    return seconds, *t.tolist()


def build(layers: int, world: int):
    from transformers import AutoModel, Qwen3Config
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                         num_hidden_layers=layers, num_attention_heads=12, num_key_value_heads=4,
                         head_dim=64)
    backbone = AutoModel.from_config(config, attn_implementation="sdpa")
    optimizer, scheduler = train.setup_optimizer(train.Config(), backbone, world, 100)
    for p in backbone.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return backbone, optimizer, scheduler


def worker(way: str, layers: int, out: str) -> dict:
    rank, world, device = train.setup_distributed()
    backbone, optimizer, scheduler = build(layers, world)
    adamw = checkpoint.local_adamw(optimizer)
    path = os.path.join(out, "state.pt")

    def old_save():
        if hasattr(optimizer, "consolidate_state_dict"):
            optimizer.consolidate_state_dict(to=0)
        if rank == 0:
            torch.save(dict(step=1, model=backbone.state_dict(),
                            optimizer=optimizer.state_dict(),
                            scheduler=scheduler.state_dict()), path)

    def old_load():
        state = torch.load(path, map_location=device, weights_only=True)
        backbone.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])

    def new_save():
        checkpoint.save(out, 1, backbone, optimizer, scheduler, {}, {}, None, keep=1)

    def new_load():
        checkpoint.restore(checkpoint.latest(out), backbone, optimizer, scheduler, {}, {})

    save, load = (old_save, old_load) if way == "old" else (new_save, new_load)
    save_s, save_mb, save_before_mb = measured(save)
    adamw.state.clear()  # a resume starts without optimizer state
    if hasattr(optimizer, "_all_state_dicts"):
        optimizer._all_state_dicts = []  # the consolidated copy the old save keeps on rank 0
    load_s, load_mb, load_before_mb = measured(load)
    result = dict(way=way, world=world, params=sum(p.numel() for p in backbone.parameters()),
                  save_s=save_s, load_s=load_s, save_peak_mb=save_mb, load_peak_mb=load_mb,
                  save_before_mb=save_before_mb, load_before_mb=load_before_mb)
    train.teardown()
    return result


def launch(way: str, world: int, layers: int) -> dict:
    out = tempfile.mkdtemp(prefix=f"bench_ckpt_{way}{world}_")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(world), "-m", "bench.checkpoint", "--worker", way, "--layers", str(layers),
           "--out", out]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=HERE)
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.checkpoint",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12, help="Qwen3 layers (12: ~100M)")
    parser.add_argument("--turns", type=int, default=2, help="old/new pairs per world size")
    parser.add_argument("--worlds", default="1,2", help="world sizes to measure")
    parser.add_argument("--json", default="", help="also write every measurement here")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = worker(args.worker, args.layers, args.out)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result))
        return
    runs = []
    for world in map(int, args.worlds.split(",")):
        for _turn in range(args.turns):
            for way in ("old", "new"):
                runs.append(launch(way, world, args.layers))
                print(json.dumps(runs[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)
    print(f"\n{runs[0]['params'] / 1e6:.0f}M parameters, fp32 weights + AdamW; medians (min-max) "
          f"of {args.turns} turns; MB = private memory (RssAnon) at the peak of the operation "
          f"and before it, summed over ranks")
    print(f"{'ranks':>5} {'':12} {'old':>22} {'new':>22} {'old / new':>10}")
    for world in sorted({r["world"] for r in runs}):
        for key in ("save_s", "load_s", "save_peak_mb", "load_peak_mb", "save_before_mb",
                    "load_before_mb"):
            cols = []
            for way in ("old", "new"):
                xs = [r[key] for r in runs if r["world"] == world and r["way"] == way]
                cols.append((statistics.median(xs), min(xs), max(xs)))
            ratio = cols[0][0] / cols[1][0] if cols[1][0] > 0 else float("inf")
            print(f"{world:>5} {key:12} " + " ".join(
                f"{m:>8.1f} ({lo:.1f}-{hi:.1f})".rjust(22) for m, lo, hi in cols)
                + f" {ratio:>10.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
