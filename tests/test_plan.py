"""The real sizes on a CPU: parameter counts and dims from the architectures written in
model.py (meta device), the memory plan checked against real tensors on a small config,
and the fp32-master numerics."""
import json

import pytest
import torch
from transformers import AutoModel

import model as M
import plan
import train


@pytest.mark.parametrize("size", ["0.6b", "1.7b", "4b"])
def test_parameter_counts_and_dims_match_the_published_models(size):
    config = plan.qwen3_config(size)
    assert plan.parameter_counts(config)["all"] == plan.PUBLISHED[size]["params"]
    assert config.hidden_size == plan.PUBLISHED[size]["dim"]


SMALL = dict(hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2,
             head_dim=64, vocab_size=1000, bos_token_id=0, eos_token_id=1)
PROBE = """
import gc, json, sys, torch
sys.path.insert(0, {root!r})
import plan
from transformers import AutoModel
config = plan.config_like(plan.qwen3_config("0.6b"), 4)
for k, v in {small!r}.items():
    setattr(config, k, v)
torch.manual_seed(0)
net = AutoModel.from_config(config, attn_implementation="sdpa").train()
ids = torch.randint(0, 1000, (1, {tokens}))
def rss():
    gc.collect()
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))
before = rss()
with torch.autocast("cpu", dtype=torch.bfloat16):
    out = net(input_ids=ids, use_cache=False).last_hidden_state
kept = rss() - before
print(json.dumps(dict(kept=kept)))
"""


@pytest.mark.slow
def test_memory_plan_matches_what_a_real_cpu_step_keeps():
    """Static terms = bytes of real fp32 weights, gradients and AdamW states after a real step;
    the per-token activation terms plus autocast's weight copies = the memory a real bf16
    autocast forward of a 2048-token packed chunk keeps for backward (the process's RSS rise,
    with glibc returning freed blocks), within 10%, on a 4-layer model of width 256."""
    import json
    import os
    import subprocess
    import sys
    config = plan.config_like(plan.qwen3_config("0.6b"), 4)
    for k, v in SMALL.items():
        setattr(config, k, v)
    tokens = 2048
    p = plan.memory_plan(config, world=1, chunk_tokens=tokens, sequences_per_rank=10,
                         shard_optimizer=False)
    torch.manual_seed(0)
    real = AutoModel.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    opt = torch.optim.AdamW(real.parameters(), lr=1e-3)
    real(input_ids=torch.randint(0, 1000, (2, 8))).last_hidden_state.sum().backward()
    opt.step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    assert p["weights_fp32"] == nbytes(real.parameters())
    assert p["gradients_fp32"] == nbytes(p_.grad for p_ in real.parameters())
    assert p["adamw_states"] == nbytes(v for s in opt.state.values()
                                       for k, v in s.items() if k != "step")
    assert p["embedding_grad"] == nbytes([real.embed_tokens.weight])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    probe = subprocess.run([sys.executable, "-c",
                            PROBE.format(root=root, small=SMALL, tokens=tokens)],
                           env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536",
                                "OMP_NUM_THREADS": "1"},
                           capture_output=True, text=True, check=True)
    kept = json.loads(probe.stdout.strip().splitlines()[-1])["kept"]
    planned = p["activations_bf16"] + p["activations_fp32"] + p["bf16_weight_copies"]
    assert abs(planned - kept) <= 0.10 * kept, (planned, kept)


@pytest.mark.parametrize("size, most_chunks", [("0.6b", 12), ("1.7b", 16), ("4b", 24)])
def test_dry_run_json_fits_80gb_in_few_chunks(capsys, size, most_chunks):
    """The paper's per-GPU batch (512 on 8 GPUs: 64 queries, 576 sequences) in at most
    12 / 16 / 24 packed chunks at the preset's token budget, within 76 GiB of an 80 GB GPU."""
    train.main(["--size", size, "--dry-run", "--nproc", "8", "--json"])
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"size", "parameters", "world", "steps", "chunks_per_step", "tokens_per_chunk",
            "memory_gib"} <= set(r)
    assert r["parameters"] == plan.PUBLISHED[size]["params"] and r["world"] == 8 and r["steps"] == 22_946
    assert r["tokens_per_chunk"] == train.PRESETS[size]["chunk_tokens"]
    assert r["chunks_per_step"] <= most_chunks
    assert r["memory_gib"]["total"] == pytest.approx(sum(v for k, v in r["memory_gib"].items() if k != "total"))
    assert r["memory_gib"]["total"] <= 76
    # the preset is the largest budget the plan allows
    config = plan.qwen3_config(size)
    assert train.PRESETS[size]["chunk_tokens"] == plan.chunk_tokens_that_fit(config, 8, 576)


def test_dry_run_text_names_the_estimate(capsys):
    train.main(["--size", "4b", "--dry-run", "--nproc", "8", "--nodes", "2"])
    out = capsys.readouterr().out
    assert "4,022,468,096 parameters" in out and "embedding dim 2560" in out
    assert "batch 512 queries/step = 32 per rank" in out and "22,946 steps in total" in out
    assert "ESTIMATE at 30% MFU" in out and ": fits" in out


def test_fp32_master_weights_keep_tiny_updates(backbone):
    """At lr 1e-7, AdamW's first update (~1e-7 per weight) changes fp32 weights and is lost
    to rounding in bf16 weights (bf16 resolves ~1e-3 relative)."""
    before = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    opt = torch.optim.AdamW(backbone.parameters(), lr=1e-7, weight_decay=0.0)
    ids = torch.randint(0, 1000, (2, 12))
    M.embed(backbone, ids, torch.tensor([12, 7])).sum().backward()
    opt.step()
    w, w0 = backbone.layers[0].mlp.up_proj.weight, before["layers.0.mlp.up_proj.weight"]
    assert (w != w0).float().mean() > 0.5  # fp32 master: most weights moved
    in_bf16 = (w0.to(torch.bfloat16) + (w - w0).to(torch.bfloat16)).float()
    assert (in_bf16 != w0.to(torch.bfloat16).float()).float().mean() < 0.01  # bf16: lost


def test_bf16_autocast_embeddings_close_to_fp32(tokenizer, backbone):
    texts = ["Shares in the company rose after profits beat forecasts.",
             "The match ended in a draw."]
    seqs, _ = M.tokenize(tokenizer, texts, 64)
    ids, lengths = M.pad(seqs, tokenizer.pad_token_id)
    with torch.no_grad():
        fp32 = M.embed(backbone, ids, lengths)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = M.embed(backbone, ids, lengths)
    assert bf16.dtype == torch.float32  # pooled reps always leave in fp32
    assert ((bf16 - fp32).norm(dim=-1) / fp32.norm(dim=-1)).max() < 1e-2
    assert not torch.equal(bf16, fp32)  # autocast really ran in bf16
