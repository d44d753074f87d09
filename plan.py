"""Plan a real-size F2LLM run without its weights: parameter counts, batch arithmetic, FLOPs,
the per-GPU memory of the cached step, and the token budget of a packed chunk.

    python train.py --size 4b --dry-run --nproc 8 [--nodes M] [--json]

- `qwen3_config(size)`: the backbones' architectures (each hub model's config.json), so
  nothing is downloaded; `meta_backbone` builds them on the meta device (no memory).
- `activation_bytes_per_token(config)`: what autograd keeps per token of a packed chunk under
  bf16 autocast, split into bf16 and fp32 tensors; measured on a real 1- and 2-layer model of
  the same width on the CPU (autocast does not run on the meta device).
- `memory_plan(...)`: the per-GPU bytes of a step, each term once (see its docstring).
- `chunk_tokens_that_fit(...)`: the largest token budget whose plan fits the GPU.
- `length_mix(...)`: the realistic token lengths bench.py and gpu_check.py both use.
Importing this file does nothing.
"""
import copy
import functools
import json

import numpy as np
import torch
from transformers import AutoModel, Qwen3Config

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
}
# the published F2LLM models' own figures: embedding dimension and parameters (a test checks
# that the configs above build exactly these)
PUBLISHED = {"0.6b": dict(dim=1024, params=596_049_920),
             "1.7b": dict(dim=2048, params=1_720_574_976),
             "4b": dict(dim=2560, params=4_022_468_096)}
RELEASED_TUPLES = 5_933_988  # rows of the released F2LLM training set (62 sources)
USABLE_BYTES = 76 * 2**30  # what the plan may fill: the rest is CUDA context, NCCL, fragmentation
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


def parameter_counts(config: Qwen3Config, lora_rank: int = 0) -> dict:
    """all, embedding, `cast` (the weights autocast copies to bf16: linear layers only) and
    `lora` (the adapters of --lora-rank: r x (in + out) per targeted linear layer)."""
    net = meta_backbone(config)
    linears = [(name, m) for name, m in net.named_modules() if isinstance(m, torch.nn.Linear)]
    lora = sum(lora_rank * (m.in_features + m.out_features) for name, m in linears
               if name.split(".")[-1] in M.LORA_TARGETS)
    return dict(all=sum(p.numel() for p in net.parameters()),
                embedding=net.embed_tokens.weight.numel(),
                cast=sum(m.weight.numel() for _, m in linears), lora=lora)


# ---------------------------------------------------------------------------- activations
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


@functools.lru_cache(maxsize=None)
def _per_token(config_json: str, tokens: int, lora_rank: int) -> tuple[float, float]:
    config = Qwen3Config.from_dict(json.loads(config_json))
    measured = []
    for layers in (1, 2):  # uninitialised real weights of one and two layers, a tiny vocabulary
        with torch.device("meta"):
            net = AutoModel.from_config(config_like(config, layers, vocab_size=64),
                                        attn_implementation="sdpa")
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
    """(bf16 bytes, fp32 bytes) that autograd keeps per token of a packed chunk, all layers.
    Linear in tokens once score tensors are left out, so a short row measures it."""
    return _per_token(config.to_json_string(), tokens, lora_rank)


# ---------------------------------------------------------------------------- the plan
def memory_plan(config: Qwen3Config, world: int, chunk_tokens: int, sequences_per_rank: int,
                shard_optimizer: bool = True, lora_rank: int = 0) -> dict:
    """Per-GPU bytes of one cached step (bf16 autocast over fp32 master weights, DDP with
    gradients as bucket views, AdamW states sharded by ZeroRedundancyOptimizer), each once:
      weights_fp32            4 P
      gradients_fp32          4 P
      adamw_states            8 P / world       (8 P unsharded)
      bf16_weight_copies      2 P_linear        (autocast's cache, one per pass)
      activations_bf16        chunk_tokens x measured bf16 bytes per token
      activations_fp32        chunk_tokens x measured fp32 bytes per token (autocast leaves
                                                the residual stream and norms in fp32)
      embedding_grad          4 V D             (the dense fp32 gradient of the embedding,
                                                built in the chunk's backward, then added)
      cached_reps             2 x 4 S D         (reps and their gradient)
    With LoRA (lora_rank > 0) the frozen weights are kept in bf16 (2 P, never cast again) and
    the gradients, AdamW states and fp32 copies are the adapters' A alone:
      weights 2 P + 4 A, gradients 4 A, AdamW 8 A / world, bf16 copies 2 A; the activations
      are measured with the adapters in place; the embedding is frozen (no embedding_grad).
    """
    counts = parameter_counts(config, lora_rank)
    p, a = counts["all"], counts["lora"]
    bf16, fp32 = activation_bytes_per_token(config, lora_rank=lora_rank)
    trained = a if lora_rank else p
    plan = {
        "weights_fp32": 2 * p + 4 * a if lora_rank else 4 * p,
        "gradients_fp32": 4 * trained,
        "adamw_states": 8 * trained // (world if shard_optimizer else 1),
        "bf16_weight_copies": 2 * (a if lora_rank else counts["cast"]),
        "activations_bf16": int(bf16 * chunk_tokens),
        "activations_fp32": int(fp32 * chunk_tokens),
        "embedding_grad": 0 if lora_rank else 4 * counts["embedding"],
        "cached_reps": 2 * 4 * sequences_per_rank * config.hidden_size,
    }
    plan["total"] = sum(plan.values())
    return plan


def chunk_tokens_that_fit(config: Qwen3Config, world: int, sequences_per_rank: int,
                          usable: int = USABLE_BYTES, step: int = 1024, most: int = 65536,
                          lora_rank: int = 0) -> int:
    """The largest multiple of `step` tokens (at most `most`) whose plan fits `usable` bytes."""
    fixed = memory_plan(config, world, 0, sequences_per_rank, lora_rank=lora_rank)["total"]
    bf16, fp32 = activation_bytes_per_token(config, lora_rank=lora_rank)
    return max(step, min(most, int((usable - fixed) / (bf16 + fp32)) // step * step))


# ---------------------------------------------------------------------------- the length mix
def length_mix(rng: np.random.Generator, b: int, k: int, max_length: int) -> list[int]:
    """Token counts (EOS included) of one rank's batch [queries; positives; negatives]:
    queries log-uniform in 20..300 (instruction included); documents log-normal, median 140,
    sigma 0.9, clipped to [16, max_length] (~1.4% cut at 1024). At b = 64, k = 7 that is about
    110k real tokens per rank-step, the figure of the paper's run (DESIGN §4)."""
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
def dry_run(size: str, model: str, world_per_node: int, nodes: int, batch_size: int, epochs: int,
            steps: int, val_fraction: float, chunk_tokens: int, max_length: int, k: int = 7,
            shard_optimizer: bool = True, as_json: bool = False, mfu: float = 0.30,
            lora_rank: int = 0) -> dict:
    world = world_per_node * nodes
    config = qwen3_config(size)
    counts = parameter_counts(config)
    b = batch_size // world
    seqs = b * (2 + k)
    train_rows = RELEASED_TUPLES - int(RELEASED_TUPLES * val_fraction)
    per_epoch = train_rows // batch_size  # each source's partial batch is filled (1 more at most)
    steps = steps or epochs * per_epoch
    rng = np.random.default_rng(0)
    batches = [length_mix(rng, b, k, max_length) for _ in range(20)]  # 20 rank-steps of the mix
    tokens_per_rank = float(np.mean([sum(x) for x in batches]))
    # one varlen row per chunk (CUDA)
    chunks = max(len(M.make_chunks(x, chunk_tokens)) for x in batches)
    plan = memory_plan(config, world, chunk_tokens, seqs, shard_optimizer, lora_rank)
    flops_step = flops_per_token(config) * tokens_per_rank * world
    days = steps * flops_step / (world * H100_BF16_FLOPS * mfu) / 86400
    report = dict(size=size, model=model, parameters=counts["all"], lora_rank=lora_rank,
                  lora_parameters=parameter_counts(config, lora_rank)["lora"], world=world,
                  nodes=nodes,
                  batch_size=batch_size, per_rank_queries=b, sequences_per_rank=seqs, steps=steps,
                  steps_per_epoch=per_epoch, real_tokens_per_rank_step=round(tokens_per_rank),
                  chunks_per_step=chunks, tokens_per_chunk=chunk_tokens, flops_per_step=flops_step,
                  memory_gib={k_: v / 2**30 for k_, v in plan.items()},
                  estimate=dict(mfu=mfu, days=days, gpus=f"{world} x H100 80GB"))
    if as_json:
        print(json.dumps(report))
        return report
    gib = report["memory_gib"]
    print(f"backbone {model}: {counts['all']:,} parameters without LM head, embedding dim "
          f"{config.hidden_size}, {config.num_hidden_layers} layers"
          + (f"; LoRA rank {lora_rank}: {report['lora_parameters']:,} trained parameters"
             if lora_rank else ""))
    print(f"world {world} = {nodes} node(s) x {world_per_node} GPUs; batch {batch_size} "
          f"queries/step = {b} per rank; {seqs} sequences per rank per step (b x (2 + k), "
          f"k = {k}), about {tokens_per_rank:,.0f} real tokens on the length mix, in at most "
          f"{chunks} packed chunks of <= {chunk_tokens:,} tokens")
    print(f"data: {RELEASED_TUPLES:,} tuples, {val_fraction:.0%} held out -> about {per_epoch:,} "
          f"steps per epoch, {steps:,} steps in total ({epochs} epochs)")
    print(f"compute: {flops_step:.3g} model FLOPs per step; ESTIMATE at {mfu:.0%} MFU on "
          f"{world} x H100 (989 TFLOPS bf16): {days:.1f} days")
    print(f"memory per GPU (chunk of {chunk_tokens:,} tokens):")
    for name, value in gib.items():
        if name != "total":
            print(f"  {name:24s} {value:7.2f} GiB")
    verdict = "fits" if plan["total"] <= USABLE_BYTES else "does NOT fit; lower --chunk-tokens"
    print(f"  {'total':24s} {gib['total']:7.2f} GiB of 76 usable on an 80 GB GPU: {verdict}")
    return report
