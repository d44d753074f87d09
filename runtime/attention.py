"""The attention of packed chunks: which kernel runs, and its registration with transformers.

A packed chunk (model.pack) lays several sequences end to end; attention must stay inside each
sequence (docs/design.md §4):
- "f2llm_varlen" (CUDA, bf16): ONE row per chunk, cumulative lengths passed down as kwargs,
  so no layer syncs the host. Kernel: flash-attn's varlen function when installed, else
  torch's own torch.nn.attention.varlen.varlen_attn (torch >= 2.10, e.g. 2.11 images).
- "sdpa" (CPU, tests, CUDA in fp32 or without either kernel): several packed rows per chunk;
  transformers sees position ids restart and builds a block-diagonal causal mask per row.
F2LLM_FORCE_VARLEN=1 runs "f2llm_varlen" on a CPU too, one sdpa per sequence standing in for
the kernel: the CUDA layout and code path, checked against sdpa rows by the tests.

`setup_attention(device, bf16)` chooses and registers it, once; `padded_attention(backbone)`
lets a padded forward (the tests' reference) run on a varlen backbone. Importing this file
registers nothing.
"""
import contextlib
import functools
import importlib.util
import inspect
import os

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from model import VARLEN  # the name model.py packs for: one row per chunk

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
    like VARLEN (docs/design.md §8), so a VARLEN backbone runs it as sdpa: the same weights
    and math."""
    config = backbone.config
    attn = config._attn_implementation
    if attn == VARLEN:
        config._attn_implementation = "sdpa"
    try:
        yield
    finally:
        config._attn_implementation = attn
