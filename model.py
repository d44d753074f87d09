"""The F2LLM embedding model: a Qwen3 backbone, last-token pooling, L2 normalisation.

Contract:
- `load_backbone(name)` gives the backbone (AutoModel, no LM head) and its tokenizer;
  `tiny_backbone(tokenizer)` builds the small Qwen3-architecture model of `--size tiny`.
- `tokenize(tokenizer, texts, max_length)` gives id lists that END WITH EOS: texts are cut
  to max_length - 1 tokens and EOS is appended as an id, so truncation never deletes it.
- `embed(backbone, input_ids, lengths)` gives fp32 unit vectors, one per sequence: the
  hidden state of its last real token (the EOS), masks built from lengths (DESIGN I3).
- `encode(backbone, tokenizer, texts)` embeds raw texts in length-sorted batches.
- `save_export(...)` writes a folder that AutoModel, SentenceTransformer and mteb's F2LLM
  loader all load with last-token pooling, normalisation and an EOS-appending tokenizer.
Importing this file does nothing.
"""
import copy
import json
import os
import shutil

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerFast, Qwen3Config

# Size presets (DESIGN §2). `dim` and `params` are the published models' own figures.
# chunk_size: sequences per forward, chosen so that `train.py --dry-run` plans < 80 GB per GPU.
PRESETS = {
    "tiny": dict(model="tiny", lr=1e-3, batch_size=32, dim=64, max_length=128, chunk_size=32),
    "0.6b": dict(model="Qwen/Qwen3-0.6B", lr=1e-5, batch_size=512, dim=1024, max_length=1024,
                 chunk_size=16, params=596_049_920),
    "1.7b": dict(model="Qwen/Qwen3-1.7B", lr=9e-6, batch_size=512, dim=2048, max_length=1024,
                 chunk_size=8, params=1_720_574_976),
    "4b": dict(model="Qwen/Qwen3-4B", lr=8e-6, batch_size=512, dim=2560, max_length=1024,
               chunk_size=2, params=4_022_468_096),
}

# The backbones' architectures (config.json of each hub model), so that a dry run can build
# them on the meta device without a download.
_QWEN3_COMMON = dict(vocab_size=151936, head_dim=128, max_position_embeddings=40960,
                     rope_theta=1_000_000, rms_norm_eps=1e-6, num_key_value_heads=8,
                     bos_token_id=151643, eos_token_id=151645)
QWEN3_CONFIGS = {
    "0.6b": dict(_QWEN3_COMMON, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, tie_word_embeddings=True),
    "1.7b": dict(_QWEN3_COMMON, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                 num_attention_heads=16, tie_word_embeddings=True),
    "4b": dict(_QWEN3_COMMON, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
               num_attention_heads=32, tie_word_embeddings=True),
}

# Qwen3's special tokens: pad `<|endoftext|>` is a real, EOS-like token (so masks never come
# from `ids != pad`); the EOS that ends every sequence is `<|im_end|>`.
PAD_TOKEN, EOS_TOKEN, SPECIAL_TOKENS = "<|endoftext|>", "<|im_end|>", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


# ---------------------------------------------------------------------------- backbones
def attention_implementation(device: torch.device) -> str:
    """flash_attention_2 on CUDA when the package is installed, sdpa otherwise."""
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def load_backbone(name: str, attn: str = "sdpa", dtype=torch.float32):
    """A hub id or a local folder (ours or any Qwen3) -> (backbone, tokenizer)."""
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {name} has no EOS token; F2LLM pools the EOS. "
                         f"Set eos_token in its tokenizer_config.json.")
    backbone = AutoModel.from_pretrained(name, attn_implementation=attn, dtype=dtype)
    return backbone, tokenizer


def tiny_config(vocab_size: int) -> Qwen3Config:
    """A Qwen3 with 2 layers of width 64: the whole recipe in minutes on a CPU."""
    return Qwen3Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=192,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, max_position_embeddings=8192, tie_word_embeddings=True,
                       attention_dropout=0.0)


def tiny_backbone(tokenizer, seed: int, attn: str = "sdpa"):
    torch.manual_seed(seed)
    config = tiny_config(len(tokenizer))
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    return AutoModel.from_config(config, attn_implementation=attn)


def train_tokenizer(texts, vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Qwen3's special tokens, trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN, add_eos_token=True)


# ---------------------------------------------------------------------------- tokens
def tokenize(tokenizer, texts: list[str], max_length: int) -> tuple[list[list[int]], int]:
    """Texts -> (id lists ending in EOS, at most max_length long; how many were cut)."""
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    n_cut = sum(len(x) > max_length - 1 for x in ids)
    eos = tokenizer.eos_token_id
    return [x[: max_length - 1] + [eos] for x in ids], n_cut


def pad(seqs: list[list[int]], pad_id: int, side: str = "right"):
    """Id lists -> (input_ids (n, L), lengths (n,)). The mask is made from lengths later."""
    lengths = torch.tensor([len(s) for s in seqs])
    input_ids = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "right":
            input_ids[i, : len(s)] = torch.tensor(s)
        else:
            input_ids[i, input_ids.shape[1] - len(s):] = torch.tensor(s)
    return input_ids, lengths


def mask_from_lengths(lengths: torch.Tensor, width: int, side: str = "right") -> torch.Tensor:
    positions = torch.arange(width, device=lengths.device)  # (L,)
    if side == "right":
        return (positions[None, :] < lengths[:, None]).long()  # (n, L)
    return (positions[None, :] >= width - lengths[:, None]).long()


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(n, L, D) hidden states -> (n, D): the state at each row's LAST position with mask 1.

    Right for right and left padding alike (sum(mask) - 1 breaks under left padding and
    [:, -1] under right padding)."""
    width = attention_mask.shape[1]
    last = width - 1 - attention_mask.flip(-1).argmax(-1)  # (n,) index of the last real token
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def embed(backbone, input_ids: torch.Tensor, lengths: torch.Tensor, side: str = "right"):
    """Padded ids (n, L) -> unit-norm fp32 embeddings (n, D)."""
    attention_mask = mask_from_lengths(lengths.to(input_ids.device), input_ids.shape[1], side)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return F.normalize(last_token_pool(hidden, attention_mask).float(), dim=-1)


@torch.no_grad()
def encode(backbone, tokenizer, texts: list[str], batch_size: int = 32, max_length: int = 8192,
           device=None) -> torch.Tensor:
    """Texts -> (n, D) fp32 unit vectors, in the input order. Batches are formed from
    texts sorted by length, so each batch pads only to its own longest text."""
    device = device or next(backbone.parameters()).device
    ids, _ = tokenize(tokenizer, texts, max_length)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out = torch.empty(len(ids), backbone.config.hidden_size)
    for start in range(0, len(ids), batch_size):
        rows = order[start: start + batch_size]
        input_ids, lengths = pad([ids[i] for i in rows], tokenizer.pad_token_id)
        out[rows] = embed(backbone, input_ids.to(device), lengths).cpu()
    return out


# ---------------------------------------------------------------------------- export
def save_export(backbone, tokenizer, out: str, prompts: dict | None = None,
                max_length: int = 8192) -> None:
    """Write a checkpoint folder that every tool loads the F2LLM way (DESIGN I6).

    Written to `out.tmp` and renamed into place when complete, so a crash never leaves a
    half-written export where a finished one is expected."""
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    backbone.save_pretrained(tmp, safe_serialization=True)
    tokenizer = copy.deepcopy(tokenizer)  # the caller's tokenizer stays as it was
    tokenizer.add_eos_token = True  # the saved tokenizer appends EOS after truncation
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(tmp)
    dim = backbone.config.hidden_size
    files = {  # sentence-transformers: Transformer -> last-token Pooling -> Normalize
        "modules.json": [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ],
        "sentence_bert_config.json": {"max_seq_length": max_length, "do_lower_case": False},
        "config_sentence_transformers.json": {
            "prompts": prompts or {"query": "", "document": ""},
            "default_prompt_name": None, "similarity_fn_name": "cosine"},
        "1_Pooling/config.json": {"word_embedding_dimension": dim, "pooling_mode_lasttoken": True,
                                  "pooling_mode_mean_tokens": False, "pooling_mode_cls_token": False,
                                  "pooling_mode_max_tokens": False, "include_prompt": True},
        "2_Normalize/config.json": {},
    }
    for name, content in files.items():
        os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
        with open(os.path.join(tmp, name), "w") as f:
            json.dump(content, f, indent=2)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)


# ---------------------------------------------------------------------------- planning
def qwen3_config(size: str, num_hidden_layers: int | None = None) -> Qwen3Config:
    config = Qwen3Config(**QWEN3_CONFIGS[size])
    if num_hidden_layers is not None:
        config.num_hidden_layers = num_hidden_layers
    return config


def meta_backbone(config: Qwen3Config, dtype=torch.bfloat16):
    """The architecture with no weights (meta device): shapes and counts, no memory.
    Eager attention: its saved tensors are plain ops that the meta device reproduces
    exactly (tests/test_plan.py checks them against a real CPU forward)."""
    with torch.device("meta"):  # a copy: from_config would record the dtype in `config`
        return AutoModel.from_config(copy.deepcopy(config), dtype=dtype, attn_implementation="eager")


def saved_activation_bytes(backbone, n: int, length: int, device="meta", drop_scores=False) -> int:
    """Bytes autograd keeps for backward in one forward of n sequences of `length` tokens,
    counted with saved-tensor hooks (each tensor once). On the meta device this costs no
    memory. drop_scores leaves out (..., L, L) attention-score tensors: flash attention
    never stores them."""
    saved = {}

    def pack(t):
        if not (drop_scores and t.dim() >= 2 and t.shape[-1] == t.shape[-2] == length):
            saved[id(t)] = t.numel() * t.element_size()
        return t
    ids = torch.zeros(n, length, dtype=torch.long, device=device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        backbone(input_ids=ids)
    return sum(saved.values())


def memory_plan(config: Qwen3Config, world: int, chunk_size: int, max_length: int,
                sequences_per_rank: int, shard_optimizer: bool = True) -> dict:
    """Per-GPU bytes of a training step (bf16 autocast over fp32 master weights, DDP with
    gradients as bucket views, AdamW states sharded by ZeroRedundancyOptimizer):
      weights (fp32 master)   4 P
      gradients (fp32)        4 P
      AdamW m and v (fp32)    8 P / world   (8 P without sharding)
      bf16 weight copies      2 P           (autocast casts each weight once per forward,
                                             kept for backward)
      activations             one chunk of chunk_size sequences at max_length, all layers
                              (pass 2 holds one chunk at a time), measured on the meta device
                              from a 1- and 2-layer model; eager attention's (L, L) score
                              tensors are left out (flash attention stores none), its other
                              tensors kept, so the figure errs on the high side
      cached reps             sequences_per_rank x D fp32, with its gradient
    """
    p = sum(t.numel() for t in meta_backbone(config).parameters())
    acts = []
    for layers in (1, 2):
        small = meta_backbone(qwen3_config_like(config, layers))
        acts.append(saved_activation_bytes(small, chunk_size, max_length, drop_scores=True))
    per_layer, base = acts[1] - acts[0], 2 * acts[0] - acts[1]
    plan = {
        "weights_fp32": 4 * p,
        "gradients_fp32": 4 * p,
        "adamw_states": 8 * p // (world if shard_optimizer else 1),
        "bf16_weight_copies": 2 * p,
        "activations_one_chunk": base + per_layer * config.num_hidden_layers,
        "cached_reps": 2 * 4 * sequences_per_rank * config.hidden_size,
    }
    plan["total"] = sum(plan.values())
    plan["activations_per_layer"] = per_layer
    return plan


def qwen3_config_like(config: Qwen3Config, num_hidden_layers: int) -> Qwen3Config:
    small = Qwen3Config(**{k: v for k, v in config.to_dict().items() if k in QWEN3_CONFIGS["4b"]
                           or k in ("hidden_size", "intermediate_size", "num_attention_heads")})
    small.num_hidden_layers = num_hidden_layers
    return small
