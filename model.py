"""The F2LLM embedding model: a Qwen3 backbone, last-token pooling, L2 normalisation.

Contract:
- `load_backbone(name)` gives the backbone (AutoModel, no LM head) and its tokenizer;
  `tiny_backbone(tokenizer)` builds the small Qwen3-architecture model of `--size tiny`;
  `add_lora` and `unwrap` put LoRA adapters on and merge them back.
- `tokenize(tokenizer, texts, max_length)` gives id lists that END WITH EOS: texts are cut
  to max_length - 1 tokens and EOS is appended as an id, so truncation never deletes it.
- `packed_chunks` (`make_chunks` + `pack`) + `embed_packed`: sequences concatenated into rows
  with position ids restarting per sequence, attention kept inside each sequence
  (runtime/attention.py), pooled at each sequence's EOS by `last_token_pool`: no padding is
  computed. Training, validation and `encode` all pool here.
- `embed(backbone, input_ids, lengths)` is the tests' padded reference (either attention):
  the same `last_token_pool`, at each row's last real token, found from lengths, never from
  `ids != pad` (docs/design.md I3).
- `encode(backbone, tokenizer, texts)` embeds raw texts in packed chunks.
- `save_export(...)` writes a folder that AutoModel, SentenceTransformer and mteb's F2LLM
  loader all load with last-token pooling, normalisation and an EOS-appending tokenizer.
Importing this file does nothing.
"""
import copy
import json
import os
import shutil
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer, Qwen3Config


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


def last_token_pool(hidden: torch.Tensor, last: torch.Tensor, unit: bool = True) -> torch.Tensor:
    """THE pooling (training, validation, encode, the padded reference): hidden (R, W, D), last
    (n,) each sequence's EOS as an index into the flattened R * W -> (n, D) fp32 states there,
    unit vectors or with unit=False raw (the cached step's: v2's distillation reads them raw)."""
    pooled = hidden.flatten(0, 1)[last].float()  # (n, D)
    return F.normalize(pooled, dim=-1) if unit else pooled


def embed(backbone, input_ids: torch.Tensor, lengths: torch.Tensor, side: str = "right"):
    """The tests' padded reference: padded ids (n, L) -> unit fp32 embeddings (n, D). The mask
    and each row's last real position come from lengths, right for either padding side
    (sum(mask) - 1 breaks under left padding and [:, -1] under right padding)."""
    n, width = input_ids.shape
    lengths = lengths.to(input_ids.device)
    positions = torch.arange(width, device=input_ids.device)  # (L,)
    if side == "right":
        attention_mask = (positions[None, :] < lengths[:, None]).long()  # (n, L)
        last = lengths - 1  # (n,)
    else:
        attention_mask = (positions[None, :] >= width - lengths[:, None]).long()
        last = torch.full_like(lengths, width - 1)
    from runtime.attention import padded_attention  # the reference alone needs it
    with padded_attention(backbone):  # a VARLEN backbone too
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                          use_cache=False).last_hidden_state  # (n, L, D)
    return last_token_pool(hidden, torch.arange(n, device=last.device) * width + last)


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
    chunk of its own) and at most chunk_size sequences (0: any). width None (one varlen row per
    chunk): sequences first-fit into chunks. width W (sdpa rows): sequences first-fit into rows
    of W tokens over the whole batch, short ones filling long ones' rows; runs of rows: chunks."""
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
        """To the device; to CUDA through pinned memory, without blocking the host."""
        move = lambda t: None if t is None else (t.pin_memory() if torch.device(device).type
                                                 == "cuda" else t).to(device, non_blocking=True)
        return Packed(move(self.input_ids), move(self.position_ids), move(self.last),
                      move(self.cu_seqlens), self.longest)

    @property
    def computed_tokens(self) -> int:
        return self.input_ids.numel()


# the attention of one-row packed chunks (flash-attn or torch varlen on CUDA): its name, which
# runtime/attention.py registers with transformers; any other attention gets sdpa rows
VARLEN = "f2llm_varlen"


def uses_varlen(backbone) -> bool:
    return backbone.config._attn_implementation == VARLEN


def row_width(backbone, seqs: list[list[int]]) -> int | None:
    """Packing width: None (one varlen row per chunk) or sdpa rows as wide as the longest."""
    return None if uses_varlen(backbone) else max(map(len, seqs))


def pack(seqs: list[list[int]], width: int | None = None) -> Packed:
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
    cu_seqlens = None  # one row: the sequences' bounds, in the row's order, for the kernel
    if one_row:
        cu_seqlens = torch.tensor([0] + [lengths[i] for i in rows[0]]).cumsum(0).int()
    shape = (len(rows), width)
    return Packed(torch.tensor(ids).view(shape), torch.tensor(positions).view(shape),
                  torch.tensor(last), cu_seqlens, max(lengths))


def packed_chunks(model, seqs: list[list[int]], chunk_tokens: int, chunk_size: int = 0):
    """seqs -> the step's chunks on the model's device: [(Packed, rows (n,)), ...], chunk i
    packing the sequences `rows` into at most chunk_tokens tokens (make_chunks, pack)."""
    device = next(model.parameters()).device
    width = row_width(model, seqs)
    return [(pack([seqs[i] for i in c], width).to(device), torch.tensor(c).to(device))
            for c in make_chunks([len(s) for s in seqs], chunk_tokens, chunk_size, width)]


def embed_packed(backbone, packed: Packed, unit: bool = True) -> torch.Tensor:
    """A packed chunk -> (n, D) fp32 states at each sequence's EOS (last_token_pool)."""
    varlen = {}
    if packed.cu_seqlens is not None:  # passed down to every layer: no layer syncs the host
        varlen = dict(cu_seq_lens_q=packed.cu_seqlens, cu_seq_lens_k=packed.cu_seqlens,
                      max_length_q=packed.longest, max_length_k=packed.longest)
    hidden = backbone(input_ids=packed.input_ids, position_ids=packed.position_ids,
                      use_cache=False, **varlen).last_hidden_state  # (R, W, D)
    return last_token_pool(hidden, packed.last, unit)


@torch.no_grad()
def encode(backbone, tokenizer, texts: list[str], batch_size: int = 32, max_length: int = 8192,
           device=None, chunk_tokens: int = 16384) -> torch.Tensor:
    """Texts -> (n, D) fp32 unit vectors, in the input order. Texts are packed, longest
    first, into chunks of at most batch_size texts and chunk_tokens tokens."""
    ids, _ = tokenize(tokenizer, texts, max_length)
    return encode_ids(backbone, ids, batch_size, device, chunk_tokens)


@torch.no_grad()
def encode_ids(backbone, ids: list[list[int]], batch_size: int = 0, device=None,
               chunk_tokens: int = 16384) -> torch.Tensor:
    """Id lists (each ending in EOS) -> (n, D) fp32 unit vectors, in the input order, in packed
    chunks of at most chunk_tokens tokens and batch_size sequences (0 = any)."""
    device = device or next(backbone.parameters()).device
    out = torch.empty(len(ids), backbone.config.hidden_size)
    if not ids:
        return out
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
    """Write a checkpoint folder that every tool loads the F2LLM way (docs/design.md I6).

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
