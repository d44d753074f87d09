"""The real sizes on a CPU: parameter counts and dims from the architectures written in
model.py (meta device), the memory plan checked against real tensors on a small config,
and the fp32-master numerics."""
import json

import pytest
import torch
from transformers import AutoModel

import model as M
import train
from tools import plan


@pytest.mark.parametrize("size", ["0.6b", "1.7b", "4b"])
def test_parameter_counts_and_dims_match_the_published_models(size):
    config = plan.qwen3_config(size)
    assert plan.parameter_counts(config)["all"] == plan.PUBLISHED[size]["params"]
    assert config.hidden_size == plan.PUBLISHED[size]["dim"]


SMALL = dict(hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2,
             head_dim=64, vocab_size=1000, bos_token_id=0, eos_token_id=1)


def test_memory_plan_matches_what_a_real_cpu_step_keeps():
    """Static terms = bytes of real fp32 weights, gradients and AdamW states after a real step.
    The per-token activation terms (measured on 1- and 2-layer models with 24 tokens and the
    varlen kernel's saved set, then scaled) plus autocast's weight copies = what autograd saves
    in a real bf16 autocast forward of a 2048-token row on a real 4-layer model with sdpa, each
    storage once (views share it), weights left out: within 1% (the gap is the token ids,
    16 kB). Saved tensors, not the RSS, so neither the CPU's kernels nor its allocator (AMD
    or Intel AMX alike) move the figure."""
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
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    assert p["weights_fp32"] == nbytes(real.parameters())
    assert p["gradients_fp32"] == nbytes(p_.grad for p_ in real.parameters())
    assert p["adamw_states"] == nbytes(v for s in opt.state.values()
                                       for k, v in s.items() if k != "step")
    assert p["embedding_grad"] == nbytes([real.embed_tokens.weight])
    weights = {w.untyped_storage().data_ptr() for w in real.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        real(input_ids=torch.randint(0, 1000, (1, tokens)), use_cache=False)
    planned = p["activations_bf16"] + p["activations_fp32"] + p["bf16_weight_copies"]
    saved = sum(kept.values())
    assert abs(planned - saved) <= 0.01 * saved, (planned, saved)
    assert "CPU" in plan.MEASURED_ON and torch.__version__ in plan.MEASURED_ON


def test_activations_are_planned_without_a_kv_repeat():
    """The plan's attention keeps k and v with their H_kv heads, as the varlen kernel does (it
    takes grouped heads; torch 2.11's repeat before it is gone). Going from H_kv = 2 to 1
    (H = 8) must save, per token and layer, 3 bf16 tensors of d fewer: k's normed copy and the
    kernel's k and v. With k and v repeated to H heads before the kernel, only the first would
    change."""
    config = plan.config_like(plan.qwen3_config("0.6b"), 2)
    for k, v in dict(SMALL, num_attention_heads=8).items():
        setattr(config, k, v)
    fewer = plan.config_like(config, 2)
    fewer.num_key_value_heads = 1
    bf16, _ = plan.activation_bytes_per_token(config)
    bf16_fewer, _ = plan.activation_bytes_per_token(fewer)
    layers, d, bf16_bytes = 2, 64, 2
    assert bf16 - bf16_fewer == pytest.approx(layers * 3 * d * bf16_bytes, rel=0.01)


@pytest.mark.parametrize("size, most_chunks", [("0.6b", 12), ("1.7b", 16), ("4b", 32)])
def test_dry_run_json_fits_80gb_in_few_chunks(capsys, size, most_chunks):
    """The paper's per-GPU batch (512 on 8 GPUs: 64 queries, 576 sequences) in at most
    12 / 16 / 32 packed chunks at the preset's token budget, within the plan's 72 GiB of an
    80 GB GPU, the reserve for the CUDA context and NCCL included; the margin is printed."""
    train.main(["--size", size, "--dry-run", "--nproc", "8", "--json"])
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"size", "parameters", "world", "steps", "chunks_per_step", "tokens_per_chunk",
            "memory_gib", "margin_gib", "activations_measured_on"} <= set(r)
    assert r["parameters"] == plan.PUBLISHED[size]["params"] and r["world"] == 8 and r["steps"] == 22_946
    assert r["tokens_per_chunk"] == train.PRESET_CHUNK_TOKENS[size]
    assert r["chunks_per_step"] <= most_chunks
    gib = r["memory_gib"]
    assert gib["total"] == pytest.approx(sum(v for k, v in gib.items() if k != "total"))
    assert gib["cuda_context_nccl"] == 3.5 and gib["gradients_fp32"] == gib["weights_fp32"]
    assert gib["total"] <= 72 and r["fits"]
    assert r["margin_gib"] == pytest.approx(79.65 - gib["total"]) and r["margin_gib"] >= 7.65
    # the preset is the largest budget the plan allows
    config = plan.qwen3_config(size)
    assert train.PRESET_CHUNK_TOKENS[size] == plan.chunk_tokens_that_fit(config, 8, 576)
    assert plan.memory_plan(config, 8, r["tokens_per_chunk"] + 256, 576)["total"] > 72 * 2**30


def test_dry_run_plans_a_teacher_from_its_folder_or_its_name(capsys, tmp_path):
    """--teacher adds its bf16 weights, one chunk of its no-grad forward and its reps; a folder
    gives its config.json, a hub id its Qwen3 size; a name the plan cannot size is refused."""
    base = ["--size", "1.7b", "--dry-run", "--nproc", "8", "--json"]
    train.main(base)
    alone = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    train.main(base + ["--teacher", "Qwen/Qwen3-Embedding-4B"])
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["teacher"]["parameters"] == plan.PUBLISHED["4b"]["params"]
    teacher_bf16 = 2 * r["teacher"]["parameters"] / 2**30
    assert r["memory_gib"]["teacher_weights"] == pytest.approx(teacher_bf16)
    assert r["memory_gib"]["total"] == pytest.approx(alone["memory_gib"]["total"] + sum(
        r["memory_gib"][k] for k in ("teacher_weights", "teacher_activations", "teacher_reps")))
    assert not r["fits"] and r["margin_gib"] < alone["margin_gib"]
    plan.qwen3_config("0.6b").save_pretrained(tmp_path / "teacher")
    train.main(base + ["--teacher", str(tmp_path / "teacher")])
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["teacher"]["parameters"] == plan.PUBLISHED["0.6b"]["params"]
    assert r["teacher"]["dim"] == 1024
    with pytest.raises(SystemExit, match="--teacher someone/my-model: not a local folder"):
        train.main(base + ["--teacher", "someone/my-model"])


def test_dry_run_text_names_the_estimate(capsys):
    train.main(["--size", "4b", "--dry-run", "--nproc", "8", "--nodes", "2"])
    out = capsys.readouterr().out
    assert "4,022,468,096 parameters" in out and "embedding dim 2560" in out
    assert "batch 512 queries/step = 32 per rank" in out and "22,946 steps in total" in out
    assert "ESTIMATE at 30% MFU" in out and ": fits" in out and "margin left" in out


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
