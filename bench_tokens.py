"""The token cache build on one core against the build on N: the speedup, and the serial fraction
it leaves (docs/data.md). Builds in turns (1, N, 1, N, ...), each into a fresh folder, on the
same data; the tokenizer's own thread pool is off in both, so the cores are the workers'.

    python bench_tokens.py DATA TOKENIZER [--workers 2] [--rounds 3] [--max-length 1024]

DATA: a folder in the released layout (e.g. ../shared/tools/make_scale_data.py OUT 50);
TOKENIZER: a Hugging Face tokenizer folder (e.g. ../shared/tools/qwen3_tokenizer.py OUT).
"""
import argparse
import os
import statistics
import tempfile
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before the tokenizer is loaded

from transformers import AutoTokenizer  # noqa: E402

import data as D  # noqa: E402


def build_once(sources, tokenizer, max_length: int, workers: int) -> tuple[float, float, int]:
    """-> (wall seconds, the builder process's own CPU seconds, tokens) of one build."""
    with tempfile.TemporaryDirectory() as folder:
        cache = D.TokenCache(folder, tokenizer, max_length)
        t0, cpu0 = time.perf_counter(), time.process_time()
        cache.build(sources, log=lambda *a: None, workers=workers, progress_every=1e9)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        cache.open(sources)
        tokens = sum(len(b.column(c).values) for s in sources
                     for b in (s.tokens.reader.get_batch(i)
                               for i in range(s.tokens.reader.num_record_batches))
                     for c in range(b.num_columns))
    return wall, cpu, tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data")
    parser.add_argument("tokenizer")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=1024)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    sources = D.load_sources(args.data)
    times = {1: [], args.workers: []}
    for r in range(args.rounds):
        for workers in times:
            wall, cpu, tokens = build_once(sources, tokenizer, args.max_length, workers)
            times[workers].append(wall)
            print(f"round {r}: {workers} worker(s): {wall:.1f} s, builder CPU {cpu:.1f} s, "
                  f"{tokens / wall / 1e6:.2f}M tokens/s ({tokens:,} tokens)", flush=True)
    one, many = (statistics.median(times[w]) for w in times)
    speedup, n = one / many, args.workers
    serial = (n / speedup - 1) / (n - 1)  # Amdahl: 1 / speedup = serial + (1 - serial) / n
    print(f"median {one:.1f} s (1) / {many:.1f} s ({n}) = {speedup:.2f}x "
          f"(spread {min(times[1]):.1f}-{max(times[1]):.1f} / "
          f"{min(times[n]):.1f}-{max(times[n]):.1f} s); serial fraction {serial:.3f}: "
          f"{1 / (serial + (1 - serial) / 64):.0f}x on 64 cores")


if __name__ == "__main__":
    main()
