"""The token cache build on one core against the build on N: the speedup, and the serial fraction
it leaves (docs/data.md). Builds in turns (1, N, 1, N, ...), each into a fresh folder, on the
same data; the tokenizer's own thread pool is off in both, so the cores are the workers'.

    python -m bench.tokens DATA TOKENIZER [--workers 2] [--rounds 3] [--max-length 1024]

DATA: a folder in the released layout (the released set, or `python -m tools.mine` output);
TOKENIZER: a Hugging Face tokenizer folder (Qwen3's own for the figures in docs/data.md).
"""
import argparse
import os
import resource
import statistics
import tempfile
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before the tokenizer is loaded

from transformers import AutoTokenizer

import data as D
from runtime import tokens as T


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers, once joined
    return usage.ru_utime + usage.ru_stime


def build_once(sources, tokenizer, max_length: int, workers: int):
    """-> (wall seconds, the builder process's own CPU seconds, its workers' CPU seconds,
    tokens) of one build. The CPU seconds do not depend on what else runs on the machine:
    the builder's are the serial part, the workers' the parallel part and its overhead."""
    with tempfile.TemporaryDirectory() as folder:
        cache = T.TokenCache(folder, tokenizer, max_length)
        t0, cpu0, workers0 = time.perf_counter(), time.process_time(), children_cpu()
        cache.build(sources, log=lambda *a: None, workers=workers, progress_every=1e9)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        workers_cpu = children_cpu() - workers0
        cache.open(sources)
        tokens = sum(len(b.column(c).values) for s in sources
                     for b in (s.tokens.reader.get_batch(i)
                               for i in range(s.tokens.reader.num_record_batches))
                     for c in range(b.num_columns))
    return wall, cpu, workers_cpu, tokens


def main():
    parser = argparse.ArgumentParser(prog="python -m bench.tokens", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data")
    parser.add_argument("tokenizer")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=1024)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    sources = D.load_sources(args.data)
    times, cpus = {1: [], args.workers: []}, {1: [], args.workers: []}
    for r in range(args.rounds):
        for workers in times:
            wall, cpu, workers_cpu, tokens = build_once(sources, tokenizer, args.max_length,
                                                        workers)
            times[workers].append(wall)
            cpus[workers].append((cpu, workers_cpu))
            print(f"round {r}: {workers} worker(s): {wall:.1f} s, CPU s: builder {cpu:.1f}, "
                  f"workers {workers_cpu:.1f}; {tokens / wall / 1e6:.2f}M tokens/s "
                  f"({tokens:,} tokens)", flush=True)
    one, many = (statistics.median(times[w]) for w in times)
    speedup, n = one / many, args.workers
    serial = (n / speedup - 1) / (n - 1)  # Amdahl: 1 / speedup = serial + (1 - serial) / n
    print(f"median {one:.1f} s (1) / {many:.1f} s ({n}) = {speedup:.2f}x "
          f"(spread {min(times[1]):.1f}-{max(times[1]):.1f} / "
          f"{min(times[n]):.1f}-{max(times[n]):.1f} s); serial fraction {serial:.3f}: "
          f"{1 / (serial + (1 - serial) / 64):.0f}x on 64 cores")
    # from CPU seconds alone (what a busy machine changes least): the builder's own work is the
    # serial part; Amdahl's bound if it never overlaps the workers, and the bound if it fully
    # does (the builder reads and writes while the workers tokenize: it alone then limits)
    one_cpu = statistics.median(sum(c) for c in cpus[1])
    builder, work = (statistics.median(c[i] for c in cpus[n]) for i in (0, 1))
    s_cpu = builder / one_cpu
    print(f"CPU: 1 worker {one_cpu:.1f} s; {n} workers: builder {builder:.1f} s + workers "
          f"{work:.1f} s; serial fraction {s_cpu:.3f}: Amdahl {1 / (s_cpu + (1 - s_cpu) / n):.2f}x "
          f"on {n} cores, {1 / (s_cpu + (1 - s_cpu) / 64):.0f}x on 64 "
          f"(overlapped: up to {min(64, (builder + work) / builder):.0f}x)")

if __name__ == "__main__":
    main()
