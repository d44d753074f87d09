"""tools/gpu_check.py can only be timed on a GPU; its code path runs here with tiny shapes (the CUDA
attention layout forced on a CPU, DDP in a 1-process gloo group) and must compute what the
training loop computes. Its skip rule is checked at the real sizes, without weights."""
import contextlib
import json

import numpy as np
import pytest
import torch
from tolerance import assert_same_sums

import model as M
import train
from runtime import attention as A
from tools import gpu_check, plan

pytestmark = pytest.mark.slow  # two sizes of the smoke run, a few seconds each


def test_cpu_smoke_runs_the_loop_step_on_varlen_rows_inside_ddp(tmp_path):
    """Each size's first step (one varlen row per chunk, inside DDP, train.optimizer_step)
    gives the loss and gradient norm of train.cached_step on an sdpa model without DDP; the
    chunks are the varlen plan's; packed and padded embeddings agree to 1e-5; the time split
    adds up to the step; the count-chunk step ran on the varlen backbone (its padded forward
    as sdpa), which crashed before."""
    results = gpu_check.main(["--cpu-smoke", "--sizes", "0.6b,4b", "--out",
                              str(tmp_path / "g.json")])
    assert [r["size"] for r in results] == ["0.6b", "4b"]  # 1.7b runs the 0.6b code path
    b, k, max_length, chunk_tokens = 4, 7, 64, 256
    for r in results:
        assert r["attention"] == A.VARLEN and "F2LLM_FORCE_VARLEN" in r["kernel"]
        config = gpu_check.smoke_config(plan.qwen3_config(r["size"]))
        seqs, loss_fn = gpu_check.batch_of(config, b, k, max_length, seed=0)
        reference = gpu_check.build(config, torch.device("cpu"), "sdpa")
        chunks = M.packed_chunks(reference, seqs, chunk_tokens)
        losses = train.cached_step(reference, chunks, loss_fn, contextlib.nullcontext())
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0).item()
        assert_same_sums(r["losses"][0], losses[0].item(), f"{r['size']} loss")
        assert_same_sums(r["grad_norms"][0], norm, f"{r['size']} gradient norm")
        step_1 = plan.length_mix(np.random.default_rng(1), b, k, max_length)
        assert r["chunks_per_step"] == len(M.make_chunks(step_1, chunk_tokens)) > 1
        assert r["packed_vs_padded_max_abs"] < 1e-5  # fp32 on a CPU
        assert sum(r["time_split_s"].values()) == pytest.approx(r["s_per_step"], rel=1e-6)
        assert ("old_step" in r) == (r["size"] != "4b")
    old = results[0]["old_step"]
    assert old["chunks"] == -(-b * (2 + k) // 16) and np.isfinite(old["loss"])
    assert json.loads((tmp_path / "g.json").read_text())["results"][0]["size"] == "0.6b"


def test_a_size_that_cannot_fit_the_gpu_is_skipped_with_the_reason():
    """One process holds the whole AdamW state (a rank of 8 holds an eighth): 4b at full depth
    does not fit an 80 GB card that way; every size fits a 139 GiB H200 at full depth."""
    sequences = 64 * 9
    for size in ("0.6b", "1.7b", "4b"):
        config, tokens = plan.qwen3_config(size), train.PRESET_CHUNK_TOKENS[size]
        assert gpu_check.why_not(size, config, tokens, sequences, 139 * 2**30) is None, size
    config = plan.qwen3_config("4b")
    reason = gpu_check.why_not("4b", config, train.PRESET_CHUNK_TOKENS["4b"], sequences,
                               gpu_check.CARD_80GB)
    assert reason and "AdamW states unsharded" in reason and "--layers" in reason
