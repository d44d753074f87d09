"""The real sizes on a CPU: parameter counts and dims from the architectures written in
model.py (meta device), the memory plan checked against real tensors on a small config,
and the fp32-master numerics."""
import contextlib

import pytest
import torch

import model as M
import train


@pytest.mark.parametrize("size", ["0.6b", "1.7b", "4b"])
def test_parameter_counts_and_dims_match_the_published_models(size):
    config = M.qwen3_config(size)
    backbone = M.meta_backbone(config)
    assert sum(p.numel() for p in backbone.parameters()) == M.PRESETS[size]["params"]
    assert config.hidden_size == M.PRESETS[size]["dim"]


def test_memory_plan_matches_real_tensors_on_a_small_config():
    """Static terms = bytes of real fp32 weights, gradients and AdamW states after a real
    step; activations (1-/2-layer meta extrapolation) = bytes autograd really saves in a
    CPU forward of the full small model."""
    config = M.qwen3_config_like(M.qwen3_config("0.6b"), 3)
    config.hidden_size, config.intermediate_size, config.num_attention_heads = 128, 384, 4
    config.num_key_value_heads, config.head_dim, config.vocab_size = 2, 32, 1000
    chunk, length = 3, 40
    plan = M.memory_plan(config, world=1, chunk_size=chunk, max_length=length, sequences_per_rank=10)
    torch.manual_seed(0)
    real = M.AutoModel.from_config(config, attn_implementation="eager", dtype=torch.float32)
    opt = torch.optim.AdamW(real.parameters(), lr=1e-3)
    real(input_ids=torch.randint(0, 1000, (2, 8))).last_hidden_state.sum().backward()
    opt.step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    assert plan["weights_fp32"] == nbytes(real.parameters())
    assert plan["gradients_fp32"] == nbytes(p.grad for p in real.parameters())
    assert plan["adamw_states"] == nbytes(v for s in opt.state.values() for k, v in s.items() if k != "step")
    assert plan["bf16_weight_copies"] == nbytes(real.parameters()) // 2
    real_bf16 = real.to(torch.bfloat16)
    measured = M.saved_activation_bytes(real_bf16, chunk, length, device="cpu", drop_scores=True)
    assert plan["activations_one_chunk"] == measured


@pytest.mark.parametrize("nproc, nodes", [(8, 1), (8, 2)])
def test_dry_run_plans_4b_within_80gb(capsys, nproc, nodes):
    train.main(["--size", "4b", "--dry-run", "--nproc", str(nproc), "--nodes", str(nodes)])
    out = capsys.readouterr().out
    assert "4,022,468,096 parameters" in out and "embedding dim 2560" in out
    assert f"batch 512 queries/step = {512 // (nproc * nodes)} per rank" in out
    assert "22,946 steps in total" in out and ": fits" in out


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
    texts = ["Shares in the company rose after profits beat forecasts.", "The match ended in a draw."]
    seqs, _ = M.tokenize(tokenizer, texts, 64)
    ids, lengths = M.pad(seqs, tokenizer.pad_token_id)
    with torch.no_grad():
        fp32 = M.embed(backbone, ids, lengths)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = M.embed(backbone, ids, lengths)
    assert bf16.dtype == torch.float32  # pooled reps always leave in fp32
    assert ((bf16 - fp32).norm(dim=-1) / fp32.norm(dim=-1)).max() < 1e-2
    assert not torch.equal(bf16, fp32)  # autocast really ran in bf16


def test_gpu_check_runs_its_code_path_on_cpu(tmp_path):
    """gpu_check.py can only be timed on a GPU; its code path (random-weight Qwen3 shapes,
    the length mix, the cached step, the plan beside it) runs here with tiny shapes."""
    import gpu_check
    lengths = gpu_check.length_mix(32, 7, 1024, torch.Generator().manual_seed(0))
    assert len(lengths) == 32 * 9 and all(20 <= n <= 300 for n in lengths[:32])
    assert all(32 <= n <= 1024 for n in lengths[32:]) and max(lengths[32:]) > 600
    results = gpu_check.main(["--cpu-smoke", "--out", str(tmp_path / "g.json")])
    assert [r["name"].split(",")[0] for r in results] == ["0.6b-shaped", "4b-shaped"]
    for r in results:
        assert r["real_tokens"] > 0 and 0 < r["padding_efficiency"] <= 1 and r["plan_bytes"] > 0
