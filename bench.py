"""Benchmark the cached-negatives step against the official F2LLM step and sentence-transformers.

    python bench.py                        # CPU, under 5 minutes; prints one table, writes bench.json

Every comparison runs in this one process on the same model and the same inputs, after a
warm-up, over several rounds (ratios are paired per round: median [min-max]):
1. step throughput (real tokens / s): train.cached_step (length-sorted chunks of C, or the
   token-budget chunker below) against the official step (all S sequences padded to the
   longest, ONE forward with activation checkpointing, the same loss, backward);
2. padding efficiency (real tokens / tokens computed), exact counts from the chunk plans;
3. peak memory of one step as the batch grows 8x at a fixed C (one fresh process per
   configuration: the rise of VmHWM over the RSS before the step);
4. the in-batch loss and step time against sentence-transformers'
   CachedMultipleNegativesRankingLoss (scale 20 = temperature 0.05, mini_batch_size = C);
5. encode throughput: model.encode against SentenceTransformer.encode.
The model is a small Qwen3 built from a config; the texts are BBC News cut to lengths drawn
from the mix of `sample_lengths` (queries with an instruction, documents up to max length).
"""
import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from unittest import mock

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from transformers import AutoModel, Qwen3Config

import data as D
import model as M
import train
from loss import in_batch_loss

CPU = torch.device("cpu")
INSTRUCTION = D.DEMO_INSTRUCTIONS["bbc_headline_retrieval"]


# ---------------------------------------------------------------------------- the length mix
def sample_lengths(rng, n: int, kind: str, max_length: int) -> list[int]:
    """Token counts (EOS included). Queries: log-uniform 20..300 (instruction included);
    documents: log-normal, median 200, sigma 1, clipped to [16, max_length], so ~5% are long
    documents cut at max length."""
    if kind == "query":
        x = np.exp(rng.uniform(np.log(20), np.log(300), n))
    else:
        x = np.clip(np.exp(rng.normal(np.log(200), 1.0, n)), 16, max_length)
    return [int(v) for v in x]


def text_pool(tokenizer, n_articles: int = 400) -> list[int]:
    """One long stream of token ids of BBC article bodies to cut texts from."""
    bodies = [a["body"] for a in D.bbc_articles()[:n_articles]]
    return [t for ids in tokenizer(bodies, add_special_tokens=False)["input_ids"] for t in ids]


def cut_texts(rng, pool, tokenizer, lengths, prefix: str = "") -> list[str]:
    """Texts of about `lengths` tokens (with EOS): a random window of the pool, decoded."""
    n_prefix = len(tokenizer(prefix, add_special_tokens=False)["input_ids"]) if prefix else 0
    texts = []
    for n in lengths:
        n_body = max(1, n - 1 - n_prefix)
        start = int(rng.integers(0, len(pool) - n_body))
        texts.append(prefix + tokenizer.decode(pool[start:start + n_body]))
    return texts


def make_batch(pool, tokenizer, queries: int, k: int, max_length: int, seed: int) -> D.Batch:
    """A retrieval batch (hard negatives and in-batch negatives both count) of the mix."""
    rng = np.random.default_rng(seed)
    q = cut_texts(rng, pool, tokenizer, sample_lengths(rng, queries, "query", max_length),
                  D.instruct(INSTRUCTION, ""))
    docs = cut_texts(rng, pool, tokenizer, sample_lengths(rng, queries * (1 + k), "doc", max_length))
    negatives = [docs[queries + i * k: queries + (i + 1) * k] for i in range(queries)]
    return D.Batch("bench", "retrieval", q, docs[:queries], negatives)


# ---------------------------------------------------------------------------- the steps
def make_chunks_by_tokens(seqs: list[list[int]], max_tokens: int) -> list[list[int]]:
    """train.make_chunks with only the token cap (`--chunk-tokens`), no cap on the count."""
    return train.make_chunks(seqs, len(seqs), max_tokens)


def ours_step(backbone, batch, tokenizer, cfg: train.Config, max_tokens: int = 0) -> dict:
    """train.cached_step exactly as train.py runs it (world 1, fp32); max_tokens > 0 chunks by
    the token cap alone (`--chunk-tokens`, no cap on the count)."""
    if max_tokens:
        cfg = dataclasses.replace(cfg, chunk_size=10**9, chunk_tokens=max_tokens)
    return train.cached_step(backbone, None, batch, tokenizer, cfg, CPU, contextlib.nullcontext)


def official_step(backbone, batch, tokenizer, cfg: train.Config) -> dict:
    """The official code's step: all S sequences padded to the longest in ONE forward (the
    caller enables activation checkpointing on `backbone`), the same loss, backward."""
    seqs, _ = train.batch_sequences(batch, tokenizer, cfg.max_length)
    input_ids, lengths = M.pad(seqs, tokenizer.pad_token_id)  # (S, longest)
    reps = M.embed(backbone, input_ids, lengths)  # (S, D) fp32
    loss, hard, in_batch = train.batch_loss(reps, batch, cfg.temperature)
    loss.backward()
    return dict(loss=loss.item(), hard=hard.item(), in_batch=in_batch.item(),
                real_tokens=int(lengths.sum()), padded_tokens=input_ids.numel())


def checkpointed(backbone):
    """A copy of backbone (same weights, own grads) with activation checkpointing on."""
    net = copy.deepcopy(backbone).train()
    net.activation_checkpointing_enable()
    return net


def in_batch_only_loss(reps, batch, temperature):
    """The loss of a pairs-only batch [queries; positives]: each query against all positives,
    i.e. sentence-transformers' MultipleNegativesRankingLoss (train.batch_loss needs k >= 1)."""
    b = len(batch.queries)
    loss = in_batch_loss(reps[:b], reps[b:2 * b], temperature)
    return loss, torch.zeros(()), loss


# ---------------------------------------------------------------------------- measuring
def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def spread(values) -> dict:
    return dict(median=statistics.median(values), min=min(values), max=max(values), n=len(values))


def rounds(variants: dict, repeats: int) -> dict:
    """Run every variant once as warm-up, then `repeats` rounds in rotating order (so drift
    in the machine's load hits every variant alike). Returns {name: [seconds per round]}."""
    names = list(variants)
    for name in names:
        variants[name]()
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(timed(variants[name])[0])
    return times


def build(args):
    """Tokenizer trained on BBC News, a Qwen3 of args' size, and the text pool."""
    texts = [a["headline"] + "\n" + a["body"] for a in D.bbc_articles()]
    tokenizer = M.train_tokenizer(texts, vocab_size=args.vocab)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=args.hidden,
                         intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 128,
                         head_dim=64, max_position_embeddings=8192, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(args.seed)
    backbone = AutoModel.from_config(config, attn_implementation="sdpa").train()
    return tokenizer, backbone


# ---------------------------------------------------------------------------- 3. memory
def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_probe(args):
    """Child process (started with a fixed glibc mmap threshold, so every freed tensor goes
    back to the OS and RSS follows the live tensors): load the export, then for each step and
    batch size run ONE step and report the rise of the peak RSS (VmHWM, reset just before)
    over the RSS just before the step."""
    backbone, tokenizer = M.load_backbone(args.export)
    official = checkpointed(backbone.train())
    cfg = train.Config(chunk_size=args.chunk_size, max_length=args.max_length)
    pool, out = text_pool(tokenizer), {}
    for step in ("ours", "tokens", "official"):
        for scale in (1, 8):
            batch = make_batch(pool, tokenizer, args.memory_queries * scale, args.k, args.max_length, args.seed)
            net = official if step == "official" else backbone
            gc.collect()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
            before = rss_kib("VmRSS")
            if step == "official":
                m = official_step(net, batch, tokenizer, cfg)
            else:
                m = ours_step(net, batch, tokenizer, cfg, args.chunk_tokens if step == "tokens" else 0)
            out[f"{step}_x{scale}"] = dict(step_mib=(rss_kib("VmHWM") - before) / 1024, before_mib=before / 1024,
                                           sequences=len(batch.queries) * (2 + args.k),
                                           padded_tokens=m["padded_tokens"], real_tokens=m["real_tokens"])
            net.zero_grad(set_to_none=True)
            del m
    print(json.dumps(out))


def bench_memory(args, export) -> dict:
    # glibc serves blocks above its mmap threshold with mmap and unmaps them on free, but the
    # threshold moves up as blocks are freed; fixing it keeps RSS = live tensors + small heap
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, os.path.abspath(__file__), "--probe", "--export", export,
           *sum(([f"--{k.replace('_', '-')}", str(getattr(args, k))] for k in
                 ("memory_queries", "chunk_size", "chunk_tokens", "max_length", "k", "seed")), [])]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"bench.py: the memory probe failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- 1, 2, 4, 5
def bench_steps(args, backbone, tokenizer, pool, cfg) -> dict:
    """Ours (chunks of C; token budget) against the official step: same batch, same weights."""
    batch = make_batch(pool, tokenizer, args.queries, args.k, args.max_length, args.seed)
    official, info = checkpointed(backbone), {}

    def run(name, net, step):
        def go():
            info[name] = step()
            net.zero_grad(set_to_none=True)
        return go
    times = rounds({"ours": run("ours", backbone, lambda: ours_step(backbone, batch, tokenizer, cfg)),
                    "tokens": run("tokens", backbone, lambda: ours_step(backbone, batch, tokenizer, cfg, args.chunk_tokens)),
                    "official": run("official", official, lambda: official_step(official, batch, tokenizer, cfg))},
                   args.repeats)
    seqs, _ = train.batch_sequences(batch, tokenizer, args.max_length)
    real = info["ours"]["real_tokens"]
    return dict(sequences=len(seqs), real_tokens=real, lengths=sorted(len(s) for s in seqs),
                chunks=dict(ours=len(train.make_chunks(seqs, args.chunk_size)),
                            tokens=len(make_chunks_by_tokens(seqs, args.chunk_tokens))),
                loss={n: m["loss"] for n, m in info.items()},
                efficiency={n: m["real_tokens"] / m["padded_tokens"] for n, m in info.items()},
                seconds={n: spread(t) for n, t in times.items()},
                tokens_per_s={n: spread([real / t for t in ts]) for n, ts in times.items()},
                speedup={n: spread([o / t for o, t in zip(times["official"], times[n])]) for n in ("ours", "tokens")})


def paper_batch_efficiency(args, batches: int = 50) -> dict:
    """Padding efficiency at the paper's per-GPU batch (32 queries, S = 288) with C = 32 and
    the token budget 32 x max length: exact token counts of the chunk plans, no model."""
    rng, eff = np.random.default_rng(args.seed), {"ours": [], "tokens": [], "official": []}
    for _ in range(batches):
        seqs = [[0] * n for n in sample_lengths(rng, 32, "query", args.max_length)
                + sample_lengths(rng, 256, "doc", args.max_length)]
        for name, chunks in (("ours", train.make_chunks(seqs, 32)), ("official", [list(range(len(seqs)))]),
                             ("tokens", make_chunks_by_tokens(seqs, 32 * args.max_length))):
            computed = sum(len(c) * max(len(seqs[i]) for i in c) for c in chunks)
            eff[name].append(sum(len(s) for s in seqs) / computed)
    return {n: spread(v) for n, v in eff.items()}


def bench_sentence_transformers(args, backbone, tokenizer, pool, st) -> dict:
    """A pairs-only batch: our step with the in-batch loss against CachedMNRL, C = mini-batch."""
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss
    cfg = train.Config(chunk_size=args.chunk_size, max_length=8192)  # the export truncates at 8192 too
    st_loss = CachedMultipleNegativesRankingLoss(st, scale=1 / cfg.temperature, mini_batch_size=args.chunk_size)
    pairs = make_batch(pool, tokenizer, args.st_queries, 0, args.max_length, args.seed + 1)
    loss = {}

    def ours():
        with mock.patch.object(train, "batch_loss", in_batch_only_loss):
            loss["ours"] = ours_step(backbone, pairs, tokenizer, cfg)["loss"]
        backbone.zero_grad(set_to_none=True)

    def theirs():  # tokenizing is timed for both: cached_step tokenizes too
        value = st_loss([st.preprocess(pairs.queries), st.preprocess(pairs.positives)], None)
        value.backward()
        loss["st"] = value.item()
        st.zero_grad(set_to_none=True)
    times = rounds({"ours": ours, "st": theirs}, args.repeats)
    return dict(pairs=args.st_queries, loss_ours=loss["ours"], loss_st=loss["st"],
                seconds={n: spread(t) for n, t in times.items()},
                time_ratio=spread([o / s for o, s in zip(times["ours"], times["st"])]))


def bench_encode(args, backbone, tokenizer, pool, st) -> dict:
    """model.encode against SentenceTransformer.encode: same texts (1/4 queries), same batch size."""
    rng = np.random.default_rng(args.seed + 2)
    n_q = args.encode_texts // 4
    texts = (cut_texts(rng, pool, tokenizer, sample_lengths(rng, n_q, "query", args.max_length), D.instruct(INSTRUCTION, ""))
             + cut_texts(rng, pool, tokenizer, sample_lengths(rng, args.encode_texts - n_q, "doc", args.max_length)))
    backbone.eval(), st.eval()
    emb = {}
    times = rounds({"ours": lambda: emb.update(ours=M.encode(backbone, tokenizer, texts, batch_size=args.chunk_size)),
                    "st": lambda: emb.update(st=st.encode(texts, batch_size=args.chunk_size, convert_to_tensor=True))},
                   args.repeats)
    backbone.train()
    real = sum(len(s) for s in M.tokenize(tokenizer, texts, 8192)[0])
    return dict(texts=len(texts), real_tokens=real, max_abs_diff=(emb["ours"] - emb["st"].cpu()).abs().max().item(),
                tokens_per_s={n: spread([real / x for x in t]) for n, t in times.items()},
                speedup=spread([s / o for o, s in zip(times["ours"], times["st"])]))


# ---------------------------------------------------------------------------- the table
def table(r) -> list[tuple]:
    """(measure, value, goal, met) rows; values are median [min-max] over the rounds."""
    fmt = lambda d: f"{d['median']:.2f} [{d['min']:.2f}-{d['max']:.2f}]"
    s, paper, st, enc, grow = r["steps"], r["paper_batch_efficiency"], r["sentence_transformers"], r["encode"], r["memory_growth"]
    return [
        ("1. step throughput, ours (C) / official", fmt(s["speedup"]["ours"]), ">= 2", s["speedup"]["ours"]["median"] >= 2),
        ("   ours (token budget) / official", fmt(s["speedup"]["tokens"]), "", None),
        ("2. padding efficiency, timed batch: ours (C)", f"{s['efficiency']['ours']:.2f}", ">= 0.9", s["efficiency"]["ours"] >= 0.9),
        ("   ours (token budget) | official", f"{s['efficiency']['tokens']:.2f} | {s['efficiency']['official']:.2f}", "", None),
        ("   paper batch S=288, C=32: ours (C)", fmt(paper["ours"]), ">= 0.9", paper["ours"]["median"] >= 0.9),
        ("   ours (token budget) | official", f"{fmt(paper['tokens'])} | {fmt(paper['official'])}", "", None),
        ("3. step peak memory, batch x8: ours (C)", f"{grow['ours']:.2f}x", "<= 1.25x", grow["ours"] <= 1.25),
        ("   ours (token budget) | official", f"{grow['tokens']:.2f}x | {grow['official']:.2f}x", "", None),
        ("4. vs ST cached MNRL: loss ours - ST", f"{st['loss_ours'] - st['loss_st']:+.1e}", "~ 0",
         abs(st["loss_ours"] - st["loss_st"]) <= 1e-5 * abs(st["loss_st"])),
        ("   step time ours / ST", fmt(st["time_ratio"]), "<= 1.0", st["time_ratio"]["median"] <= 1.0),
        ("5. encode throughput ours / ST", fmt(enc["speedup"]), ">= 1.0", enc["speedup"]["median"] >= 1.0),
    ]


# ---------------------------------------------------------------------------- main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--queries", type=int, default=2, help="queries per timed step (S = queries * (2 + k))")
    p.add_argument("--memory-queries", type=int, default=1, help="queries of the x1 batch of the memory test")
    p.add_argument("--k", type=int, default=7, help="hard negatives per query (retrieval: 7)")
    p.add_argument("--chunk-size", type=int, default=2, help="C: sequences per forward")
    p.add_argument("--chunk-tokens", type=int, default=0, help="token budget per forward; 0 = C x max length")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--st-queries", type=int, default=8, help="query/positive pairs of the ST comparison")
    p.add_argument("--encode-texts", type=int, default=48)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench.json")
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # internal: the memory child
    p.add_argument("--export", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.chunk_tokens = args.chunk_tokens or args.chunk_size * args.max_length  # C's worst case
    if args.probe:
        return memory_probe(args)
    t0 = time.time()
    say = lambda msg: print(f"[{time.time() - t0:4.0f}s] {msg}", flush=True)
    tokenizer, backbone = build(args)
    pool, cfg = text_pool(tokenizer), train.Config(chunk_size=args.chunk_size, max_length=args.max_length)
    n_params = sum(p.numel() for p in backbone.parameters())
    say(f"model: Qwen3 {args.layers} layers x {args.hidden}, vocab {len(tokenizer)}, {n_params / 1e6:.1f}M parameters")
    r = dict(machine=dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                          cpus=os.cpu_count(), torch=torch.__version__, threads=torch.get_num_threads(),
                          load_average_at_start=os.getloadavg()),  # other users of the CPUs
             commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                   cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip(),
             args=vars(args), parameters=n_params)
    r["steps"] = bench_steps(args, backbone, tokenizer, pool, cfg)
    r["paper_batch_efficiency"] = paper_batch_efficiency(args)
    say("1, 2: steps done")
    export = tempfile.mkdtemp(prefix="f2llm_bench_")
    M.save_export(backbone, tokenizer, export)
    r["memory"] = mem = bench_memory(args, export)
    r["memory_growth"] = {n: mem[f"{n}_x8"]["step_mib"] / mem[f"{n}_x1"]["step_mib"] for n in ("ours", "tokens", "official")}
    say("3: memory done")
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(export, device="cpu").train()
    r["sentence_transformers"] = bench_sentence_transformers(args, backbone, tokenizer, pool, st)
    say("4: sentence-transformers loss done")
    r["encode"] = bench_encode(args, backbone, tokenizer, pool, st)
    shutil.rmtree(export, ignore_errors=True)
    r["wall_s"], r["machine"]["load_average_at_end"] = time.time() - t0, os.getloadavg()
    rows = table(r)
    r["table"] = [dict(measure=m.strip(), value=v, goal=g, met=ok) for m, v, g, ok in rows]

    s = r["steps"]
    print(f"\nF2LLM step benchmark | commit {r['commit']} | {r['machine']['processor']}, {r['machine']['cpus']} CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), load average {r['machine']['load_average_at_start'][0]:.1f} "
          f"| Qwen3 {args.layers}x{args.hidden}, {n_params / 1e6:.1f}M params | timed step: {s['sequences']} sequences, "
          f"{s['real_tokens']} real tokens, C={args.chunk_size}, token budget {args.chunk_tokens} | "
          f"median [min-max] of {args.repeats} rounds after a warm-up")
    print(f"{'measure':46s} {'value':34s} {'goal':9s} met")
    for name, value, goal, met in rows:
        print(f"{name:46s} {value:34s} {goal:9s} {'' if met is None else 'yes' if met else 'NO'}")
    print("seconds per step: " + ", ".join(f"{n} {v['median']:.2f}" for n, v in s["seconds"].items())
          + " | step memory MiB x1 -> x8: " + ", ".join(
              f"{n} {mem[n + '_x1']['step_mib']:.0f} -> {mem[n + '_x8']['step_mib']:.0f}" for n in r["memory_growth"])
          + f" | wall {r['wall_s']:.0f}s")
    with open(args.out, "w") as f:
        json.dump(r, f, indent=2)
    print(f"wrote {args.out}")
    return r


if __name__ == "__main__":
    main(sys.argv[1:])
