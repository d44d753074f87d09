"""Plan a real-size F2LLM run without its weights: parameter counts, batch arithmetic, FLOPs,
the per-GPU memory of the cached step, and the token budget of a packed chunk.

    python train.py --size 4b --dry-run --nproc 8 [--nodes M] [--json]

- `qwen3_config(size)`: the backbones' architectures (each hub model's config.json), so
  nothing is downloaded; `meta_backbone` builds them on the meta device (no memory).
- `activation_bytes_per_token(config)`: what autograd keeps per token of a packed chunk under
  bf16 autocast, split into bf16 and fp32 tensors; measured on a real 1- and 2-layer model of
  the same width on the CPU (autocast does not run on the meta device), its attention keeping
  what the CUDA varlen kernels keep (`MEASURED_ON`).
- `zero_shards(sizes, world)`: the elements each rank's AdamW state covers, as torch's
  ZeroRedundancyOptimizer partitions the parameters (largest first, to the emptiest rank).
- `memory_plan(...)`: the per-GPU bytes of a step at its peak, each term once (its docstring),
  on the rank that holds the most AdamW state.
- `chunk_tokens_that_fit(...)`: the largest token budget whose plan fits `PLAN_BYTES`.
- `steps_per_epoch(train_rows, batch_size)`: the batches data.BatchStream draws per epoch.
- `architecture(name, flag)`: a --model's or --teacher's architecture, from its folder or by
  its Qwen3 size; `teacher_config(name)` for --teacher.
- `length_mix(...)`: the realistic token lengths bench/step.py and tools/gpu_check.py both use.
Importing this file does nothing.
"""
import copy
import functools
import json
import os
import re

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoConfig, AutoModel, Qwen3Config

import model as M

_QWEN3_COMMON = dict(vocab_size=151936, head_dim=128, max_position_embeddings=40960,
                     rope_theta=1_000_000, rms_norm_eps=1e-6, num_key_value_heads=8,
                     bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=True)
QWEN3_CONFIGS = {
    "0.6b": dict(_QWEN3_COMMON, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16),
    "1.7b": dict(_QWEN3_COMMON, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                 num_attention_heads=16),
    "4b": dict(_QWEN3_COMMON, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
               num_attention_heads=32),
    # a teacher size only (--teacher Qwen/Qwen3-Embedding-8B): no student preset
    "8b": dict(_QWEN3_COMMON, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
               num_attention_heads=32, tie_word_embeddings=False),
}
# the published F2LLM models' own figures: embedding dimension and parameters (a test checks
# that the configs above build exactly these)
PUBLISHED = {"0.6b": dict(dim=1024, params=596_049_920),
             "1.7b": dict(dim=2048, params=1_720_574_976),
             "4b": dict(dim=2560, params=4_022_468_096)}
RELEASED_TUPLES = 5_933_988  # rows of the released F2LLM training set (62 sources)
GiB = 2**30
CARD_BYTES = int(79.65 * GiB)  # what an 80 GB H100 or A100 reports (81,559 MiB in nvidia-smi)
PLAN_BYTES = 72 * GiB  # the plan, reserve included, fills at most this: the margin left (7.65
# GiB) absorbs the allocator's rounding and fragmentation, which expandable segments keep small
# What no tensor of the step holds, per GPU: the CUDA context with cuBLAS/cuDNN handles (about
# 0.5 GiB on an H100, CUDA 12) and NCCL's buffers (NCCL_BUFFSIZE 4 MiB x channels x peers x
# protocols, plus NVLS on NVSwitch nodes: 1-3 GiB on 8-GPU nodes). An estimate, not measured
# here: compare nvidia-smi's figure during a run with torch.cuda.memory_reserved().
RESERVE_BYTES = int(3.5 * GiB)
H100_BF16_FLOPS = 989e12  # dense peak


def qwen3_config(size: str, num_hidden_layers: int | None = None) -> Qwen3Config:
    config = Qwen3Config(**QWEN3_CONFIGS[size])
    if num_hidden_layers is not None:
        config.num_hidden_layers = num_hidden_layers
    return config


def config_like(config: Qwen3Config, num_hidden_layers: int,
                vocab_size: int | None = None) -> Qwen3Config:
    """The same layer shapes with another depth (and vocabulary)."""
    small = copy.deepcopy(config)
    small.num_hidden_layers = num_hidden_layers
    if hasattr(small, "layer_types"):
        small.layer_types = small.layer_types[:1] * num_hidden_layers
    if vocab_size:
        small.vocab_size = vocab_size
    return small


def meta_backbone(config: Qwen3Config, dtype=torch.float32):
    """The architecture with no weights (meta device): shapes and counts, no memory."""
    with torch.device("meta"):  # a copy: from_config records the dtype in its config
        return AutoModel.from_config(copy.deepcopy(config), dtype=dtype, attn_implementation="sdpa")


def trained_sizes(config: Qwen3Config, lora_rank: int = 0) -> list[int]:
    """The elements of each trained parameter: every weight of the backbone, or with LoRA
    each adapter's A (r x in) and B (out x r) on the targeted linear layers (model.add_lora)."""
    return list(_sizes(config.to_json_string(), lora_rank)[1])


@functools.cache
def _sizes(config_json: str, lora_rank: int) -> tuple[dict, tuple[int, ...]]:
    """(parameter_counts, trained_sizes) of a config: one meta build per config (the planner
    asks many times)."""
    net = meta_backbone(Qwen3Config.from_dict(json.loads(config_json)))
    linears = [(name, m) for name, m in net.named_modules() if isinstance(m, torch.nn.Linear)]
    targets = [m for name, m in linears if name.split(".")[-1] in M.LORA_TARGETS]
    counts = dict(all=sum(p.numel() for p in net.parameters()),
                  embedding=net.embed_tokens.weight.numel(),
                  cast=sum(m.weight.numel() for _, m in linears),
                  lora=sum(lora_rank * (m.in_features + m.out_features) for m in targets))
    sizes = [n for m in targets for n in (lora_rank * m.in_features, m.out_features * lora_rank)
             ] if lora_rank else [p.numel() for p in net.parameters()]
    return counts, tuple(sizes)


def zero_shards(sizes: list[int], world: int) -> list[int]:
    """Elements of each rank's share of the trained parameters (each rank keeps AdamW's m and v
    of its share only), by the rule of torch's ZeroRedundancyOptimizer._partition_parameters:
    the parameters sorted largest first, each given to the rank with the fewest elements so
    far (the lowest such rank). The largest tensor, the (V, D) embedding, lands whole on rank
    0, so the fullest rank can hold twice the average 1 / world."""
    shards = [0] * world
    for n in sorted(sizes, reverse=True):
        shards[shards.index(min(shards))] += n
    return shards


def parameter_counts(config: Qwen3Config, lora_rank: int = 0) -> dict:
    """all, embedding, `cast` (the weights autocast copies to bf16: linear layers only) and
    `lora` (the adapters of --lora-rank: r x (in + out) per targeted linear layer)."""
    return dict(_sizes(config.to_json_string(), lora_rank)[0])


# ---------------------------------------------------------------------------- activations
class _VarlenKept(torch.autograd.Function):
    """Causal attention that keeps for backward what the CUDA varlen kernels keep (flash-attn
    2 and torch's varlen_attn, which wraps it): q, k and v as given (grouped k/v heads, no
    repeat), the output and the fp32 log-sum-exp of each query row (H, T)."""
    @staticmethod
    def forward(ctx, q, k, v):  # (T, H, d), (T, H_kv, d), (T, H_kv, d)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                             v.transpose(0, 1), is_causal=True,
                                             enable_gqa=True).transpose(0, 1).contiguous()
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[1], q.shape[0],
                                                       dtype=torch.float32))
        return out  # (T, H, d)


def _varlen_like_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """model.packed_attention's layout on one row (q/k/v cast to autocast's dtype, (T, H, d),
    the output returned as a view), with _VarlenKept as its kernel: the plan measures what a
    GPU step keeps, whatever the CPU's sdpa would save."""
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (T, H, d)
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return _VarlenKept.apply(q, k, v)[None], None  # (1, T, H, d)


VARLEN_LIKE = "f2llm_plan_varlen"
MEASURED_ON = (f"CPU, torch {torch.__version__}, bf16 autocast, attention keeping what the CUDA "
               f"varlen kernel keeps (q, k, v without repeat, output, log-sum-exp)")


def saved_bytes(backbone, tokens: int, bf16: bool = True) -> dict:
    """Bytes autograd keeps in one training forward of one packed row of `tokens` tokens,
    by dtype, each storage once; the weights and their bf16 copies are left out (planned as
    their own terms), and so are (tokens x tokens) score tensors (varlen attention keeps none)."""
    params = {p.untyped_storage().data_ptr() for p in backbone.parameters()}
    shapes = {s for p in backbone.parameters()
              for s in (tuple(p.shape), tuple(p.shape)[::-1])}  # W and W.T
    saved = {}

    def keep(t):
        ptr = t.untyped_storage().data_ptr()
        weight_copy = t.dtype == torch.bfloat16 and tuple(t.shape) in shapes
        scores = t.dim() >= 2 and t.shape[-1] == t.shape[-2] == tokens
        if ptr not in params and not weight_copy and not scores:
            saved[ptr] = (t.dtype, t.untyped_storage().nbytes())
        return t
    ids = torch.zeros(1, tokens, dtype=torch.long)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        backbone(input_ids=ids, use_cache=False)
    by_dtype = {}
    for dtype, nbytes in saved.values():
        by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes
    return by_dtype


@functools.cache
def _per_token(config_json: str, tokens: int, lora_rank: int) -> tuple[float, float]:
    config = Qwen3Config.from_dict(json.loads(config_json))
    AttentionInterface.register(VARLEN_LIKE, _varlen_like_attention)
    measured = []
    for layers in (1, 2):  # uninitialised real weights of one and two layers, a tiny vocabulary
        with torch.device("meta"):
            net = AutoModel.from_config(config_like(config, layers, vocab_size=64),
                                        attn_implementation=VARLEN_LIKE)
        net = net.to_empty(device="cpu").train()
        if lora_rank:  # the adapters keep their own inputs for backward
            net = M.add_lora(net, lora_rank)
        measured.append(saved_bytes(net, tokens))
        del net
    bf16, fp32 = ([m.get(dtype, 0) for m in measured] for dtype in (torch.bfloat16, torch.float32))
    # per token: base (embedding output, final norm) + layers x per layer
    layers = config.num_hidden_layers
    return tuple((2 * x[0] - x[1] + (x[1] - x[0]) * layers) / tokens for x in (bf16, fp32))


def activation_bytes_per_token(config: Qwen3Config, tokens: int = 24,
                               lora_rank: int = 0) -> tuple[float, float]:
    """(bf16 bytes, fp32 bytes) that autograd keeps per token of a packed chunk, all layers,
    as MEASURED_ON says. Linear in tokens (no score tensors), so a short row measures it."""
    return _per_token(config.to_json_string(), tokens, lora_rank)


# ---------------------------------------------------------------------------- the plan
def memory_plan(config: Qwen3Config, world: int, chunk_tokens: int, sequences_per_rank: int,
                shard_optimizer: bool = True, lora_rank: int = 0,
                teacher: Qwen3Config | None = None) -> dict:
    """Per-GPU bytes of one cached step at its peak, the end of a pass-2 chunk's backward (bf16
    autocast over fp32 master weights, DDP with gradients as bucket views, AdamW states sharded
    by ZeroRedundancyOptimizer), each once:
      weights_fp32            4 P
      gradients_fp32          4 P               (DDP's buckets ARE the .grad tensors: train.py
                                                keeps them there from step 1,
                                                optimizer_step)
      adamw_states            8 x the fullest rank's share of ZeroRedundancyOptimizer's
                                                partition (zero_shards; 8 P unsharded): the
                                                plan of the rank that holds the most
      bf16_weight_copies      2 P_linear        (autocast's cache, one per pass)
      activations_bf16        chunk_tokens x measured bf16 bytes per token (MEASURED_ON)
      activations_fp32        chunk_tokens x measured fp32 bytes per token (autocast leaves
                                                the residual stream and norms in fp32)
      embedding_grad          4 V D             (the dense fp32 gradient of the embedding,
                                                built in the chunk's backward, then added)
      cached_reps             2 x 4 S D         (reps and their gradient)
      cuda_context_nccl       RESERVE_BYTES     (no tensor: see its comment)
    With a teacher (--teacher), resident all step and counted on top (its own pass runs before
    pass 2, so this is an upper bound):
      teacher_weights         2 P_teacher       (bf16)
      teacher_activations     chunk_tokens x (10 D + 6 I) of the teacher: the most a no-grad
                                                forward holds at once, in one layer's MLP (fp32
                                                residual in and out, bf16 normed input, gate,
                                                up and their product)
      teacher_reps            4 S D_teacher
    With LoRA (lora_rank > 0) the frozen weights are kept in bf16 (2 P, never cast again) and
    the gradients, AdamW states and fp32 copies are the adapters' A alone:
      weights 2 P + 4 A, gradients 4 A, AdamW 8 x A's fullest share, bf16 copies 2 A; the
      activations are measured with the adapters in place; the embedding is frozen (no
      embedding_grad).
    """
    counts = parameter_counts(config, lora_rank)
    p, a = counts["all"], counts["lora"]
    bf16, fp32 = activation_bytes_per_token(config, lora_rank=lora_rank)
    trained = a if lora_rank else p
    plan = {
        "weights_fp32": 2 * p + 4 * a if lora_rank else 4 * p,
        "gradients_fp32": 4 * trained,
        "adamw_states": 8 * (max(zero_shards(trained_sizes(config, lora_rank), world))
                             if shard_optimizer and world > 1 else trained),
        "bf16_weight_copies": 2 * (a if lora_rank else counts["cast"]),
        "activations_bf16": int(bf16 * chunk_tokens),
        "activations_fp32": int(fp32 * chunk_tokens),
        "embedding_grad": 0 if lora_rank else 4 * counts["embedding"],
        "cached_reps": 2 * 4 * sequences_per_rank * config.hidden_size,
        "cuda_context_nccl": RESERVE_BYTES,
    }
    if teacher is not None:
        plan["teacher_weights"] = 2 * parameter_counts(teacher)["all"]
        plan["teacher_activations"] = chunk_tokens * (10 * teacher.hidden_size
                                                      + 6 * teacher.intermediate_size)
        plan["teacher_reps"] = 4 * sequences_per_rank * teacher.hidden_size
    plan["total"] = sum(plan.values())
    return plan


def chunk_tokens_that_fit(config: Qwen3Config, world: int, sequences_per_rank: int,
                          usable: int = PLAN_BYTES, step: int = 256, most: int = 65536,
                          lora_rank: int = 0, teacher: Qwen3Config | None = None,
                          shard_optimizer: bool = True) -> int:
    """The largest multiple of `step` tokens (at most `most`) whose plan fits `usable` bytes
    (`step` if none does: check its plan)."""
    plan = functools.partial(memory_plan, config, world, sequences_per_rank=sequences_per_rank,
                             lora_rank=lora_rank, teacher=teacher, shard_optimizer=shard_optimizer)
    fixed, per_token = plan(chunk_tokens=0)["total"], plan(chunk_tokens=1 << 20)["total"]
    per_token = (per_token - fixed) / (1 << 20)
    return max(step, min(most, int((usable - fixed) / per_token) // step * step))


def planned_chunk_tokens(preset: int, config: Qwen3Config, world: int, sequences_per_rank: int,
                         usable: int = PLAN_BYTES, lora_rank: int = 0,
                         teacher: Qwen3Config | None = None, shard_optimizer: bool = True) -> int:
    """The budget of a run without --chunk-tokens: the preset's where this run's plan fits it
    (the presets are the largest that fit the paper's layout on an 80 GB card), else the
    largest that fits. A larger card keeps the preset: its per-token figures are the ones
    tools/gpu_check.py checks. I2: the budget never changes the gradients, only memory."""
    if memory_plan(config, world, preset, sequences_per_rank, shard_optimizer, lora_rank,
                   teacher)["total"] <= usable:
        return preset
    return chunk_tokens_that_fit(config, world, sequences_per_rank, usable, lora_rank=lora_rank,
                                 teacher=teacher, shard_optimizer=shard_optimizer)


def usable_bytes(card_bytes: int) -> int:
    """What the plan may fill on a card of card_bytes: PLAN_BYTES of an 80 GB card, in
    proportion on others (the margin absorbs the allocator's rounding, which grows with it)."""
    return int(card_bytes * PLAN_BYTES / CARD_BYTES)


def steps_per_epoch(train_rows: list[int], batch_size: int) -> int:
    """The batches data.BatchStream draws in an epoch: each source's last partial batch is
    filled from the start of its order, so a source of n training rows gives ceil(n / batch)."""
    return sum(-(-n // batch_size) for n in train_rows)


def architecture(name: str, flag: str) -> Qwen3Config:
    """A model's architecture without its weights: config.json of a local folder, or, for a
    hub id, the Qwen3 size its name gives (Qwen/Qwen3-4B, Qwen/Qwen3-Embedding-8B,
    codefuse-ai/F2LLM-1.7B, ...). `flag` names the flag in the errors."""
    if os.path.isdir(name):
        if not os.path.exists(os.path.join(name, "config.json")):
            raise ValueError(f"{flag} {name}: the folder has no config.json; pass a model "
                             f"folder (a saved export or a hub snapshot)")
        return AutoConfig.from_pretrained(name)
    size = re.search(r"(?:qwen3|f2llm)\S*?-(0\.6|1\.7|4|8)b$", name.lower())
    if not size:
        raise ValueError(f"{flag} {name}: not a local folder, and its name gives no Qwen3 "
                         f"size the plan knows ({', '.join(QWEN3_CONFIGS)}); download it and "
                         f"pass its folder")
    return qwen3_config(size[1] + "b")


def teacher_config(name: str) -> Qwen3Config:
    """--teacher's architecture (`architecture`)."""
    return architecture(name, "--teacher")


# ---------------------------------------------------------------------------- the length mix
def length_mix(rng: np.random.Generator, b: int, k: int, max_length: int) -> list[int]:
    """Token counts (EOS included) of one rank's batch [queries; positives; negatives]:
    queries log-uniform in 20..300 (instruction included); documents log-normal, median 140,
    sigma 0.9, clipped to [16, max_length] (~1.4% cut at 1024). At b = 64, k = 7 that is about
    110k real tokens per rank-step, the figure of the paper's run (docs/design.md §4)."""
    queries = np.exp(rng.uniform(np.log(20), np.log(300), b))
    documents = np.clip(np.exp(rng.normal(np.log(140), 0.9, b * (1 + k))), 16, max_length)
    return [int(x) for x in np.concatenate([queries, documents])]


def flops_per_token(config: Qwen3Config) -> float:
    """Model FLOPs of forward + backward per token: 6 per non-embedding parameter plus causal
    attention at the mix's mean length. The cached step's extra no-grad forward is overhead,
    not model FLOPs, so MFU shows its cost."""
    counts = parameter_counts(config)
    mean_length = 190  # the length mix's mean sequence length, about
    attention = (6 * config.num_hidden_layers * config.num_attention_heads * config.head_dim
                 * mean_length)
    return 6 * (counts["all"] - counts["embedding"]) + attention


# ---------------------------------------------------------------------------- the dry run
def dry_run(config: Qwen3Config, size: str, model: str, world_per_node: int, nodes: int,
            batch_size: int, epochs: int, steps: int, val_fraction: float, chunk_tokens: int,
            preset_chunk_tokens: int, max_length: int, k: int = 7, shard_optimizer: bool = True,
            as_json: bool = False, mfu: float = 0.30, lora_rank: int = 0, teacher: str = "",
            train_rows: list[int] | None = None, data: str = "",
            released_sources: int = 62) -> dict:
    """The plan of a run, printed (or one JSON line). chunk_tokens 0: planned as a run plans
    it (planned_chunk_tokens) for an 80 GB card. train_rows: the training rows of each source
    when the data is at hand (the steps are then what the loader draws); None: the released
    set, whose per-source sizes are not known offline: the steps are bounded, at most one
    filled batch more per source per epoch (released_sources of them)."""
    world = world_per_node * nodes
    counts = parameter_counts(config)
    teacher_cfg = teacher_config(teacher) if teacher else None
    b = batch_size // world
    seqs = b * (2 + k)
    if train_rows is not None:  # counted as data.BatchStream counts
        per_epoch = fewest_per_epoch = steps_per_epoch(train_rows, batch_size)
        rows_note = f"{sum(train_rows):,} training rows in {len(train_rows)} sources of {data}"
    else:  # each source holds out int(rows x val_fraction): up to one row less than the total's
        held_out = int(RELEASED_TUPLES * val_fraction)
        fewest_per_epoch = -(-(RELEASED_TUPLES - held_out) // batch_size)
        per_epoch = -(-(RELEASED_TUPLES - held_out + released_sources) // batch_size) \
            + released_sources
        rows_note = (f"{RELEASED_TUPLES:,} released tuples in {released_sources} sources, "
                     f"{val_fraction:.0%} held out; the sizes per source are not known here")
    steps = steps or epochs * per_epoch
    rng = np.random.default_rng(0)
    batches = [length_mix(rng, b, k, max_length) for _ in range(20)]  # 20 rank-steps of the mix
    tokens_per_rank = float(np.mean([sum(x) for x in batches]))
    given = chunk_tokens > 0
    if not given:
        chunk_tokens = planned_chunk_tokens(preset_chunk_tokens, config, world, seqs,
                                            lora_rank=lora_rank, teacher=teacher_cfg,
                                            shard_optimizer=shard_optimizer)
    budget_note = ("--chunk-tokens as given" if given else
                   "planned: the preset's, which fits this run's plan"
                   if chunk_tokens == preset_chunk_tokens else
                   f"planned: the largest that fits this run's plan; the preset's "
                   f"{preset_chunk_tokens:,} does not")
    # one varlen row per chunk (CUDA)
    chunks = max(len(M.make_chunks(x, chunk_tokens)) for x in batches)
    plan = memory_plan(config, world, chunk_tokens, seqs, shard_optimizer, lora_rank, teacher_cfg)
    trained = sum(trained_sizes(config, lora_rank))
    adamw_average = 8 * trained / (world if shard_optimizer else 1)
    flops_step = flops_per_token(config) * tokens_per_rank * world
    days = steps * flops_step / (world * H100_BF16_FLOPS * mfu) / 86400
    fits = plan["total"] <= PLAN_BYTES
    report = dict(size=size, model=model, parameters=counts["all"], lora_rank=lora_rank,
                  lora_parameters=parameter_counts(config, lora_rank)["lora"], world=world,
                  nodes=nodes,
                  batch_size=batch_size, per_rank_queries=b, sequences_per_rank=seqs, steps=steps,
                  steps_per_epoch=per_epoch, steps_per_epoch_fewest=fewest_per_epoch,
                  steps_counted_from="data" if train_rows is not None else "bound",
                  real_tokens_per_rank_step=round(tokens_per_rank),
                  chunks_per_step=chunks, tokens_per_chunk=chunk_tokens,
                  tokens_per_chunk_from="given" if given else "planned",
                  preset_tokens_per_chunk=preset_chunk_tokens, flops_per_step=flops_step,
                  memory_gib={k_: v / GiB for k_, v in plan.items()},
                  adamw_states_average_gib=adamw_average / GiB,
                  plan_budget_gib=PLAN_BYTES / GiB, card_gib=CARD_BYTES / GiB,
                  margin_gib=(CARD_BYTES - plan["total"]) / GiB, fits=fits,
                  activations_measured_on=MEASURED_ON,
                  activation_bytes_per_token=dict(zip(("bf16", "fp32"), activation_bytes_per_token(
                      config, lora_rank=lora_rank))),
                  teacher=None if not teacher else dict(
                      name=teacher, parameters=parameter_counts(teacher_cfg)["all"],
                      dim=teacher_cfg.hidden_size, layers=teacher_cfg.num_hidden_layers),
                  estimate=dict(mfu=mfu, days=days, gpus=f"{world} x H100 80GB"))
    if as_json:
        print(json.dumps(report))
        return report
    gib = report["memory_gib"]
    print(f"backbone {model}: {counts['all']:,} parameters without LM head, embedding dim "
          f"{config.hidden_size}, {config.num_hidden_layers} layers"
          + (f"; LoRA rank {lora_rank}: {report['lora_parameters']:,} trained parameters"
             if lora_rank else ""))
    if teacher:
        t = report["teacher"]
        print(f"teacher {teacher}: {t['parameters']:,} parameters, dim {t['dim']}, "
              f"{t['layers']} layers (bf16, frozen)")
    print(f"world {world} = {nodes} node(s) x {world_per_node} GPUs; batch {batch_size} "
          f"queries/step = {b} per rank; {seqs} sequences per rank per step (b x (2 + k), "
          f"k = {k}), about {tokens_per_rank:,.0f} real tokens on the length mix, in at most "
          f"{chunks} packed chunks of <= {chunk_tokens:,} tokens ({budget_note})")
    counted = (f"{per_epoch:,} steps per epoch (each source's last partial batch filled)"
               if train_rows is not None else
               f"{fewest_per_epoch:,} to {per_epoch:,} steps per epoch (each source's last "
               f"partial batch is filled: up to one step more per source)")
    print(f"data: {rows_note} -> {counted}, {'at most ' * (train_rows is None)}{steps:,} steps "
          f"in total ({epochs} epochs)")
    print(f"compute: {flops_step:.3g} model FLOPs per step; ESTIMATE at {mfu:.0%} MFU on "
          f"{world} x H100 (989 TFLOPS bf16): {days:.1f} days")
    print(f"memory per GPU at the step's peak (chunk of {chunk_tokens:,} tokens; activations "
          f"measured on {MEASURED_ON}):")
    for name, value in gib.items():
        if name == "adamw_states" and shard_optimizer and world > 1:
            print(f"  {name:24s} {value:7.2f} GiB  (the fullest rank of ZeRO's partition; the "
                  f"average, 8P / world, is {adamw_average / GiB:.2f})")
        elif name != "total":
            print(f"  {name:24s} {value:7.2f} GiB")
    verdict = "fits"
    if not fits:
        smaller = chunk_tokens_that_fit(config, world, seqs, lora_rank=lora_rank,
                                        teacher=teacher_cfg, shard_optimizer=shard_optimizer)
        verdict = (f"does NOT fit; --chunk-tokens {smaller} would" if memory_plan(
            config, world, smaller, seqs, shard_optimizer, lora_rank, teacher_cfg)["total"]
            <= PLAN_BYTES else "does NOT fit at any --chunk-tokens; use more GPUs (--nproc, "
            "--nodes), --lora-rank, or a smaller --teacher")
    print(f"  {'total':24s} {gib['total']:7.2f} GiB of the plan's {PLAN_BYTES / GiB:.0f}: "
          f"{verdict}; margin left on an 80 GB GPU ({CARD_BYTES / GiB:.2f} GiB): "
          f"{report['margin_gib']:.2f} GiB")
    return report
