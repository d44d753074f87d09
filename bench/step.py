"""Benchmark the cached-negatives step against the official F2LLM step, the count-chunk step it
replaced, and sentence-transformers.

    python -m bench.step                   # CPU, a few minutes; prints one table, writes bench.json

Every comparison runs in this one process on the same model and the same inputs, after a
warm-up, over several rounds (ratios are paired per round: median [min-max]):
1. step throughput (real tokens / s): train.cached_step (packed chunks of a token budget)
   against the official step (all S sequences padded to the longest, ONE forward with
   activation checkpointing, the same loss, backward) and against the count-chunk step
   (length-sorted chunks of C sequences, each padded, one autocast per chunk: the step
   before packing);
2. padding efficiency (real tokens / tokens computed), exact counts from the chunk plans, at
   the paper's per-GPU batch (b = 64, k = 7) on plan.length_mix;
3. peak memory of one step as the batch grows 8x at a fixed budget (one fresh process per
   configuration: the rise of VmHWM over the RSS before the step);
4. weight casts per step under bf16 autocast: the most times any one weight is cast;
5. the in-batch loss and step time against sentence-transformers'
   CachedMultipleNegativesRankingLoss (scale 20 = temperature 0.05) in each mode: C sequences
   per mini-batch (mini_batch_size) and our token budget (mini_batch_num_tokens); the goals
   take its fastest; its flattened inputs need flash-attn's varlen kernel (CUDA): the reason
   they did not run is recorded;
6. encode throughput: model.encode against SentenceTransformer.encode.
bench.json's `goals` holds each goal as {value, goal, met}. The model is a small Qwen3 built
from a config; the texts are BBC News cut to lengths of plan.length_mix.
"""
import argparse
import copy
import gc
import json
import operator
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from transformers import AutoModel, Qwen3Config

import data as D
import model as M
import train
from loss import TEMPERATURE, f2llm_loss
from runtime import attention as A
from tiny import demo
from tiny import tokenizer as tiny_tokenizer
from tools import plan

CPU = torch.device("cpu")
INSTRUCTION = demo.DEMO_INSTRUCTIONS["bbc_headline_retrieval"]


# ---------------------------------------------------------------------------- inputs
def text_pool(tokenizer, n_articles: int = 400) -> list[int]:
    """One long stream of token ids of BBC article bodies to cut texts from."""
    bodies = [a["body"] for a in demo.bbc_articles()[:n_articles]]
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


@dataclass
class Texts:
    """One rank's retrieval batch as texts: queries (b,), positives (b,), negatives (b, k)."""
    queries: list[str]
    positives: list[str]
    negatives: list[list[str]]


def make_batch(pool, tokenizer, queries: int, k: int, max_length: int, seed: int) -> Texts:
    """A retrieval batch (hard negatives and in-batch negatives both count) of the length mix."""
    lengths = plan.length_mix(np.random.default_rng(seed), queries, k, max_length)
    rng = np.random.default_rng(seed + 1)
    q = cut_texts(rng, pool, tokenizer, lengths[:queries], D.instruct(INSTRUCTION, ""))
    docs = cut_texts(rng, pool, tokenizer, lengths[queries:])
    negatives = [docs[queries + i * k: queries + (i + 1) * k] for i in range(queries)]
    return Texts(q, docs[:queries], negatives)


# ---------------------------------------------------------------------------- the steps
def ours_step(backbone, seqs, loss_fn, chunk_tokens: int, bf16: bool = False) -> dict:
    """train.cached_step exactly as train.py runs it (world 1), with the loop's bookkeeping
    taken from its chunks."""
    device = next(backbone.parameters()).device
    chunks = M.packed_chunks(backbone, seqs, chunk_tokens)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    losses = train.cached_step(backbone, chunks, loss_fn, autocast)
    return dict(loss=losses[0].item(), chunks=len(chunks), real_tokens=sum(len(s) for s in seqs),
                computed_tokens=sum(packed.computed_tokens for packed, _ in chunks))


def count_chunk_step(backbone, seqs, loss_fn, chunk_size: int, pad_id: int,
                     bf16: bool = False) -> dict:
    """The step before packing: length-sorted chunks of chunk_size sequences, each padded to
    its longest, an autocast region per chunk (so bf16 weights are re-cast per chunk)."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    chunks = [order[i:i + chunk_size] for i in range(0, len(order), chunk_size)]
    device = next(backbone.parameters()).device
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    padded = [tuple(t.to(device) for t in M.pad([seqs[i] for i in rows],
                                                pad_id)) for rows in chunks]
    reps, states = torch.empty(len(seqs), backbone.config.hidden_size, device=device), []
    with torch.no_grad():
        for rows, inputs in zip(chunks, padded):
            states.append(train.rng_state(device))
            with autocast():
                reps[rows] = M.embed(backbone, *inputs)
    reps.requires_grad_(True)
    loss = loss_fn(reps)[0]
    loss.backward()
    for rows, inputs, state in zip(chunks, padded, states):
        with train.restored_rng(state, device):
            with autocast():
                chunk = M.embed(backbone, *inputs)
            (chunk * reps.grad[rows]).sum().backward()
    return dict(loss=loss.item(), chunks=len(chunks), real_tokens=sum(len(s) for s in seqs),
                computed_tokens=sum(len(r) * len(seqs[r[0]]) for r in chunks))


def official_step(backbone, seqs, loss_fn, pad_id: int) -> dict:
    """The official code's step: all S sequences padded to the longest in ONE forward (the
    caller enables activation checkpointing on `backbone`), the same loss, backward."""
    input_ids, lengths = M.pad(seqs, pad_id)  # (S, longest)
    with A.padded_attention(backbone):  # the backward's recomputed forwards are padded too
        loss = loss_fn(M.embed(backbone, input_ids, lengths))[0]  # reps (S, D) fp32
        loss.backward()
    return dict(loss=loss.item(), real_tokens=int(lengths.sum()), computed_tokens=input_ids.numel())


def checkpointed(backbone):
    """A copy of backbone (same weights, own grads) with activation checkpointing on."""
    net = copy.deepcopy(backbone).train()
    net.activation_checkpointing_enable()
    return net


def weight_casts(backbone, step) -> int:
    """The most times any one weight is cast to bf16 while `step()` runs."""
    from torch.utils._python_dispatch import TorchDispatchMode
    params = {p.untyped_storage().data_ptr() for p in backbone.parameters()}
    casts = {}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and out.dtype == torch.bfloat16:
                ptr = args[0].untyped_storage().data_ptr()
                if ptr in params:
                    casts[ptr] = casts.get(ptr, 0) + 1
            return out
    with Count():
        step()
    backbone.zero_grad(set_to_none=True)
    return max(casts.values())


def work(backbone, step) -> dict:
    """What one `step()` computes, the same on any machine and load: FLOPs (torch's counter:
    matmuls and attention) and aten ops dispatched (each a kernel launch on a GPU: what many
    small chunks pay). A time ratio that moves while these stay put is the machine moving."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode
    ops = [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops[0] += 1
            return func(*args, **(kwargs or {}))
    with FlopCounterMode(display=False) as flops, Count():
        step()
    backbone.zero_grad(set_to_none=True)
    return dict(flops=flops.get_total_flops(), aten_ops=ops[0])


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
    texts = [a["headline"] + "\n" + a["body"] for a in demo.bbc_articles()]
    tokenizer = tiny_tokenizer.train_tokenizer(texts, vocab_size=args.vocab)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=args.hidden,
                         intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 128,
                         head_dim=64, max_position_embeddings=8192, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(args.seed)
    # sdpa rows, or with F2LLM_FORCE_VARLEN=1 the CUDA layout (varlen rows; the baselines'
    # padded forwards run as sdpa on it)
    attn = A.attention_implementation(CPU, bf16=False)
    backbone = AutoModel.from_config(config, attn_implementation=attn).train()
    return tokenizer, backbone


# ---------------------------------------------------------------------------- 3. memory
def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def tokenized(batch: Texts, tokenizer, max_length: int):
    """A batch -> (its id lists [queries; positives; negatives], the recipe's loss of its reps)."""
    texts = batch.queries + batch.positives + sum(batch.negatives, [])
    seqs, _ = M.tokenize(tokenizer, texts, max_length)
    b, k = len(batch.queries), len(batch.negatives[0])
    return seqs, lambda reps: f2llm_loss(reps, b, k, in_batch=True)


def memory_probe(args):
    """Child process (started with a fixed glibc mmap threshold, so every freed tensor goes
    back to the OS and RSS follows the live tensors): load the export, then for each step and
    batch size run ONE step and report the rise of the peak RSS (VmHWM, reset just before)
    over the RSS just before the step."""
    backbone, tokenizer = M.load_backbone(args.export, A.attention_implementation(CPU, False))
    official = checkpointed(backbone.train())
    pool, out = text_pool(tokenizer), {}
    for step in ("ours", "count", "official"):
        for scale in (1, 8):
            batch = make_batch(pool, tokenizer, args.memory_queries * scale, args.k,
                               args.max_length, args.seed)
            seqs, loss_fn = tokenized(batch, tokenizer, args.max_length)
            net = official if step == "official" else backbone
            gc.collect()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
            before = rss_kib("VmRSS")
            m = (official_step(net, seqs, loss_fn,
                               tokenizer.pad_token_id) if step == "official" else
                 count_chunk_step(net, seqs, loss_fn, args.chunk_size,
                                  tokenizer.pad_token_id) if step == "count"
                 else ours_step(net, seqs, loss_fn, args.chunk_tokens))
            out[f"{step}_x{scale}"] = dict(step_mib=(rss_kib("VmHWM") - before) / 1024,
                                           before_mib=before / 1024,
                                           sequences=len(seqs),
                                           computed_tokens=m["computed_tokens"],
                                           real_tokens=m["real_tokens"])
            net.zero_grad(set_to_none=True)
            del m
    print(json.dumps(out))


def bench_memory(args, export) -> dict:
    # glibc serves blocks above its mmap threshold with mmap and unmaps them on free, but the
    # threshold moves up as blocks are freed; fixing it keeps RSS = live tensors + small heap
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, "-m", "bench.step", "--probe", "--export", export,
           *sum(([f"--{k.replace('_', '-')}", str(getattr(args, k))] for k in
                 ("memory_queries", "chunk_size", "chunk_tokens", "max_length", "k", "seed")), [])]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=D.HERE)
    if res.returncode:
        raise SystemExit(f"bench/step.py: the memory probe failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- 1, 2, 4, 5, 6
def bench_steps(args, backbone, tokenizer, pool) -> dict:
    """Ours (packed, token budget), the count-chunk step and the official step: same batch,
    same weights, fp32."""
    batch = make_batch(pool, tokenizer, args.queries, args.k, args.max_length, args.seed)
    seqs, loss_fn = tokenized(batch, tokenizer, args.max_length)
    official, info, pad = checkpointed(backbone), {}, tokenizer.pad_token_id

    def run(name, net, step):
        def go():
            info[name] = step()
            net.zero_grad(set_to_none=True)
        return go
    steps = {"ours": (backbone,
                      lambda: ours_step(backbone, seqs, loss_fn, args.chunk_tokens)),
             "count": (backbone,
                       lambda: count_chunk_step(backbone, seqs, loss_fn, args.chunk_size, pad)),
             "official": (official, lambda: official_step(official, seqs, loss_fn, pad))}
    times = rounds({name: run(name, net, step) for name, (net, step) in steps.items()},
                   args.repeats)
    real = info["ours"]["real_tokens"]
    casts = {name: weight_casts(backbone, lambda: step(True)) for name, step in (
        ("ours", lambda bf16: ours_step(backbone, seqs, loss_fn, args.chunk_tokens, bf16)),
        ("count",
         lambda bf16: count_chunk_step(backbone, seqs, loss_fn, args.chunk_size, pad, bf16)))}
    done = {name: work(net, step) for name, (net, step) in steps.items()}
    return dict(sequences=len(seqs), real_tokens=real, work=done,
                chunks={n: info[n].get("chunks", 1) for n in info},
                loss={n: m["loss"] for n, m in info.items()},
                efficiency={n: m["real_tokens"] / m["computed_tokens"] for n, m in info.items()},
                weight_casts_per_step=casts,
                seconds={n: spread(t) for n, t in times.items()},
                tokens_per_s={n: spread([real / t for t in ts]) for n, ts in times.items()},
                speedup={n: spread([o / t for o, t in zip(times["official"], times[n])])
                         for n in ("ours", "count")})


def paper_batch_efficiency(args, batches: int = 20) -> dict:
    """Padding efficiency at the paper's per-GPU batch (b = 64, k = 7: S = 576) on the length
    mix, exact token counts of the chunk plans, no model: packed as on a GPU (one varlen row
    per chunk), packed as on a CPU (sdpa rows as wide as the chunk's longest sequence), the
    count-chunk step (C = 16, the old 0.6b preset) and the official step (one padded batch)."""
    rng, eff = np.random.default_rng(args.seed), {"varlen": [], "rows": [], "count": [],
                                                  "official": []}
    budget = train.PRESET_CHUNK_TOKENS["0.6b"]
    for _ in range(batches):
        lengths = plan.length_mix(rng, 64, 7, args.max_length)
        real = sum(lengths)
        for name, width in (("varlen", None), ("rows", max(lengths))):
            chunks = M.make_chunks(lengths, budget, width=width)
            computed = sum(M.pack([[0] * lengths[i] for i in c],
                                  width).computed_tokens for c in chunks)
            eff[name].append(real / computed)
        order = sorted(lengths, reverse=True)
        counted = sum(len(order[i:i + 16]) * order[i] for i in range(0, len(order), 16))
        eff["count"].append(real / counted)
        eff["official"].append(real / (len(lengths) * max(lengths)))
    return dict(chunk_tokens=budget, **{n: spread(v) for n, v in eff.items()})


ST_MODES = {  # name: CachedMultipleNegativesRankingLoss's mini-batch arguments, from args
    "count": lambda args: dict(mini_batch_size=args.chunk_size),
    "tokens": lambda args: dict(mini_batch_num_tokens=args.chunk_tokens),
}


def st_flattened_blocker(export) -> str | None:
    """Why sentence-transformers' flattened (padding-free, cu_seq_lens) inputs cannot run here,
    or None. Its Transformer flattens only under a flash-attention implementation with a varlen
    kernel (flash-attn or the `kernels` package, CUDA builds); nothing stands in for it."""
    from sentence_transformers import SentenceTransformer
    try:
        st = SentenceTransformer(export, device="cpu",
                                 model_kwargs={"attn_implementation": "flash_attention_2"})
    except (ImportError, ValueError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return None if st[0].can_flatten_inputs else "flash_attention_2 loaded, no varlen function"


def bench_sentence_transformers(args, backbone, tokenizer, pool, st) -> dict:
    """A pairs-only batch: our step with the in-batch loss against CachedMNRL in each of its
    modes (ST_MODES: C sequences per mini-batch; our token budget per mini-batch, cut from each
    column in order and padded to the mini-batch's longest). The goals take its fastest mode."""
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss
    pairs = make_batch(pool, tokenizer, args.st_queries, 0, args.max_length, args.seed + 1)
    loss = {}

    def ours():  # tokenizing is timed for both: CachedMNRL tokenizes too
        seqs, loss_fn = tokenized(pairs, tokenizer, 8192)  # the export truncates at 8192 too
        loss["ours"] = ours_step(backbone, seqs, loss_fn, args.chunk_tokens)["loss"]
        backbone.zero_grad(set_to_none=True)

    def theirs(mode):
        st_loss = CachedMultipleNegativesRankingLoss(st, scale=1 / TEMPERATURE,
                                                     **ST_MODES[mode](args))

        def step():
            value = st_loss([st.preprocess(pairs.queries), st.preprocess(pairs.positives)], None)
            value.backward()
            loss[mode] = value.item()
            st.zero_grad(set_to_none=True)
        return step
    times = rounds({"ours": ours, **{mode: theirs(mode) for mode in ST_MODES}}, args.repeats)
    modes = {mode: dict(loss=loss[mode], seconds=spread(times[mode]),
                        time_ratio=spread([o / s for o, s in zip(times["ours"], times[mode])]))
             for mode in ST_MODES}
    best = min(modes, key=lambda mode: modes[mode]["seconds"]["median"])
    return dict(pairs=args.st_queries, loss_ours=loss["ours"], modes=modes, best=best,
                loss_st=modes[best]["loss"], time_ratio=modes[best]["time_ratio"],
                seconds=dict(ours=spread(times["ours"]), **{m: modes[m]["seconds"]
                                                            for m in modes}))


def bench_encode(args, backbone, tokenizer, pool, st) -> dict:
    """model.encode against SentenceTransformer.encode: same texts (1/9 queries), same batch size
    (texts per forward: ST pads each length-sorted batch, ours packs it)."""
    lengths = plan.length_mix(np.random.default_rng(args.seed + 2), args.encode_texts // 9, 8,
                              args.max_length)
    rng, n_q = np.random.default_rng(args.seed + 3), args.encode_texts // 9
    texts = (cut_texts(rng, pool, tokenizer, lengths[:n_q], D.instruct(INSTRUCTION, ""))
             + cut_texts(rng, pool, tokenizer, lengths[n_q:]))
    backbone.eval(), st.eval()
    emb = {}
    size = args.encode_batch
    times = rounds({"ours": lambda: emb.update(ours=M.encode(backbone, tokenizer, texts,
                                                             batch_size=size)),
                    "st": lambda: emb.update(st=st.encode(texts, batch_size=size,
                                                          convert_to_tensor=True))},
                   args.repeats)
    backbone.train()
    real = sum(len(s) for s in M.tokenize(tokenizer, texts, 8192)[0])
    return dict(texts=len(texts), real_tokens=real,
                max_abs_diff=(emb["ours"] - emb["st"].cpu()).abs().max().item(),
                tokens_per_s={n: spread([real / x for x in t]) for n, t in times.items()},
                speedup=spread([s / o for o, s in zip(times["ours"], times["st"])]))


# ---------------------------------------------------------------------------- the goals
COMPARE = {">=": operator.ge, ">": operator.gt, "<=": operator.le,
           "abs <=": lambda value, bound: abs(value) <= bound}


def goals(r) -> dict:
    """{name: {value, goal, met}}: the medians of the paired ratios against their goals. Each
    goal is written here only: the table prints these."""
    s, st, grow = r["steps"], r["sentence_transformers"], r["memory_growth"]
    rows = {  # name: (value, comparison, bound)
        "speedup_vs_official": (s["speedup"]["ours"]["median"], ">=", "4"),
        "speedup_vs_count_chunks": (s["tokens_per_s"]["ours"]["median"]
                                    / s["tokens_per_s"]["count"]["median"], ">", "1"),
        "padding_efficiency_paper_batch": (r["paper_batch_efficiency"]["rows"]["median"], ">=",
                                           "0.98"),
        "memory_growth_batch_x8": (grow["ours"], "<=", "1.25"),
        "weight_casts_per_step": (s["weight_casts_per_step"]["ours"], "<=", "2"),
        "step_time_vs_st": (st["time_ratio"]["median"], "<=", "1.0"),
        "encode_vs_st": (r["encode"]["speedup"]["median"], ">=", "1.0"),
        "loss_diff_vs_st": (st["loss_ours"] - st["loss_st"], "abs <=", "1e-5"),
    }
    return {name: dict(value=v, goal=f"{op} {bound}", met=bool(COMPARE[op](v, float(bound))))
            for name, (v, op, bound) in rows.items()}


def table(r) -> list[tuple]:
    """(measure, value, goal, met) rows; values are median [min-max] over the rounds; a row
    that names a goal of `goals` shows it and whether it is met."""
    fmt = lambda d: f"{d['median']:.2f} [{d['min']:.2f}-{d['max']:.2f}]"
    s, paper, st, enc, grow = (r["steps"], r["paper_batch_efficiency"],
                               r["sentence_transformers"], r["encode"], r["memory_growth"])
    rows = [  # (measure, value, the goal's name or None)
        ("1. step throughput, ours / official", fmt(s["speedup"]["ours"]),
         "speedup_vs_official"),
        ("   count-chunk step (C) / official", fmt(s["speedup"]["count"]), None),
        ("   work per step, count / ours: FLOPs | aten ops",
         " | ".join(f"{s['work']['count'][w] / s['work']['ours'][w]:.2f}x"
                    for w in ("flops", "aten_ops")), None),
        ("2. padding efficiency, paper batch: packed rows", fmt(paper["rows"]),
         "padding_efficiency_paper_batch"),
        ("   varlen row | count chunks | official",
         f"{paper['varlen']['median']:.2f} | {paper['count']['median']:.2f}"
         f" | {paper['official']['median']:.2f}", None),
        ("3. step peak memory, batch x8: ours", f"{grow['ours']:.2f}x", "memory_growth_batch_x8"),
        ("   count chunks | official", f"{grow['count']:.2f}x | {grow['official']:.2f}x", None),
        ("4. bf16 casts of a weight per step: ours", str(s["weight_casts_per_step"]["ours"]),
         "weight_casts_per_step"),
        ("   count chunks", str(s["weight_casts_per_step"]["count"]), None),
        ("5. vs ST CachedMNRL, best mode: loss ours - ST",
         f"{st['loss_ours'] - st['loss_st']:+.1e}", "loss_diff_vs_st"),
        (f"   step time ours / ST {st['best']} mode", fmt(st["time_ratio"]), "step_time_vs_st"),
        *((f"   ours / ST {mode} mode (loss diff)", f"{fmt(m['time_ratio'])} "
           f"({st['loss_ours'] - m['loss']:+.1e})", None) for mode, m in st["modes"].items()),
        ("   ST flattened inputs (cu_seq_lens)",
         "ran" if st["flattened"] is None else "not run: no flash-attn varlen", None),
        ("6. encode throughput ours / ST", fmt(enc["speedup"]), "encode_vs_st"),
    ]
    return [(measure, value, r["goals"][goal]["goal"] if goal else "",
             r["goals"][goal]["met"] if goal else None) for measure, value, goal in rows]


# ---------------------------------------------------------------------------- main
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.step",
                                description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--queries", type=int, default=4,
                   help="queries per timed step (S = queries * (2 + k))")
    p.add_argument("--memory-queries", type=int, default=1,
                   help="queries of the x1 batch of the memory test")
    p.add_argument("--k", type=int, default=7, help="hard negatives per query (retrieval: 7)")
    p.add_argument("--chunk-tokens", type=int, default=2048,
                   help="token budget of a packed chunk (ours)")
    p.add_argument("--chunk-size", type=int, default=2,
                   help="C: sequences per chunk of the count-chunk step")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--st-queries", type=int, default=8,
                   help="query/positive pairs of the ST comparison")
    p.add_argument("--encode-texts", type=int, default=72)
    p.add_argument("--encode-batch", type=int, default=32,
                   help="texts per forward when encoding (both sides)")
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench.json")
    p.add_argument("--probe", action="store_true",
                   help=argparse.SUPPRESS)  # internal: the memory child
    p.add_argument("--export", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        return memory_probe(args)
    t0 = time.time()
    say = lambda msg: print(f"[{time.time() - t0:4.0f}s] {msg}", flush=True)
    tokenizer, backbone = build(args)
    pool = text_pool(tokenizer)
    n_params = sum(p.numel() for p in backbone.parameters())
    say(f"model: Qwen3 {args.layers} layers x {args.hidden}, vocab {len(tokenizer)}, "
        f"{n_params / 1e6:.1f}M parameters")
    r = dict(machine=dict(platform=platform.platform(),
                          processor=platform.processor() or platform.machine(),
                          cpus=os.cpu_count(), torch=torch.__version__,
                          attention=backbone.config._attn_implementation,
                          threads=torch.get_num_threads(),
                          load_average_at_start=os.getloadavg()),  # other users of the CPUs
             commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                   text=True, cwd=D.HERE
                                   ).stdout.strip(),
             args=vars(args), parameters=n_params)
    r["steps"] = bench_steps(args, backbone, tokenizer, pool)
    r["paper_batch_efficiency"] = paper_batch_efficiency(args)
    say("1, 2, 4: steps done")
    export = tempfile.mkdtemp(prefix="f2llm_bench_")
    M.save_export(backbone, tokenizer, export)
    r["memory"] = mem = bench_memory(args, export)
    r["memory_growth"] = {n: mem[f"{n}_x8"]["step_mib"] / mem[f"{n}_x1"]["step_mib"]
                          for n in ("ours", "count", "official")}
    say("3: memory done")
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(export, device="cpu").train()
    r["sentence_transformers"] = bench_sentence_transformers(args, backbone, tokenizer, pool, st)
    r["sentence_transformers"]["flattened"] = st_flattened_blocker(export)
    say("5: sentence-transformers loss done")
    r["encode"] = bench_encode(args, backbone, tokenizer, pool, st)
    shutil.rmtree(export, ignore_errors=True)
    r["wall_s"], r["machine"]["load_average_at_end"] = time.time() - t0, os.getloadavg()
    r["goals"] = goals(r)
    rows = table(r)
    r["table"] = [dict(measure=m.strip(), value=v, goal=g, met=ok) for m, v, g, ok in rows]

    s = r["steps"]
    machine = r["machine"]
    print(f"\nF2LLM step benchmark | commit {r['commit']} | {machine['processor']}, "
          f"{machine['cpus']} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"load average {machine['load_average_at_start'][0]:.1f} | Qwen3 "
          f"{args.layers}x{args.hidden}, {n_params / 1e6:.1f}M params | timed step: "
          f"{s['sequences']} sequences, {s['real_tokens']} real tokens, chunks: {s['chunks']} "
          f"(budget {args.chunk_tokens} tokens, C={args.chunk_size}) | "
          f"median [min-max] of {args.repeats} rounds after a warm-up")
    print(f"{'measure':48s} {'value':34s} {'goal':11s} met")
    for name, value, goal, met in rows:
        print(f"{name:48s} {value:34s} {goal:11s} {'' if met is None else 'yes' if met else 'NO'}")
    print("seconds per step: " + ", ".join(f"{n} {v['median']:.2f}"
                                           for n, v in s["seconds"].items())
          + " | step memory MiB x1 -> x8: " + ", ".join(
              f"{n} {mem[n + '_x1']['step_mib']:.0f} -> {mem[n + '_x8']['step_mib']:.0f}"
              for n in r["memory_growth"])
          + f" | wall {r['wall_s']:.0f}s")
    with open(args.out, "w") as f:
        json.dump(r, f, indent=2)
    print(f"wrote {args.out}")
    return r


if __name__ == "__main__":
    main(sys.argv[1:])
