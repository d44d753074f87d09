"""The F2LLM embedding model: a Qwen3 backbone, last-token pooling, L2 normalisation.

Contract:
- `load_backbone(name)` gives the backbone (AutoModel, no LM head) and its tokenizer;
  `tiny_backbone(tokenizer)` builds the small Qwen3-architecture model of `--size tiny`.
- `tokenize(tokenizer, texts, max_length)` gives id lists that END WITH EOS: texts are cut
  to max_length - 1 tokens and EOS is appended as an id, so truncation never deletes it.
- `setup_attention(device, bf16)` chooses and registers the attention of packed chunks.
- `make_chunks` + `pack` (the two: `packed_chunks`) + `embed_packed`: sequences
  concatenated into rows with position ids restarting per sequence, attention kept inside
  each sequence (flash-attn or torch varlen on CUDA, block-diagonal sdpa masks otherwise),
  pooled at each sequence's EOS: no padding is computed. `embed(backbone, input_ids,
  lengths)` is the padded reference (on either attention): fp32 unit vectors at each row's
  last real token, masks built from lengths (DESIGN I3).
- `encode(backbone, tokenizer, texts)` embeds raw texts in packed chunks.
- `save_export(...)` writes a folder that AutoModel, SentenceTransformer and mteb's F2LLM
  loader all load with last-token pooling, normalisation and an EOS-appending tokenizer.
Importing this file does nothing.
"""
import contextlib
import copy
import functools
import importlib.util
import inspect
import json
import os
import shutil
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import (
    AttentionInterface,
    AutoModel,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    Qwen3Config,
)

# Qwen3's special tokens: pad `<|endoftext|>` is a real, EOS-like token (so masks never come
# from `ids != pad`); the EOS that ends every sequence is `<|im_end|>`.
PAD_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_end|>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


# ---------------------------------------------------------------------------- backbones
# Packed chunks (DESIGN §4) need attention that stays inside each sequence of a row:
# - "f2llm_varlen" (CUDA, bf16): ONE row per chunk, cumulative lengths passed down as kwargs,
#   so no layer syncs the host. Kernel: flash-attn's varlen function when installed, else
#   torch's own torch.nn.attention.varlen.varlen_attn (torch >= 2.10, e.g. 2.11 images).
# - "sdpa" (CPU, tests, CUDA in fp32 or without either kernel): several packed rows per chunk;
#   transformers sees position ids restart and builds a block-diagonal causal mask per row.
# F2LLM_FORCE_VARLEN=1 runs "f2llm_varlen" on a CPU too, one sdpa per sequence standing in for
# the kernel: the CUDA layout and code path, checked against sdpa rows by the tests.
VARLEN = "f2llm_varlen"
FORCE_VARLEN = "F2LLM_FORCE_VARLEN"


def forced_varlen() -> bool:
    value = os.environ.get(FORCE_VARLEN, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"{FORCE_VARLEN}={value!r}: use 1 (the CUDA attention path on a CPU) "
                         f"or 0")
    return value == "1"


def varlen_kernels(device_type: str) -> list[str]:
    """The varlen kernels importable here, best first (none off CUDA)."""
    if device_type != "cuda":
        return []
    return [name for name, module in (("flash-attn", "flash_attn"),
                                      ("torch varlen_attn", "torch.nn.attention.varlen"))
            if _importable(module)]


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def choose_attention(device_type: str, bf16: bool, forced: bool,
                     kernels: list[str]) -> tuple[str, str]:
    """The decision alone (no imports, so a CPU test covers the CUDA cases):
    -> (attention implementation, the kernel that runs or why sdpa rows do)."""
    if device_type == "cuda" and not bf16:  # never a kernel error mid-step
        return "sdpa", ("block-diagonal masks: the varlen kernels take bf16/fp16 only and "
                        "--precision is fp32")
    if device_type == "cuda" and kernels:
        return VARLEN, kernels[0]
    if device_type == "cuda":
        return "sdpa", "block-diagonal masks: no flash-attn and torch < 2.10 has no varlen_attn"
    if forced:
        return VARLEN, f"one sdpa per sequence standing in for the CUDA kernel ({FORCE_VARLEN}=1)"
    return "sdpa", "block-diagonal masks"


def setup_attention(device: torch.device, bf16: bool = True,
                    forced: bool | None = None) -> tuple[str, str]:
    """Choose the attention of packed chunks on this device and, for VARLEN, register it with
    transformers with its kernel and keyword arguments fixed now, not per call (not with
    transformers' mask functions: a packed row needs no mask). -> (implementation, note)."""
    forced = forced_varlen() if forced is None else forced
    attn, note = choose_attention(device.type, bf16, forced, varlen_kernels(device.type))
    if attn == VARLEN:
        kernel = (_flash_kernel() if note == "flash-attn" else
                  _torch_kernel() if note == "torch varlen_attn" else sdpa_per_sequence)
        AttentionInterface.register(VARLEN, functools.partial(packed_attention, kernel=kernel))
    return attn, note


def attention_implementation(device: torch.device, bf16: bool = True,
                             forced: bool | None = None) -> str:
    """setup_attention's implementation name: what AutoModel's attn_implementation takes."""
    return setup_attention(device, bf16, forced)[0]


# The kernels: (q (T, H, d), k and v (T, H_kv, d), cu (n + 1,) int32, longest, scaling,
# dropout) -> (T, H, d), causal inside each sequence. None repeats k and v for grouped heads:
# flash-attn takes H % H_kv == 0; so does torch's varlen_attn, whose 2.10/2.11 wrapper passes
# k and v as they are to aten._flash_attention_forward (torch/nn/attention/varlen.py), which
# runs FA2's mha_varlen_fwd: it checks only `num_heads % num_heads_k == 0`, and mha_varlen_bwd
# sums dk, dv over each group (aten/src/ATen/native/transformers/cuda/flash_attn/
# flash_api.cpp); torch 2.13's wrapper refuses H != H_kv unless enable_gqa=True. A repeat would
# only add the repeated copies to what backward keeps.
def _flash_kernel():
    from flash_attn import flash_attn_varlen_func

    def kernel(q, k, v, cu, longest, scaling, dropout):
        return flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, dropout_p=dropout,
                                      softmax_scale=scaling, causal=True)
    return kernel


def _torch_kernel():
    from torch.nn.attention.varlen import varlen_attn
    params = inspect.signature(varlen_attn).parameters
    # torch 2.10 says is_causal, later versions window_size; 2.13 adds enable_gqa
    fixed = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if "enable_gqa" in params:
        fixed["enable_gqa"] = True
    takes_scale = "scale" in params  # else its default, 1 / sqrt(head_dim): Qwen3's scaling too

    def kernel(q, k, v, cu, longest, scaling, dropout):
        if dropout:
            raise ValueError("attention dropout needs flash-attn (torch's varlen_attn has none); "
                             "pip install flash-attn or set attention_dropout to 0")
        scale = {"scale": scaling} if takes_scale else {}
        return varlen_attn(q, k, v, cu, cu, longest, longest, **fixed, **scale)
    return kernel


def sdpa_per_sequence(q, k, v, cu, longest, scaling, dropout):
    """The CPU stand-in: one sdpa per sequence (reads the bounds on the host, once per layer)."""
    bounds = cu.tolist()
    return torch.cat([F.scaled_dot_product_attention(
        q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1), is_causal=True,
        scale=scaling, dropout_p=dropout, enable_gqa=True).transpose(0, 1)
        for s, e in zip(bounds[:-1], bounds[1:])])


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     cu_seq_lens_q=None, max_length_q=None, kernel=sdpa_per_sequence, **kwargs):
    """transformers' attention interface for one packed row: query (1, H, T, d), key and value
    (1, H_kv, T, d), sequences delimited by cu_seq_lens_q (n + 1,) int32 -> (1, T, H, d).
    Causal inside each sequence, nothing across."""
    if cu_seq_lens_q is None or query.shape[0] != 1:
        raise ValueError(
            f"{VARLEN} attention takes one packed row and its sequence bounds (model.pack, "
            f"model.embed_packed); got {query.shape[0]} row(s) and cu_seq_lens_q="
            f"{'None' if cu_seq_lens_q is None else 'given'}. A padded batch needs a mask, "
            f"which transformers builds for sdpa only: run it inside "
            f"model.padded_attention(backbone) (model.embed does)")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (T, H, d), (T, H_kv, d)
    if torch.is_autocast_enabled(q.device.type):  # q/k leave Qwen3's fp32 norms under autocast
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = kernel(q, k, v, cu_seq_lens_q, max_length_q, scaling, dropout)  # (T, H, d)
    return out[None], None  # (1, T, H, d), no attention weights


@contextlib.contextmanager
def padded_attention(backbone):
    """A padded forward on any backbone: transformers builds no mask for a registered name
    like VARLEN (DESIGN §8), so a VARLEN backbone runs it as sdpa, the same weights and math."""
    config = backbone.config
    attn = config._attn_implementation
    if attn == VARLEN:
        config._attn_implementation = "sdpa"
    try:
        yield
    finally:
        config._attn_implementation = attn


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


def train_tokenizer(texts, vocab_size: int = 16384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Qwen3's special tokens, trained on `texts`. 16,384 tokens
    make most words one token, which the tiny model matches far better than word pieces
    (README, the tiny testbed)."""
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


# LoRA (--lora-rank): peft adapters on every linear layer of the backbone; alpha = 2 x rank
# (the usual scale), no adapter dropout (so pass 2 replays pass 1 exactly without RNG help).
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def add_lora(backbone, rank: int):
    """backbone -> a peft model whose only trainable parameters are the rank-`rank` adapters."""
    from peft import LoraConfig, get_peft_model
    return get_peft_model(backbone, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                               target_modules=LORA_TARGETS))


def unwrap(model):
    """The plain Qwen3 backbone: adapters merged into the weights (a copy), or the model itself."""
    if hasattr(model, "merge_and_unload"):
        return copy.deepcopy(model).merge_and_unload()
    return model


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
    with padded_attention(backbone):  # a VARLEN backbone too
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                          use_cache=False).last_hidden_state
    return F.normalize(last_token_pool(hidden, attention_mask).float(), dim=-1)


# ---------------------------------------------------------------------------- packed chunks
def first_fit(lengths: list[int], capacity: int, most: int = 0) -> list[list[int]]:
    """Ids -> bins of total length <= capacity (a longer item gets a bin of its own) and at
    most `most` items (0 = any): first fit, longest first, so bins come out nearly full."""
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        b = next((b for b, free in enumerate(room) if free >= lengths[i]
                  and not (most and len(bins[b]) >= most)), None)
        if b is None:
            bins.append([]), room.append(max(capacity, lengths[i]))
            b = len(bins) - 1
        bins[b].append(i)
        room[b] -= lengths[i]
    return bins


def make_chunks(lengths: list[int], chunk_tokens: int, chunk_size: int = 0,
                width: int | None = None):
    """Sequence ids -> chunks of at most chunk_tokens computed tokens (a longer sequence gets a
    chunk of its own) and, if chunk_size > 0, at most chunk_size sequences.
    width None (varlen, one row per chunk): sequences first-fit into chunks, no padding.
    width W (sdpa rows): sequences first-fit into rows of W tokens over the whole batch, so
    short sequences fill the rows of long ones; then runs of rows form the chunks."""
    if width is None:
        return first_fit(lengths, chunk_tokens, chunk_size)
    chunks, tokens = [], 0
    for row in first_fit(lengths, width, chunk_size):
        fits = chunks and tokens + width <= chunk_tokens
        if fits and not (chunk_size and len(chunks[-1]) + len(row) > chunk_size):
            chunks[-1] += row
            tokens += width
        else:
            chunks.append(list(row))
            tokens = width
    return chunks


@dataclass
class Packed:
    """Sequences laid end to end in rows, position ids restarting at each sequence."""
    input_ids: torch.Tensor  # (R, W)
    position_ids: torch.Tensor  # (R, W)
    last: torch.Tensor  # (n,) index into the flattened (R * W) of each sequence's EOS
    cu_seqlens: torch.Tensor | None  # (n + 1,) int32 sequence bounds, one-row layout only
    longest: int

    def to(self, device) -> "Packed":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)
        return Packed(move(self.input_ids), move(self.position_ids), move(self.last),
                      move(self.cu_seqlens), self.longest)

    @property
    def computed_tokens(self) -> int:
        return self.input_ids.numel()


def pack(seqs: list[list[int]], width: int | None = None, pin: bool = False) -> Packed:
    """Id lists -> Packed. width None (varlen attention): one row of all tokens, no padding.
    width W (sdpa): rows of W tokens (at least the longest sequence), filled first-fit longest
    first, each row's tail padded by a dummy sequence that nothing pools."""
    lengths = [len(s) for s in seqs]
    one_row = width is None
    width = sum(lengths) if one_row else max(width, *lengths)
    rows = first_fit(lengths, width)  # sequence ids per row
    ids, positions, last = [], [], [0] * len(seqs)
    for members in rows:
        for i in members:
            last[i] = len(ids) + lengths[i] - 1  # rows before this one are width long
            ids += seqs[i]
            positions += range(lengths[i])
        pad = width - len(ids) % width if len(ids) % width else 0
        ids += [0] * pad  # padding: its own segment (positions restart at 0), never pooled
        positions += range(pad)
    shape = (len(rows), width)
    packed = Packed(torch.tensor(ids).view(shape), torch.tensor(positions).view(shape),
                    torch.tensor(last), None, max(lengths))
    if one_row:
        order = rows[0]
        bounds = [0]
        for i in order:
            bounds.append(bounds[-1] + lengths[i])
        packed.cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
    if pin:
        packed = Packed(*(t.pin_memory() if t is not None else None for t in
                          (packed.input_ids, packed.position_ids, packed.last, packed.cu_seqlens)),
                        packed.longest)
    return packed


def packed_chunks(model, seqs: list[list[int]], chunk_tokens: int, chunk_size: int = 0):
    """seqs -> the step's chunks on the model's device: [(Packed, rows (n,)), ...], chunk i
    packing the sequences rows into at most chunk_tokens tokens (make_chunks, pack), copied
    with pinned, non-blocking transfers. The row width follows the model's attention."""
    device = next(model.parameters()).device
    width = row_width(model, seqs)
    cuda = device.type == "cuda"
    chunks = []
    for c in make_chunks([len(s) for s in seqs], chunk_tokens, chunk_size, width):
        rows = torch.tensor(c)
        chunks.append((pack([seqs[i] for i in c], width, pin=cuda).to(device),
                       (rows.pin_memory() if cuda else rows).to(device, non_blocking=True)))
    return chunks


def embed_packed(backbone, packed: Packed, unit: bool = True) -> torch.Tensor:
    """A packed chunk -> (n, D) fp32 states at each sequence's last token (its EOS): unit
    vectors, or with unit=False the raw hidden states (the cached step's, see train.py)."""
    varlen = {}
    if packed.cu_seqlens is not None:  # passed down to every layer: no layer syncs the host
        varlen = dict(cu_seq_lens_q=packed.cu_seqlens, cu_seq_lens_k=packed.cu_seqlens,
                      max_length_q=packed.longest, max_length_k=packed.longest)
    hidden = backbone(input_ids=packed.input_ids, position_ids=packed.position_ids,
                      use_cache=False, **varlen).last_hidden_state  # (R, W, D)
    pooled = hidden.flatten(0, 1)[packed.last].float()  # (n, D)
    return F.normalize(pooled, dim=-1) if unit else pooled


def uses_varlen(backbone) -> bool:
    return backbone.config._attn_implementation == VARLEN


def row_width(backbone, seqs: list[list[int]]) -> int | None:
    """The packing width for this backbone: None (one varlen row per chunk) or, for sdpa, the
    longest sequence of the batch (rows shared by long and short sequences)."""
    return None if uses_varlen(backbone) else max(len(s) for s in seqs)


@torch.no_grad()
def encode(backbone, tokenizer, texts: list[str], batch_size: int = 32, max_length: int = 8192,
           device=None, chunk_tokens: int = 16384) -> torch.Tensor:
    """Texts -> (n, D) fp32 unit vectors, in the input order. Texts are packed, longest
    first, into chunks of at most batch_size texts and chunk_tokens tokens."""
    device = device or next(backbone.parameters()).device
    ids, _ = tokenize(tokenizer, texts, max_length)
    out = torch.empty(len(ids), backbone.config.hidden_size)
    width = row_width(backbone, ids)
    for rows in make_chunks([len(x) for x in ids], chunk_tokens, batch_size, width):
        chunk = [ids[i] for i in rows]  # sdpa rows as wide as this chunk's longest text
        packed = pack(chunk, width and max(len(x) for x in chunk)).to(device)
        out[rows] = embed_packed(backbone, packed).cpu()
    return out


# ---------------------------------------------------------------------------- export
def modes_from_umask(folder: str) -> None:
    """Give every file and folder under `folder` the mode a plain open() or mkdir() would
    (0o666 / 0o777 less the umask): safetensors' save_file writes a temporary file and renames
    it, so model.safetensors comes out 0600, unreadable to a teammate or a serving container
    running as another user. Called on a folder before it is renamed into place."""
    umask = os.umask(0)  # the only way to read it (Python 3.11): set, then put back
    os.umask(umask)
    for root, _, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


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
            {"idx": 1, "name": "1", "path": "1_Pooling",
             "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize",
             "type": "sentence_transformers.models.Normalize"},
        ],
        "sentence_bert_config.json": {"max_seq_length": max_length, "do_lower_case": False},
        "config_sentence_transformers.json": {
            "prompts": prompts or {"query": "", "document": ""},
            "default_prompt_name": None, "similarity_fn_name": "cosine"},
        "1_Pooling/config.json": {"word_embedding_dimension": dim, "pooling_mode_lasttoken": True,
                                  "pooling_mode_mean_tokens": False,
                                  "pooling_mode_cls_token": False,
                                  "pooling_mode_max_tokens": False, "include_prompt": True},
        "2_Normalize/config.json": {},
    }
    for name, content in files.items():
        os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
        with open(os.path.join(tmp, name), "w") as f:
            json.dump(content, f, indent=2)
    modes_from_umask(tmp)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
