"""Train an F2LLM embedding model: one stage of contrastive finetuning (arXiv 2510.02294).

    python train.py --size tiny                          # the whole recipe on a laptop CPU
    torchrun --nproc_per_node 8 train.py --size 4b       # the paper's run
    python train.py --size 4b --dry-run --nproc 8        # plan it, no weights

Reads in the order things happen: config -> distributed setup -> data -> model ->
optimizer and schedule -> the cached-negatives step (DESIGN §4) -> the loop (log,
validate, checkpoint) -> the final export in OUT/final.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data as D
import model as M
import plan
from loss import TEMPERATURE, hard_negative_loss, in_batch_loss


# ---------------------------------------------------------------------------- config
@dataclass
class Config:
    size: str = "tiny"  # preset of DESIGN §2: tiny, 0.6b, 1.7b, 4b
    model: str = ""  # HF id or local folder; "" = the preset's backbone
    data: str = ""  # folder of {source}.parquet / .jsonl; "" = released set (tiny: demo sample)
    out: str = ""  # run folder; "" = out/{size}
    steps: int = 0  # optimizer steps; 0 = `epochs` passes over the data
    epochs: int = 2
    batch_size: int = 0  # GLOBAL queries per step (all ranks); 0 = preset
    chunk_tokens: int = 0  # real tokens per packed forward: memory only, never the math; 0 = preset
    chunk_size: int = 0  # also cap the sequences per forward; 0 = no cap
    lr: float = 0.0  # peak learning rate; 0 = preset
    min_lr: float = 1e-7  # floor of the cosine schedule
    warmup_steps: int = 500
    weight_decay: float = 0.01
    beta2: float = 0.98  # AdamW betas (0.9, beta2)
    grad_clip: float = 1.0
    temperature: float = TEMPERATURE
    max_length: int = 0  # tokens per text including EOS; 0 = preset (1024)
    val_fraction: float = 0.01  # held out per source
    eval_every: int = 500  # steps between validation losses; 0 = only at the end
    save_every: int = 1000  # steps between resumable checkpoints; 0 = only at the end
    keep_checkpoints: int = 2  # the newest N checkpoints are kept
    max_bad_steps: int = 5  # stop after this many non-finite steps in a row
    seed: int = 0
    precision: str = "auto"  # bf16 (autocast, fp32 master weights) | fp32; auto = bf16 on GPU
    shard_optimizer: bool = True  # ZeroRedundancyOptimizer across ranks when world > 1
    resume: bool = False  # continue from the latest checkpoint in `out` (automatic under torchrun restarts)
    dry_run: bool = False  # print the plan of the run and exit, no weights, no download
    json: bool = False  # dry run only: print the plan as one JSON object
    nproc: int = 0  # dry run only: GPUs per node to plan for (0 = this world size)
    nodes: int = 1  # dry run only: nodes to plan for


# Training overrides per size, on top of model.PRESETS (backbone, lr, batch, max length).
TRAIN_PRESETS = {
    "tiny": dict(epochs=1, warmup_steps=10, min_lr=1e-5, eval_every=25, save_every=50,
                 val_fraction=0.02),
}

# Fields that change the math: resuming with a different value is an error.
MATH_FIELDS = ["size", "model", "data", "batch_size", "lr", "min_lr", "warmup_steps",
               "weight_decay", "beta2", "grad_clip", "temperature", "max_length",
               "val_fraction", "seed", "precision", "epochs", "steps"]


def parse_config(argv=None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(flag, type=f.type, default=None,
                                choices=list(M.PRESETS) if f.name == "size" else None)
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    size = args.get("size", Config.size)
    preset = {k: v for k, v in M.PRESETS[size].items() if k in Config.__dataclass_fields__}
    cfg = Config(**{**preset, **TRAIN_PRESETS.get(size, {}), **args})
    cfg.model = cfg.model or M.PRESETS[size]["model"]
    cfg.out = cfg.out or os.path.join("out", size)
    return cfg


def check_config(cfg: Config, world: int) -> None:
    """Errors a user can cause, before anything is loaded or written."""
    def fail(msg):
        raise SystemExit(f"train.py: error: {msg}")
    if cfg.batch_size % world:
        fail(f"--batch-size {cfg.batch_size} is not divisible by the world size {world}; "
             f"use a multiple of {world}")
    if cfg.chunk_size < 0:
        fail(f"--chunk-size must be >= 0 (0 = no cap), got {cfg.chunk_size}")
    for name in ["batch_size", "chunk_tokens", "lr", "max_length", "keep_checkpoints", "max_bad_steps"]:
        if getattr(cfg, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.max_length < 2:
        fail("--max-length must leave room for one token and the EOS")
    if cfg.precision not in ("auto", "bf16", "fp32"):
        fail(f"--precision {cfg.precision}: use auto, bf16 or fp32")
    if cfg.data and not os.path.isdir(cfg.data):
        fail(f"--data {cfg.data}: no such folder")
    if cfg.resume and not latest_checkpoint(cfg.out):
        fail(f"--resume: no checkpoint in {cfg.out}/checkpoints; start without --resume")
    if not cfg.resume and latest_checkpoint(cfg.out):
        fail(f"--out {cfg.out} already holds checkpoints; add --resume to continue that run "
             f"or choose another --out")


def restarted_by_torchrun() -> bool:
    """torchrun --max-restarts N restarts every rank after a failure: continue, no flag needed."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


# ---------------------------------------------------------------------------- distributed
def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE: nccl on GPU, gloo on CPU; plain python = one process."""
    if "RANK" not in os.environ:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return 0, 1, device
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    # torchrun restarts reuse one rendezvous store, so the keys of a failed attempt (the gloo
    # addresses of dead ranks) would be read by the new ranks: one key prefix per attempt
    store, rank, world = next(dist.rendezvous("env://", timeout=timedelta(minutes=30)))
    store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store,
                            rank=rank, world_size=world)
    return rank, world, device


def wrap_ddp(backbone, device, **kwargs) -> DDP:
    """gradient_as_bucket_view: the gradients live in DDP's buckets, saving one model-sized
    copy. broadcast_buffers=False: Qwen3's only buffer (rotary frequencies) is a constant, and
    a broadcast per forward would be one collective per chunk (ranks may differ in chunks)."""
    return DDP(backbone, device_ids=[device.index] if device.type == "cuda" else None,
               gradient_as_bucket_view=True, broadcast_buffers=False, **kwargs)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def teardown():
    """Close the process group once every rank is done with it. Without the barrier, a rank
    that closes its gloo connections while another still holds them (DDP) makes that one abort
    at exit, 'terminate called without an active exception' (1 run in 5, torch 2.13)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_mean(x: float, device) -> float:
    if not dist.is_initialized():
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


# ---------------------------------------------------------------------------- the step
def rng_state(device):
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


@contextlib.contextmanager
def restored_rng(state, device):
    """Replay pass 1's RNG in pass 2, so dropout (if any) draws the same masks."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


def batch_sequences(batch: D.Batch, tokenizer, max_length: int):
    """A rank's batch -> its S = b * (2 + k) id lists [queries; positives; negatives]."""
    texts = batch.queries + batch.positives + [t for negs in batch.negatives for t in negs]
    return M.tokenize(tokenizer, texts, max_length)


def batch_loss(reps: torch.Tensor, b: int, k: int, task_type: str, temperature: float):
    """reps (S, D) in [queries; positives; negatives] order -> (total, hard, in-batch).
    k = 0 (pairs only) leaves the in-batch loss alone."""
    query, positive, negatives = reps[:b], reps[b:2 * b], reps[2 * b:].view(b, k, -1)
    zero = torch.zeros((), device=reps.device)
    hard = hard_negative_loss(query, positive, negatives, temperature) if k else zero
    in_batch = in_batch_loss(query, positive, temperature) if task_type in D.IN_BATCH_TYPES else zero
    return hard + in_batch, hard, in_batch


def cached_step(model, seqs: list[list[int]], loss_fn, chunk_tokens: int, bf16: bool = False,
                ddp=None, chunk_size: int = 0) -> dict:
    """DESIGN §4: pass 1 (no grad) -> loss on cached reps -> pass 2 (grad, chunk by chunk).

    seqs: this rank's id lists; loss_fn(reps (S, D) fp32) -> (loss, *terms). Chunks hold at
    most chunk_tokens tokens, packed (model.pack). One autocast region per pass, so autocast
    casts each weight to bf16 once per pass, not once per chunk. Leaves in .grad the gradient
    of the GLOBAL batch's loss (DDP averages over ranks at the last chunk: one all-reduce)."""
    device = next(model.parameters()).device
    chunks = M.make_chunks([len(s) for s in seqs], chunk_tokens, chunk_size)
    packs = [M.pack([seqs[i] for i in rows], M.uses_varlen(model), pin=device.type == "cuda").to(device)
             for rows in chunks]
    rows = [torch.tensor(r).to(device, non_blocking=True) for r in chunks]
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    # 1. pass 1, no grad: cache the reps of all S sequences, and each chunk's RNG state
    reps = torch.empty(len(seqs), model.config.hidden_size, device=device)  # (S, D) fp32
    states = []
    with torch.no_grad(), autocast():
        for i, packed in enumerate(packs):
            states.append(rng_state(device))
            reps[rows[i]] = M.embed_packed(model, packed)
    # 2. loss on the cached reps, in fp32: d loss / d reps, including other ranks' queries' terms
    reps.requires_grad_(True)
    loss, *terms = loss_fn(reps)
    loss.backward()
    finite = all_mean(float(torch.isfinite(loss)), device) == 1.0  # the same on every rank
    # 3. pass 2, with grad: replay each chunk (same dropout masks) and push its reps' gradient
    #    into the weights; every chunk but the last inside no_sync, forward and backward
    if finite:
        net = ddp or model
        with autocast():
            for i, packed in enumerate(packs):
                sync = ddp is None or i == len(packs) - 1
                with (contextlib.nullcontext() if sync else ddp.no_sync()), restored_rng(states[i], device):
                    (M.embed_packed(net, packed) * reps.grad[rows[i]]).sum().backward()
    values = torch.stack([loss.detach(), *(t.detach() for t in terms)]).tolist()  # one host sync
    return dict(loss=values[0], terms=values[1:], finite=finite, chunks=len(packs), sequences=len(seqs),
                real_tokens=sum(len(s) for s in seqs), computed_tokens=sum(p.computed_tokens for p in packs))


def step_loss(batch: D.Batch, temperature: float):
    """The recipe's loss of one rank's batch, as a function of its reps."""
    b, k = len(batch.queries), len(batch.negatives[0]) if batch.negatives else 0
    return lambda reps: batch_loss(reps, b, k, batch.task_type, temperature)


@torch.no_grad()
def validate(backbone, batches, rank, world, tokenizer, cfg, device, bf16) -> float:
    losses = []
    for global_batch in batches:
        batch = global_batch.shard(rank, world)
        seqs, _ = batch_sequences(batch, tokenizer, cfg.max_length)
        reps = torch.empty(len(seqs), backbone.config.hidden_size, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            for rows in M.make_chunks([len(s) for s in seqs], cfg.chunk_tokens, cfg.chunk_size):
                packed = M.pack([seqs[i] for i in rows], M.uses_varlen(backbone)).to(device)
                reps[rows] = M.embed_packed(backbone, packed)
        losses.append(all_mean(step_loss(batch, cfg.temperature)(reps)[0].item(), device))
    return sum(losses) / max(len(losses), 1)


# ---------------------------------------------------------------------------- schedule
def lr_lambda(cfg: Config, total_steps: int):
    """Linear warmup to lr, cosine decay to min_lr: a multiplier of lr for LambdaLR."""
    def f(step):
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return (cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))) / cfg.lr
    return f


# ---------------------------------------------------------------------------- checkpoints
def latest_checkpoint(out: str) -> str | None:
    folder = os.path.join(out, "checkpoints")
    if not os.path.isdir(folder):
        return None
    steps = sorted(d for d in os.listdir(folder) if d.startswith("step_") and not d.endswith(".tmp"))
    return os.path.join(folder, steps[-1]) if steps else None


def save_checkpoint(out, step, backbone, optimizer, scheduler, data_state, cfg, tokenizer, rank):
    """Rank 0 writes checkpoints/step_N.tmp, then renames it: a crash mid-save leaves the
    previous checkpoint as the latest. ZeRO shards are gathered to rank 0 first."""
    if hasattr(optimizer, "consolidate_state_dict"):
        optimizer.consolidate_state_dict(to=0)
    if rank == 0:
        final = os.path.join(out, "checkpoints", f"step_{step:08d}")
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        torch.save(dict(step=step, model=backbone.state_dict(), optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict(), data=data_state,
                        rng=torch.get_rng_state(), config=dataclasses.asdict(cfg)),
                   os.path.join(tmp, "state.pt"))
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, final)
        old = sorted(os.listdir(os.path.join(out, "checkpoints")))[:-cfg.keep_checkpoints]
        for name in old:
            shutil.rmtree(os.path.join(out, "checkpoints", name), ignore_errors=True)
    barrier()


# ---------------------------------------------------------------------------- main
def dry_run(cfg: Config, world: int) -> dict:
    """Plan a run of a real size without weights (plan.py): parameters, batch arithmetic,
    FLOPs, memory per GPU at the chunk's token budget."""
    check_config(cfg, (cfg.nproc or world) * cfg.nodes)
    return plan.dry_run(cfg.size, cfg.model, cfg.nproc or world, cfg.nodes, cfg.batch_size, cfg.epochs,
                        cfg.steps, cfg.val_fraction, cfg.chunk_tokens, cfg.max_length,
                        shard_optimizer=cfg.shard_optimizer, as_json=cfg.json)


def main(argv=None):
    cfg = parse_config(argv)
    if cfg.dry_run:
        return dry_run(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    rank, world, device = setup_distributed()
    if restarted_by_torchrun() and latest_checkpoint(cfg.out):
        cfg.resume = True
    check_config(cfg, world)
    say = print if rank == 0 else (lambda *a, **k: None)

    # --- data (checked before any model is loaded)
    data_folder = cfg.data
    if not data_folder and cfg.size == "tiny":
        data_folder = os.path.join(cfg.out, "data")
        if rank == 0 and not os.path.isdir(data_folder):
            D.write_demo_sample(data_folder, seed=0)
        barrier()
    elif not data_folder:
        data_folder = download_released_data(rank)
    try:
        sources = D.load_sources(data_folder, cfg.seed, cfg.val_fraction)
        stream = D.BatchStream(sources, cfg.batch_size, cfg.seed)
    except D.DataError as e:
        raise SystemExit(f"train.py: data error: {e}")
    val_batches = D.validation_batches(sources, cfg.batch_size, world, cfg.seed)
    total_steps = cfg.steps or cfg.epochs * stream.batches_per_epoch
    b = cfg.batch_size // world
    say(f"data: {len(sources)} sources in {data_folder}, {stream.batches_per_epoch} batches per epoch, "
        f"{sum(len(v.queries) for v in val_batches)} held-out queries")
    for s in sources:
        say(f"  {s.name:32s} {s.task_type:14s} k={s.k} train={len(s.train_rows)} val={len(s.val_rows)}")
    seqs = b * (2 + max(s.k for s in sources))
    say(f"batch: {cfg.batch_size} queries/step = {world} ranks x {b}; per rank up to {seqs} "
        f"sequences (b x (2 + k)) in packed chunks of <= {cfg.chunk_tokens} tokens"
        + (f" and <= {cfg.chunk_size} sequences" if cfg.chunk_size else "")
        + f"; {total_steps} steps ({total_steps / stream.batches_per_epoch:.2f} epochs)")

    # --- run folder
    os.makedirs(cfg.out, exist_ok=True)
    if rank == 0:
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)

    # --- model
    torch.manual_seed(cfg.seed)
    attn = M.attention_implementation(device)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    kernel = M.varlen_kernel(device)
    say(f"model: {cfg.model}, attention {attn}" + (f" (packed rows, {kernel})" if kernel else
        " (packed rows, block-diagonal masks)") + f", {'bf16 autocast, fp32 master weights' if bf16 else 'fp32'}")
    if cfg.model == "tiny":
        tok_dir = os.path.join(cfg.out, "tokenizer")
        if rank == 0 and not os.path.isdir(tok_dir):
            texts = [t for s in sources for c in ("query", "passage") for t in s.table[c].to_pylist()]
            M.train_tokenizer(texts).save_pretrained(tok_dir)
        barrier()
        tokenizer = M.AutoTokenizer.from_pretrained(tok_dir)
        backbone = M.tiny_backbone(tokenizer, cfg.seed, attn)
    else:
        backbone, tokenizer = M.load_backbone(cfg.model, attn)
    backbone.to(device).train()
    say(f"model: {sum(p.numel() for p in backbone.parameters()):,} parameters, dim {backbone.config.hidden_size}")
    ddp = wrap_ddp(backbone, device) if world > 1 else None

    # --- optimizer and schedule
    opt_args = dict(lr=cfg.lr, betas=(0.9, cfg.beta2), weight_decay=cfg.weight_decay)
    if world > 1 and cfg.shard_optimizer:
        from torch.distributed.optim import ZeroRedundancyOptimizer
        optimizer = ZeroRedundancyOptimizer(backbone.parameters(), torch.optim.AdamW, **opt_args)
    else:
        optimizer = torch.optim.AdamW(backbone.parameters(), **opt_args)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))

    # --- resume
    step = 0
    if cfg.resume:
        path = latest_checkpoint(cfg.out)
        state = torch.load(os.path.join(path, "state.pt"), map_location=device, weights_only=False)
        diff = {k: (state["config"][k], getattr(cfg, k)) for k in MATH_FIELDS
                if state["config"].get(k) != getattr(cfg, k)}
        if diff:
            raise SystemExit(f"train.py: error: --resume with a different config than {path}: "
                             + ", ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in diff.items()))
        backbone.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        stream.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"])
        step = state["step"]
        say(f"resumed from {path} at step {step}")
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    if rank == 0:
        keep = []
        if cfg.resume and os.path.exists(metrics_path):
            keep = [l for l in open(metrics_path) if json.loads(l)["step"] <= step]
        with open(metrics_path, "w") as f:
            f.writelines(keep)

    # --- the loop; the next batch is drawn and tokenized in a thread while a step computes
    def draw():
        batch = next(stream).shard(rank, world)
        return batch, *batch_sequences(batch, tokenizer, cfg.max_length)
    prefetch = ThreadPoolExecutor(max_workers=1)
    pending = prefetch.submit(draw)
    bad_steps, warned_truncation, t_start, step_start = 0, False, time.time(), step
    while step < total_steps:
        t0 = time.time()
        batch, seqs, truncated = pending.result()
        data_state = stream.state_dict()  # after this batch: what a checkpoint of this step resumes from
        pending = prefetch.submit(draw)
        m = cached_step(backbone, seqs, step_loss(batch, cfg.temperature), cfg.chunk_tokens, bf16, ddp,
                        cfg.chunk_size)
        grad_norm = torch.nn.utils.clip_grad_norm_(backbone.parameters(), cfg.grad_clip).item()
        if m["finite"] and math.isfinite(grad_norm):
            optimizer.step()
            scheduler.step()
            bad_steps = 0
        else:  # a non-finite loss or gradient never reaches the weights
            bad_steps += 1
            say(f"step {step + 1}: non-finite loss or gradient, update skipped ({bad_steps} in a row)")
            if bad_steps >= cfg.max_bad_steps:
                raise SystemExit(f"train.py: error: {bad_steps} non-finite steps in a row (--max-bad-steps); "
                                 f"lower --lr, check the data, or resume from an earlier checkpoint")
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if truncated and not warned_truncation:
            say(f"note: texts longer than --max-length {cfg.max_length} are cut to {cfg.max_length - 1} "
                f"tokens + EOS; metrics.jsonl counts them per step ('truncated')")
            warned_truncation = True
        dt = time.time() - t0
        hard, in_batch = m["terms"]
        record = dict(step=step, loss=all_mean(m["loss"], device), hard=all_mean(hard, device),
                      in_batch=all_mean(in_batch, device), source=batch.source,
                      lr=scheduler.get_last_lr()[0], grad_norm=grad_norm,
                      seq_per_s=m["sequences"] * world / dt, tokens_per_s=m["real_tokens"] * world / dt,
                      real_tokens=m["real_tokens"], computed_tokens=m["computed_tokens"], chunks=m["chunks"],
                      truncated=truncated, time=dt)
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps:
            record["val_loss"] = validate(backbone, val_batches, rank, world, tokenizer, cfg, device, bf16)
        eta = (time.time() - t_start) / (step - step_start) * (total_steps - step)
        say(f"step {step}/{total_steps} | loss {record['loss']:.4f} (hard {record['hard']:.4f}, "
            f"in-batch {record['in_batch']:.4f}) | lr {record['lr']:.2e} | grad {grad_norm:.3f} | "
            f"{dt:.2f}s, {record['tokens_per_s']:,.0f} tok/s, {m['chunks']} chunks | eta {eta / 60:.0f} min"
            + (f" | val {record['val_loss']:.4f}" if "val_loss" in record else ""))
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if (cfg.save_every and step % cfg.save_every == 0) or step == total_steps:
            save_checkpoint(cfg.out, step, backbone, optimizer, scheduler, data_state, cfg, tokenizer, rank)
    prefetch.shutdown(cancel_futures=True)

    # --- final export (rank 0; written to a temporary name, then moved into place)
    if rank == 0:
        M.save_export(backbone, tokenizer, os.path.join(cfg.out, "final"),
                      prompts=D.export_prompts())
        say(f"final export: {os.path.join(cfg.out, 'final')}")
    teardown()


def download_released_data(rank: int) -> str:
    """The released set from the hub (codefuse-ai/F2LLM); rank 0 downloads, the others
    wait and then read the same files from the shared cache."""
    from huggingface_hub import snapshot_download
    if rank == 0:
        path = snapshot_download("codefuse-ai/F2LLM", repo_type="dataset")
    barrier()
    if rank != 0:
        path = snapshot_download("codefuse-ai/F2LLM", repo_type="dataset")
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
