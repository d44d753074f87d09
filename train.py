"""Train an F2LLM embedding model: one stage of contrastive finetuning (arXiv 2510.02294).

    python train.py --size tiny                          # the whole recipe on a laptop CPU
    torchrun --nproc_per_node 8 train.py --size 4b       # the paper's run
    python train.py --size 4b --dry-run --nproc 8        # plan it, no weights

Reads in the order things happen: the command line (config.py's fields) -> the processes
(runtime/parallel.py) -> data -> model -> optimizer and schedule -> the cached-negatives step
(docs/design.md §4) -> the loop (log, validate, checkpoint, runtime/curves.py's figure) -> the
final export in OUT/final.
"""
import contextlib
import dataclasses
import gc
import json
import math
import os
import shlex
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from config import (  # no torch here: the flags are checked before the imports below
    MATH_FIELDS,
    PRESET_CHUNK_TOKENS,
    PRESETS,
    Config,
    Recipe,
    check_config,
)
from config import parse_config as parse_flags


def parse_config(argv=None) -> Config:
    """The command line: Config's fields as flags (config.parse_config), -h led by this file's
    docstring."""
    return parse_flags(argv, __doc__)


if __name__ == "__main__":  # -h and a misspelt flag answer before torch and transformers load
    parse_config(sys.argv[1:])

# The imports below make ~600k objects that live as long as the process: no collection while
# they load, then frozen out of every later one, which would walk them all (a short run or an
# evaluation spends ~20% less CPU; docs/performance.md)
gc.disable()
import torch
import torch.distributed as dist
from transformers import AutoTokenizer

import data as D
import model as M
from loss import IN_BATCH_TYPES, distillation_loss, f2llm_loss, matryoshka, matryoshka_dims
from model import embed_packed
from runtime import attention as A
from runtime import checkpoint
from runtime import tokens as T
from runtime.cache import cache_root
from runtime.curves import plot_curves
from runtime.parallel import (
    print0,
    restarted_by_torchrun,
    setup_distributed,
    teardown,
    use_expandable_segments,
    wait_for_every_rank,
    wrap_ddp,
)
from runtime.signals import StopSignals

gc.freeze()
gc.enable()


# ---------------------------------------------------------------------------- the step
# Copyable: the step (these functions, model.py's packing and pooling, loss.py) needs torch
# alone; tests/test_step.py runs a copy of exactly that text. docs/design.md §4 walks it.
def rng_state(device):
    return (torch.get_rng_state(),
            torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


@contextlib.contextmanager
def restored_rng(state, device):
    """Replay pass 1's RNG in pass 2, so dropout (if any) draws the same masks."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


def embed_chunks(net, chunks, autocast, rng_states=None, embed=embed_packed):
    """Pass 1, no grad (the step's, validation's, the teacher's): chunks [(Packed, rows), ...]
    -> (S, D) fp32 RAW pooled states in the batch's order; ONE autocast region, so each weight
    is cast once per pass. rng_states, a list, gets each chunk's RNG state. embed(net, chunk,
    unit=False) -> (n, D): model.embed_packed, or any embedding of a chunk."""
    states, order = [], []
    with torch.no_grad(), autocast:
        for packed, rows in chunks:
            if rng_states is not None:
                rng_states.append(rng_state(rows.device))
            states.append(embed(net, packed, unit=False))  # (n, D)
            order.append(rows)
    return torch.cat(states)[torch.cat(order).argsort()]  # chunk order -> batch order


def cached_step(net, chunks, loss_fn, autocast, embed=embed_packed) -> torch.Tensor:
    """docs/design.md §4: pass 1 (no grad) -> loss on cached reps -> pass 2 (grad, per chunk).

    net: the backbone or its DDP wrapper; chunks: model.packed_chunks(...) of this rank's
    sequences; loss_fn(reps (S, D) fp32 raw states) -> (loss, *terms); autocast: a reusable
    region, entered once per pass; embed: as embed_chunks'. Leaves in .grad the gradient of
    the GLOBAL batch's loss (one all-reduce, DDP's, at the last chunk); no host sync (a
    non-finite loss still runs pass 2; the caller skips the update). -> (1 + terms,) detached."""
    # 1. pass 1, no grad: cache the raw pooled states of all S sequences, each chunk's RNG state
    rng_states = []
    reps = embed_chunks(net, chunks, autocast, rng_states, embed).requires_grad_()  # (S, D)
    # 2. loss on the cached reps, in fp32: d loss / d reps, including other ranks' queries' terms
    loss, *terms = loss_fn(reps)
    loss.backward()
    # 3. pass 2, with grad: replay each chunk (same dropout masks) and push its reps' gradient
    #    into the weights; every chunk but the last inside DDP's no_sync, forward and backward
    no_sync = getattr(net, "no_sync", contextlib.nullcontext)  # a plain module: nothing to sync
    with autocast:
        for i, (packed, rows) in enumerate(chunks):
            last = i == len(chunks) - 1
            with contextlib.nullcontext() if last else no_sync(), \
                    restored_rng(rng_states[i], rows.device):
                raw = embed(net, packed, unit=False)  # (n, D), with grad
                (raw * reps.grad[rows]).sum().backward()
    return torch.stack([loss, *terms]).detach()


def all_means(values: torch.Tensor) -> list[float]:
    """(n,) on the device -> the n means over ranks: ONE all-reduce, ONE host sync. In float64,
    so a value equal on every rank (the gradient norm) comes back exactly."""
    values = values.detach().double()
    if dist.is_initialized():
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values.tolist()


def optimizer_step(optimizer, scheduler, trained, grad_clip: float, losses: torch.Tensor,
                   ddp=None) -> tuple[list[float], float, bool]:
    """Step 4 of docs/design.md §4 (tools/gpu_check.py runs it too): clip; the logged values
    (losses, then the norm) in ONE all-reduce and ONE host sync; step unless a value is
    non-finite (a non-finite loss on any rank makes the global norm non-finite: one check, the
    same on every rank); zero the gradients in place under DDP, so they stay in its buckets.
    -> (losses averaged over ranks, gradient norm before clipping, whether it was applied)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(trained, grad_clip)  # stays on the device
    *values, grad_norm = all_means(torch.cat([losses.detach().reshape(-1), grad_norm[None]]))
    applied = math.isfinite(values[0]) and math.isfinite(grad_norm)
    if applied:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=ddp is None)
    return values, grad_norm, applied


def step_loss(batch: D.Batch, cfg: Recipe, teacher_reps=None):
    """The recipe's loss of one rank's batch as a function of its pooled states (S, D), raw or
    unit: F2LLM's total; with --mrl its Matryoshka sum over nested dims; plus kd_weight x the
    distillation term of the teacher's raw states, at the full dimension (F2LLM v2); without
    the in-batch term with --no-in-batch. -> (total, hard, in-batch[, distillation])."""
    b, k = len(batch.queries), len(batch.negatives[0]) if batch.negatives else 0
    in_batch = cfg.in_batch and batch.task_type in IN_BATCH_TYPES
    gather, t = cfg.in_batch_gather, cfg.temperature
    contrastive = lambda reps: f2llm_loss(reps, b, k, in_batch, t, gather)

    def loss_fn(reps):
        total, hard, in_batch_term = matryoshka(contrastive, reps, matryoshka_dims(
            reps.shape[1])) if cfg.mrl else contrastive(reps)
        if teacher_reps is None:
            return total, hard, in_batch_term
        kd = distillation_loss(reps, teacher_reps, b, k, in_batch, cfg.kd_mode, t, gather)
        return total + cfg.kd_weight * kd, hard, in_batch_term, kd
    return loss_fn


def validate(backbone, batches, rank: int, world: int, cfg: Config, autocast) -> tuple:
    """The held-out loss twice, on the same reps: the run's own contrastive loss (F2LLM's, or
    its Matryoshka sum, at its temperature, with or without in-batch: the variant's total) and
    the recipe's (the preset's formula, Recipe()'s defaults), so that two variants' curves
    compare. Both without the distillation term, so runs with and without a teacher compare.
    One all-reduce. -> (own, recipe's)."""
    recipe = Recipe()  # every loss field at the preset's value
    losses = []
    for global_batch in batches:
        batch = global_batch.shard(rank, world)
        chunks = M.packed_chunks(backbone, batch.sequences(), cfg.chunk_tokens, cfg.chunk_size)
        reps = embed_chunks(backbone, chunks, autocast)  # (S, D), no grad
        losses.append(torch.stack([step_loss(batch, cfg)(reps)[0],
                                   step_loss(batch, recipe)(reps)[0]]))
    means = all_means(torch.stack(losses).T.reshape(-1)) if losses else [0.0, 0.0]
    n = max(len(losses), 1)
    return sum(means[:n]) / n, sum(means[n:]) / n


# ---------------------------------------------------------------------------- schedule
def lr_lambda(lr: float, min_lr: float, warmup_steps: int, total_steps: int):
    """Linear warmup to lr, cosine decay to min_lr: a multiplier of lr for LambdaLR."""
    def f(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        cosine = 0.5 * (1 + math.cos(math.pi * progress))  # 1 -> 0
        return (min_lr + (lr - min_lr) * cosine) / lr
    return f


# ---------------------------------------------------------------------------- main
def architecture(cfg: Config):
    """The run's model config without its weights (tools/plan.py): tiny's (its tokenizer's
    16,384 tokens), a preset's, or --model's folder or Qwen3 size. ValueError if unknown."""
    from tools import plan  # the planner serves the dry run and the CUDA budget only
    if cfg.model == "tiny":
        return M.tiny_config(16384)
    if cfg.model == PRESETS[cfg.size].get("model"):
        return plan.qwen3_config(cfg.size)
    return plan.architecture(cfg.model, "--model")


def dry_run(cfg: Config, world: int) -> dict:
    """Plan a run without weights (tools/plan.py): parameters, batch arithmetic (counted from
    the data when it is at hand: --data, or tiny's sample), FLOPs, memory per GPU at the token
    budget the run would take (with --teacher: the teacher's too)."""
    from tools import plan  # the planner serves the dry run and the CUDA budget only
    check_config(cfg, (cfg.nproc or world) * cfg.nodes)
    try:  # the architectures are known (folder or Qwen3 size), before any planning
        config = architecture(cfg)
        if cfg.teacher:
            plan.teacher_config(cfg.teacher)
    except ValueError as e:
        raise SystemExit(f"train.py: error: {e}") from None
    train_rows, k, data_folder = None, max(D.K_BY_TYPE["retrieval"], cfg.k_clustering), ""
    if cfg.data or cfg.size == "tiny":  # count what the loader will draw
        # tiny's sample: the shared cache's, which the run reads too (its build line on stderr,
        # so that --json prints JSON alone)
        data_folder = cfg.data or tiny_sample(cfg, lambda *a: print(*a, file=sys.stderr))
        memo = token_folder(cfg)  # a run's file scans, if a run made them
        try:
            sources = D.load_sources(data_folder, cfg.seed, cfg.val_fraction,
                                     memo if os.path.isdir(memo) else None,
                                     D.DATA_SETS[cfg.data_set][1], cfg.strict_data,
                                     cfg.max_bad_fraction, cfg.k_clustering)
        except D.DataError as e:
            raise SystemExit(f"train.py: data error: {e}") from None
        train_rows, k = [len(s.train_rows) for s in sources], max(s.k for s in sources)
        data_folder = data_folder if cfg.data else "tiny's demo sample"
    released = len(D.read_task_types(None, D.DATA_SETS[cfg.data_set][1]))
    return plan.dry_run(config, cfg.size, cfg.model, cfg.nproc or world, cfg.nodes,
                        cfg.batch_size, cfg.epochs, cfg.steps, cfg.val_fraction, cfg.chunk_tokens,
                        PRESET_CHUNK_TOKENS[cfg.size], cfg.max_length, k=k,
                        shard_optimizer=cfg.shard_optimizer, as_json=cfg.json,
                        lora_rank=cfg.lora_rank, teacher=cfg.teacher, train_rows=train_rows,
                        data=data_folder, released_sources=released)


def chunk_tokens(cfg: Config, world: int, device, sources) -> tuple[int, str]:
    """The run's token budget, and the start-up line's note on where it comes from: on CUDA
    the plan of THIS run on the card it finds (planned_budget); on a CPU the flag or the
    preset's (the plan is of GPU memory)."""
    if device.type != "cuda":
        return cfg.chunk_tokens or PRESET_CHUNK_TOKENS[cfg.size], (
            "--chunk-tokens as given" if cfg.chunk_tokens else "the preset's") + \
            "; a CPU run is not planned, the plan is of GPU memory"
    return planned_budget(cfg, world, torch.cuda.get_device_properties(device).total_memory,
                          max(s.k for s in sources))


def planned_budget(cfg: Config, world: int, card_bytes: int, k: int) -> tuple[int, str]:
    """The token budget of this run's plan (its model, teacher, LoRA rank, world size, a card
    of card_bytes, k negatives): without --chunk-tokens the preset's where it fits, else the
    largest that fits; a given --chunk-tokens whose plan does not fit is refused, before any
    weights load, naming the budget that fits. The budget never changes the gradients (I2),
    so it is free to adapt. -> (tokens, note)."""
    from tools import plan
    given, preset = cfg.chunk_tokens, PRESET_CHUNK_TOKENS[cfg.size]
    try:
        config = architecture(cfg)
        teacher = plan.teacher_config(cfg.teacher) if cfg.teacher else None
    except ValueError as e:
        return given or preset, f"not planned: {e}"
    usable, seqs = plan.usable_bytes(card_bytes), cfg.batch_size // world * (2 + k)
    args = dict(lora_rank=cfg.lora_rank, teacher=teacher, shard_optimizer=cfg.shard_optimizer)
    total = lambda tokens: plan.memory_plan(config, world, tokens, seqs, cfg.shard_optimizer,
                                            cfg.lora_rank, teacher)["total"]
    fit = plan.chunk_tokens_that_fit(config, world, seqs, usable, **args)
    where = (f"{world} rank{'s' * (world > 1)} of {seqs} sequences"
             + (f", LoRA rank {cfg.lora_rank}" if cfg.lora_rank else "")
             + (f", teacher {cfg.teacher}" if cfg.teacher else "")
             + f", {usable / plan.GiB:.1f} GiB of a {card_bytes / plan.GiB:.1f} GiB card")
    if total(fit) > usable:
        raise SystemExit(f"train.py: error: this run's plan does not fit the card at any "
                         f"--chunk-tokens ({where}): {total(fit) / plan.GiB:.1f} GiB at {fit}; "
                         f"use more GPUs, --lora-rank, or a smaller --teacher (--dry-run shows "
                         f"each term)")
    if given and total(given) > usable:
        raise SystemExit(f"train.py: error: --chunk-tokens {given} does not fit this run's plan "
                         f"({where}): {total(given) / plan.GiB:.2f} GiB per GPU; --chunk-tokens "
                         f"{fit} fits, or leave the flag out and the run plans it")
    if given:
        return given, f"--chunk-tokens as given, whose plan fits {where}"
    tokens = plan.planned_chunk_tokens(preset, config, world, seqs, usable, **args)
    return tokens, (f"planned: the preset's, whose plan fits {where}" if tokens == preset else
                    f"planned: the largest whose plan fits {where}; the preset's {preset} does "
                    f"not")


def tiny_sample(cfg: Config, log) -> str:
    """The tiny preset's demo sample: the shared cache's folder, written once per content."""
    from tiny import shared as tiny_setup
    try:
        return tiny_setup.sample_folder(cache_root(cfg.cache_dir), 0, cfg.demo_negatives, log)
    except D.DataError as e:
        raise SystemExit(f"train.py: data error: {e}") from None


def token_folder(cfg: Config) -> str:
    """The token cache (and its file checks): --token-cache, the shared cache's for tiny (keyed
    by content), else OUT/token_cache (the released set's tokens are tens of GB)."""
    if cfg.token_cache:
        return cfg.token_cache
    return (os.path.join(cache_root(cfg.cache_dir), "tokens") if cfg.size == "tiny"
            else os.path.join(cfg.out, "token_cache"))


def setup_data(cfg: Config, rank: int, world: int):
    """Check every source file (before any model is loaded) and plan the batch stream."""
    data_folder = cfg.data
    if not data_folder and cfg.size == "tiny":  # written once per content, read by every run
        data_folder = tiny_sample(cfg, print0)
    elif not data_folder:  # once per node (a marker per host, launch and restart, in OUT)
        launch = f"{os.getppid()}-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        marker = os.path.join(cfg.out, ".downloads",
                              f"{cfg.data_set}-{socket.gethostname()}-{launch}")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        data_folder = D.download_released_data(cfg.data_set, local_rank, marker)
    cache_folder = token_folder(cfg)
    try:  # every rank streams the files through the checks (once: cache_folder keeps the result)
        sources = D.load_sources(data_folder, cfg.seed, cfg.val_fraction, cache_folder,
                                 D.DATA_SETS[cfg.data_set][1], cfg.strict_data,
                                 cfg.max_bad_fraction, cfg.k_clustering)
        stream = D.BatchStream(sources, cfg.batch_size, cfg.seed, cfg.source_sampling)
    except D.DataError as e:
        raise SystemExit(f"train.py: data error: {e}") from None
    print0(f"data: {len(sources)} sources in {data_folder}, {stream.batches_per_epoch} batches "
           f"per epoch (the last of each source filled from its start), sources drawn by the "
           f"{cfg.source_sampling} rule, {sum(len(s.val_rows) for s in sources)} rows held out")
    report = D.data_report(sources)
    for s, n in zip(sources, stream.source_batches):
        skipped = "".join(f", skipped {r['count']} ({why}: rows {r['first_rows'][:5]}, from 0)"
                          for why, r in report[s.name]["skipped"].items())
        print0(f"  {s.name:32s} {s.task_type:14s} k={s.k} train={len(s.train_rows)} "
               f"val={len(s.val_rows)} batches/epoch={n}{skipped}")
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "data_report.json"), "w") as f:
            json.dump(report, f, indent=1)
    return sources, stream, cache_folder


def setup_model(cfg: Config, rank: int, device, bf16: bool, sources):
    """Backbone and tokenizer (the tiny one built here), LoRA adapters if asked, on device."""
    torch.manual_seed(cfg.seed)
    attn, attn_note = A.setup_attention(device, bf16)
    if cfg.model == "tiny":  # trained once per content of the data, in the shared cache
        from tiny import shared as tiny_setup
        tok_dir = tiny_setup.tokenizer_folder(cache_root(cfg.cache_dir), sources, print0)
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        print0(f"tokenizer: {tok_dir}")
        backbone = M.tiny_backbone(tokenizer, cfg.seed, attn)
    else:
        backbone, tokenizer = M.load_backbone(cfg.model, attn)
    if cfg.lora_rank:
        backbone = M.add_lora(backbone, cfg.lora_rank)
        if bf16:  # frozen weights never change: bf16 once, so autocast never casts them again
            for p in backbone.parameters():
                p.data = p.data if p.requires_grad else p.data.to(torch.bfloat16)
    backbone.to(device).train()
    trainable = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    lora = f", LoRA rank {cfg.lora_rank}" if cfg.lora_rank else ""
    print0(f"model: {cfg.model}, {sum(p.numel() for p in backbone.parameters()):,} parameters "
           f"({trainable:,} trained{lora}), dim {backbone.config.hidden_size}, attention {attn} "
           f"(packed rows, {attn_note})")
    print0(f"precision: {'bf16 autocast, fp32 master weights' if bf16 else 'fp32'}"
           + (", Matryoshka loss" if cfg.mrl else "")
           + (", DETACHED in-batch gather (the official code's)"
              if cfg.in_batch_gather == "detached" else ""))
    return backbone, tokenizer


def setup_teacher(cfg: Config, device, bf16: bool, student_dim: int):
    """--teacher: the frozen model whose reps the student distils (bf16 weights on GPU), and
    its tokenizer; (None, None) without one."""
    if not cfg.teacher:
        return None, None
    teacher, tokenizer = M.load_backbone(cfg.teacher, A.attention_implementation(device, bf16),
                                         dtype=torch.bfloat16 if bf16 else torch.float32)
    dim = teacher.config.hidden_size
    if cfg.kd_mode != "kl" and dim < student_dim:
        raise SystemExit(f"train.py: error: --teacher {cfg.teacher} embeds in {dim} dimensions, "
                         f"fewer than the student's {student_dim}: --kd-mode {cfg.kd_mode} "
                         f"compares the first {student_dim}; use --kd-mode kl, which compares "
                         f"scores")
    teacher.requires_grad_(False)
    print0(f"teacher: {cfg.teacher}, {sum(p.numel() for p in teacher.parameters()):,} "
           f"parameters, dim {dim}, --kd-mode {cfg.kd_mode} x {cfg.kd_weight}")
    return teacher.to(device).eval(), tokenizer


def setup_tokens(cfg: Config, sources, cache_folder: str, tokenizer,
                 teacher_tokenizer=None) -> None:
    """Tokenized once by local rank 0 into a cache keyed by data, tokenizer and max length;
    every rank memory-maps the same files (one copy in the page cache per node). A teacher
    with a tokenizer of its own gets its own cache files in the same folder."""
    caches = [(T.TokenCache(cache_folder, tokenizer, cfg.max_length), "tokens")]
    if teacher_tokenizer is not None:
        teacher_cache = T.TokenCache(cache_folder, teacher_tokenizer, cfg.max_length)
        if teacher_cache.tokenizer_id != caches[0][0].tokenizer_id:  # else: the same ids
            caches.append((teacher_cache, "teacher_tokens"))
        print0(f"teacher tokenizer: {'its own' if len(caches) == 2 else 'the same as the student'}")
    builder = int(os.environ.get("LOCAL_RANK", "0")) == 0  # one per node; each file by one of them
    try:
        for cache, attr in caches:
            if builder:
                cache.build(sources, workers=cfg.tokenize_workers)
            cache.open(sources, wait=not builder, attr=attr)
    except D.DataError as e:
        raise SystemExit(f"train.py: data error: {e}") from None
    wait_for_every_rank("data ready")  # the first collective comes next
    print0(f"tokens: {cache_folder}")


def setup_optimizer(cfg: Config, backbone, world: int, total_steps: int):
    """AdamW over the trained parameters (all, or LoRA's adapters), ZeRO-sharded over ranks."""
    params = [p for p in backbone.parameters() if p.requires_grad]
    opt_args = dict(lr=cfg.lr, betas=(0.9, cfg.beta2), weight_decay=cfg.weight_decay)
    if world > 1 and cfg.shard_optimizer:
        from torch.distributed.optim import ZeroRedundancyOptimizer
        optimizer = ZeroRedundancyOptimizer(params, torch.optim.AdamW, **opt_args)
    else:
        optimizer = torch.optim.AdamW(params, **opt_args)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(
        cfg.lr, cfg.min_lr, cfg.warmup_steps, total_steps))


def restore(cfg: Config, backbone, optimizer, scheduler, stream) -> int:
    """Continue from the latest checkpoint (runtime/checkpoint.py): the step it reached (0 for a new
    run)."""
    if not cfg.resume:
        return 0
    path = checkpoint.latest(cfg.out)
    math_fields = {k: Config.__dataclass_fields__[k].default for k in MATH_FIELDS}
    try:
        meta = checkpoint.restore(path, backbone, optimizer, scheduler, dataclasses.asdict(cfg),
                                  math_fields)
    except checkpoint.CheckpointError as e:
        raise SystemExit(f"train.py: error: {e}") from None
    stream.load_state_dict(meta["data"])
    ranks = f"{meta['world']} rank" + "s" * (meta["world"] > 1)
    print0(f"resumed from {path} at step {meta['step']} (saved by {ranks})")
    return meta["step"]


def continues_run(cfg: Config) -> bool:
    """The command of an interrupted run continues it: a run folder whose latest checkpoint
    was saved with this config's math resumes without --resume (one line says so); another
    config is refused, naming every difference, before anything loads."""
    path = checkpoint.latest(cfg.out)
    math_fields = {k: Config.__dataclass_fields__[k].default for k in MATH_FIELDS}
    try:
        checkpoint.check_config(path, checkpoint.read_meta(path)["config"],
                                dataclasses.asdict(cfg), math_fields)
    except checkpoint.CheckpointError as e:
        raise SystemExit(f"train.py: error: --out {cfg.out} holds another run: {e}; rerun "
                         f"that run's command to continue it, or choose another --out") from None
    print0(f"continuing the run in {cfg.out}: its checkpoint {path} has this config "
           f"(the same command continues a run; --resume is implied)")
    return True


def continue_command(argv: list[str], world: int) -> str:
    """The command that continues a stopped run: the one that started it."""
    if world > 1 or "RANK" in os.environ:
        return f"the same torchrun command (train.py {shlex.join(argv)})"
    return shlex.join(["python", "train.py", *argv])


def batch_plan(cfg: Config, world: int, sources, epochs: float, total_steps: int,
               budget: tuple[int, str]) -> str:
    """The batch arithmetic, printed at start (derived numbers never go back into the config);
    budget: chunk_tokens(...)'s (tokens, why)."""
    b = cfg.batch_size // world
    cap = f" and <= {cfg.chunk_size} sequences" if cfg.chunk_size else ""
    return (f"batch: {cfg.batch_size} queries/step = {world} ranks x {b}; per rank up to "
            f"{b * (2 + max(s.k for s in sources))} sequences (b x (2 + k)) in packed chunks of <= "
            f"{budget[0]} tokens{cap} ({budget[1]}); {total_steps} steps ({epochs:.2f} epochs)")


def log_step(record: dict, total_steps: int, eta_s: float) -> str:
    """The step's log line (rank 0 prints it; metrics.jsonl holds the record)."""
    kd = f", kd {record['kd']:.4f}" if "kd" in record else ""
    val = f" | val {record['val_loss']:.4f}" if "val_loss" in record else ""
    if "val_loss" in record and record["val_recipe_loss"] != record["val_loss"]:
        val += f" (the recipe's loss {record['val_recipe_loss']:.4f})"  # a variant's own differs
    return (f"step {record['step']}/{total_steps} | loss {record['loss']:.4f} (hard "
            f"{record['hard']:.4f}, in-batch {record['in_batch']:.4f}{kd}) | lr {record['lr']:.2e}"
            f" | grad {record['grad_norm']:.3f} | {record['time']:.2f}s, "
            f"{record['tokens_per_s']:,.0f} tok/s, {record['chunks']} chunks | eta "
            f"{eta_s / 60:.1f} min{val}")


def count_bad_step(applied: bool, bad_steps: int, step: int, cfg: Config) -> int:
    """Non-finite steps in a row (a skipped update never reaches the weights); too many stop."""
    if applied:
        return 0
    bad_steps += 1
    print0(f"step {step}: non-finite loss or gradient, update skipped ({bad_steps} in a row)")
    if bad_steps >= cfg.max_bad_steps:
        raise SystemExit(f"train.py: error: {bad_steps} non-finite steps in a row "
                         f"(--max-bad-steps); lower --lr, check the data, or resume from "
                         f"an earlier checkpoint")
    return bad_steps


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_config(argv)
    if cfg.dry_run:
        return dry_run(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    allocator_note = use_expandable_segments()  # before CUDA starts
    rank, world, device = setup_distributed(cfg.collective_timeout)
    if restarted_by_torchrun() and checkpoint.latest(cfg.out):
        cfg.resume = True
    elif not cfg.resume and checkpoint.latest(cfg.out):
        cfg.resume = continues_run(cfg)
    check_config(cfg, world)
    if allocator_note and device.type == "cuda":
        print0(allocator_note)
    sources, stream, cache_folder = setup_data(cfg, rank, world)
    total_steps = cfg.steps or cfg.epochs * stream.batches_per_epoch
    budget = chunk_tokens(cfg, world, device, sources)  # refused here if it cannot fit
    print0(batch_plan(cfg, world, sources, total_steps / stream.batches_per_epoch, total_steps,
                      budget))
    os.makedirs(cfg.out, exist_ok=True)
    if rank == 0:
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
    cfg = dataclasses.replace(cfg, chunk_tokens=budget[0])  # the input config keeps the flag
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # one per pass
    backbone, tokenizer = setup_model(cfg, rank, device, bf16, sources)
    teacher, teacher_tokenizer = setup_teacher(cfg, device, bf16, backbone.config.hidden_size)
    setup_tokens(cfg, sources, cache_folder, tokenizer, teacher_tokenizer)
    val_batches = D.ValidationBatches(sources, cfg.batch_size, world, cfg.seed)  # lazily built
    ddp = wrap_ddp(backbone, device) if world > 1 else None
    optimizer, scheduler = setup_optimizer(cfg, backbone, world, total_steps)
    step = restore(cfg, backbone, optimizer, scheduler, stream)
    metrics_path = checkpoint.open_metrics(cfg.out, step, rank, cfg.resume)
    final = os.path.join(cfg.out, "final")
    if step == total_steps and os.path.isdir(final):
        print0(f"the run in {cfg.out} is finished: its export is {final}")
        return teardown()

    # --- the loop; the next batch is drawn in a thread while a step computes
    draw, prefetch = lambda: next(stream).shard(rank, world), ThreadPoolExecutor(max_workers=1)
    pending = prefetch.submit(draw)
    trained = [p for p in backbone.parameters() if p.requires_grad]
    chunk = lambda net, seqs: M.packed_chunks(net, seqs, cfg.chunk_tokens, cfg.chunk_size)
    bad_steps, warned_truncation, t_start, step_start = 0, False, time.time(), step
    stop, stop_flag = StopSignals().install(), torch.zeros(1, device=device)  # 1: a signal came
    while step < total_steps:
        t0 = time.time()
        batch = pending.result()
        data_state = stream.state_dict()  # after this batch: a checkpoint of this step resumes here
        pending = prefetch.submit(draw)
        teacher_reps = None if teacher is None else embed_chunks(  # its raw states, no grad
            teacher, chunk(teacher, (batch.teacher or batch).sequences()), autocast)
        seqs = batch.sequences()
        chunks = chunk(backbone, seqs)
        losses = cached_step(ddp or backbone, chunks, step_loss(batch, cfg, teacher_reps), autocast)
        if stop.signum:
            stop_flag.fill_(1.0)  # a kernel launch, no sync; it rides the all-reduce below
        (loss, hard, in_batch, *kd, stopping), grad_norm, applied = optimizer_step(
            optimizer, scheduler, trained, cfg.grad_clip, torch.cat([losses, stop_flag]), ddp)
        step += 1
        bad_steps = count_bad_step(applied, bad_steps, step, cfg)
        if batch.truncated and not warned_truncation:
            print0(f"note: texts longer than --max-length {cfg.max_length} are cut to "
                   f"{cfg.max_length - 1} tokens + EOS; metrics.jsonl counts them per step "
                   f"('truncated')")
            warned_truncation = True
        dt, real_tokens = time.time() - t0, sum(len(s) for s in seqs)
        record = dict(step=step, loss=loss, hard=hard, in_batch=in_batch, source=batch.source,
                      **({"kd": kd[0]} if kd else {}), lr=scheduler.get_last_lr()[0],
                      grad_norm=grad_norm, seq_per_s=len(seqs) * world / dt,
                      tokens_per_s=real_tokens * world / dt, real_tokens=real_tokens,
                      computed_tokens=sum(packed.computed_tokens for packed, _ in chunks),
                      chunks=len(chunks), truncated=batch.truncated, time=dt)
        validating = (cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps
        if validating:
            record["val_loss"], record["val_recipe_loss"] = validate(
                backbone, val_batches, rank, world, cfg, autocast)
        print0(log_step(record, total_steps,
                        (time.time() - t_start) / (step - step_start) * (total_steps - step)))
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if validating:
                plot_curves(metrics_path, os.path.join(cfg.out, "curves.png"))
        if (cfg.save_every and step % cfg.save_every == 0) or step == total_steps or stopping:
            saved = checkpoint.save(cfg.out, step, backbone, optimizer, scheduler, data_state,
                                    dataclasses.asdict(cfg), tokenizer, cfg.keep_checkpoints)
        if stopping and step < total_steps:  # every rank: the flag's mean is the same on all
            prefetch.shutdown(cancel_futures=True)
            print0(f"stopped by a signal after step {step}/{total_steps}, saved in {saved}; "
                   f"continue with {continue_command(argv, world)}")
            teardown()
            if world == 1:
                stop.restore()
            else:  # the agent's SIGTERM, sent once another rank has exited, must not kill this one
                stop.outlast_the_agent()
            raise SystemExit(stop.exit_code)
    stop.restore()  # the caller's handlers again
    prefetch.shutdown(cancel_futures=True)

    # --- final export (rank 0; LoRA merged into the weights; a temporary name, then moved)
    if rank == 0:
        M.save_export(M.unwrap(backbone), tokenizer, final,
                      prompts=D.export_prompts(sources, cfg.data_set))
        print0(f"final export: {final}")
    teardown()


if __name__ == "__main__":
    main(sys.argv[1:])
