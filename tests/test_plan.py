"""The real sizes on a CPU: parameter counts and dims from the architectures written in
model.py (meta device), the memory plan checked against real tensors on a small config,
and the fp32-master numerics."""
import json

import pytest
import torch
from conftest import launch
from transformers import AutoModel

import data as D
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
    assert r["parameters"] == plan.PUBLISHED[size]["params"] and r["world"] == 8
    # the released set's sizes per source are unknown offline: at most one filled batch more per
    # source (62) per epoch than the rows' 11,474
    assert (r["steps_per_epoch_fewest"], r["steps_per_epoch"], r["steps"]) == (11_474, 11_537,
                                                                               23_074)
    assert r["tokens_per_chunk"] == train.PRESET_CHUNK_TOKENS[size]
    assert r["tokens_per_chunk_from"] == "planned"
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
    gives its config.json, a hub id its Qwen3 size; a name the plan cannot size is refused.
    At the preset's budget the plan with a 4B teacher does not fit; without --chunk-tokens the
    dry run plans the largest budget that does, as the run would."""
    base = ["--size", "1.7b", "--dry-run", "--nproc", "8", "--json"]
    train.main(base)
    alone = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    train.main(base + ["--teacher", "Qwen/Qwen3-Embedding-4B"])
    planned = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert planned["fits"] and planned["tokens_per_chunk_from"] == "planned"
    assert planned["tokens_per_chunk"] == 11776 < alone["tokens_per_chunk"]
    train.main(base + ["--teacher", "Qwen/Qwen3-Embedding-4B", "--chunk-tokens",
                       str(alone["tokens_per_chunk"])])
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
    assert "batch 512 queries/step = 32 per rank" in out and "at most 23,074 steps in total" in out
    assert "ESTIMATE at 30% MFU" in out and ": fits" in out and "margin left" in out


@pytest.mark.slow  # the whole demo sample
def test_the_planned_steps_are_the_batches_the_loader_draws(capsys, tmp_path, demo_dir,
                                                           small_demo_dir):
    """plan.steps_per_epoch == what a real data.BatchStream plans per epoch over the same
    sources (each source's last partial batch filled: up to one step more per source than
    rows // batch), at batch sizes below, near and above a source's rows. The tiny preset's
    dry run (no weights) counts its run's data folder, OUT/data, and plans the 325 steps the
    run takes, where rows // batch gave 323."""
    sources = D.load_sources(small_demo_dir, seed=0, val_fraction=0.02)
    rows = [len(s.train_rows) for s in sources]
    for batch in (7, 32, 146, 147, 1000):
        stream = D.BatchStream(sources, batch, seed=0, sampling="remaining")
        assert plan.steps_per_epoch(rows, batch) == stream.batches_per_epoch == len(stream.plan)
    assert plan.steps_per_epoch(rows, 32) > sum(rows) // 32
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "data").symlink_to(demo_dir)  # what `--size tiny` writes there
    train.main(["--size", "tiny", "--dry-run", "--json", "--out", str(tmp_path / "run")])
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cfg = train.parse_config(["--size", "tiny"])
    sources = D.load_sources(demo_dir, cfg.seed, cfg.val_fraction)
    run = D.BatchStream(sources, cfg.batch_size, cfg.seed, cfg.source_sampling)
    assert r["steps"] == r["steps_per_epoch"] == run.batches_per_epoch == 325
    assert r["steps_counted_from"] == "data"
    assert sum(len(s.train_rows) for s in sources) // cfg.batch_size == 323  # the old count


@pytest.mark.slow  # torchrun processes
def test_the_plan_holds_the_fullest_rank_of_a_real_zero_partition(tmp_path):
    """3 gloo ranks, a tiny Qwen3 whose embedding is its largest tensor (as in every preset):
    the bytes of AdamW state each rank holds after one ZeroRedundancyOptimizer step are
    8 x plan.zero_shards(...) rank by rank, the fullest well above the average 8P / world,
    and memory_plan's adamw_states is the fullest rank's."""
    config = plan.config_like(plan.qwen3_config("0.6b"), 2)
    for k, v in dict(SMALL, hidden_size=64, intermediate_size=128, head_dim=16,
                     vocab_size=4000).items():
        setattr(config, k, v)
    config.to_json_file(tmp_path / "config.json")
    launch("tests/zero_worker.py", tmp_path / "config.json", tmp_path / "held", nproc=3)
    held = [json.loads((tmp_path / f"held.rank{r}.json").read_text()) for r in range(3)]
    sizes = plan.trained_sizes(config)
    assert held == [8 * n for n in plan.zero_shards(sizes, 3)]
    assert max(held) > 1.5 * 8 * sum(sizes) / 3  # the embedding: whole, on one rank
    assert plan.memory_plan(config, 3, 256, 9)["adamw_states"] == max(held)


def test_a_run_plans_its_token_budget_and_refuses_one_that_cannot_fit():
    """train.planned_budget, what a CUDA run calls with its card's memory before any weights
    load: 1.7b on 8 GPUs with a 4B teacher does not fit the preset's budget on an 80 GB card,
    so the run takes the largest that fits (the dry run's); a --chunk-tokens above it is
    refused naming it; without a teacher the preset stays, and a larger card keeps it too."""
    cfg = lambda *flags: train.parse_config(["--size", "1.7b", *flags])
    teacher = ("--teacher", "Qwen/Qwen3-4B")
    tokens, note = train.planned_budget(cfg(*teacher), 8, plan.CARD_BYTES, 7)
    config = plan.qwen3_config("1.7b")
    assert tokens == plan.chunk_tokens_that_fit(config, 8, 576, teacher=plan.qwen3_config("4b"))
    assert tokens < train.PRESET_CHUNK_TOKENS["1.7b"] and "the largest whose plan fits" in note
    with pytest.raises(SystemExit, match=f"--chunk-tokens 14080 does not fit .* --chunk-tokens "
                                         f"{tokens} fits"):
        train.planned_budget(cfg(*teacher, "--chunk-tokens", "14080"), 8, plan.CARD_BYTES, 7)
    assert train.planned_budget(cfg(*teacher, "--chunk-tokens", str(tokens)), 8,
                                plan.CARD_BYTES, 7)[0] == tokens
    assert train.planned_budget(cfg(), 8, plan.CARD_BYTES, 7)[0] == 14080
    assert train.planned_budget(cfg(), 8, int(139 * 2**30), 7)[0] == 14080
    fewer = train.planned_budget(cfg(), 2, plan.CARD_BYTES, 7)[0]  # 256 queries per GPU
    assert fewer < 14080
    with pytest.raises(SystemExit, match="does not fit the card at any --chunk-tokens"):
        train.planned_budget(train.parse_config(["--size", "4b"]), 1, plan.CARD_BYTES, 7)


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
