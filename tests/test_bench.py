"""bench/step.py measures what it claims: its baselines (the official padded step, the count-chunk
step) compute the same loss and gradients as train.cached_step, the pairs-only loss is
sentence-transformers' CachedMultipleNegativesRankingLoss, and the cast counter counts."""
from types import SimpleNamespace

import pytest
from tolerance import assert_same_grads, assert_same_sums

import model as M
from bench import step as bench
from runtime import attention as A

pytestmark = pytest.mark.slow  # torchrun / real processes / mteb / sentence-transformers

MAX_LENGTH = 64  # short texts keep the tests fast


@pytest.fixture()
def batch(tokenizer):
    """A retrieval batch of 4 queries, k = 7, texts cut from BBC News to the length mix."""
    pool = bench.text_pool(tokenizer, n_articles=60)
    return bench.make_batch(pool, tokenizer, 4, 7, MAX_LENGTH, seed=0)


def _grads_of(net, step):
    m = step()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)
    return m, grads


def test_baselines_compute_our_loss_and_gradients(tokenizer, batch, attn):
    """The official step (one padded forward, activation checkpointing) and the count-chunk
    step are the same math as ours; they only compute more tokens. On sdpa rows, and on the
    CUDA layout (varlen rows forced on this CPU), where the baselines' padded forwards run as
    sdpa on the same backbone."""
    backbone = M.tiny_backbone(tokenizer, seed=0, attn=attn)
    seqs, loss_fn = bench.tokenized(batch, tokenizer, MAX_LENGTH)
    assert len(seqs) == 4 * 9
    official = bench.checkpointed(backbone)
    assert all(layer.gradient_checkpointing for layer in official.layers)
    ours, grads = _grads_of(backbone, lambda: bench.ours_step(backbone, seqs, loss_fn, 200))
    count, count_grads = _grads_of(backbone,
                                   lambda: bench.count_chunk_step(backbone, seqs, loss_fn, 3, 0))
    base, base_grads = _grads_of(official, lambda: bench.official_step(official, seqs, loss_fn, 0))
    assert ours["chunks"] > 1 and count["chunks"] == 12
    for name, m, g in (("official", base, base_grads), ("count chunks", count, count_grads)):
        assert_same_sums(m["loss"], ours["loss"], f"{name} loss vs ours")
        assert_same_grads(g, grads, f"{name} vs ours")
    real = sum(len(s) for s in seqs)
    assert ours["real_tokens"] == base["real_tokens"] == count["real_tokens"] == real
    assert base["computed_tokens"] == len(seqs) * max(len(s) for s in seqs)
    assert real <= ours["computed_tokens"] < base["computed_tokens"]
    assert (ours["computed_tokens"] == real) == (attn == A.VARLEN)  # varlen rows: no padding
    assert real <= count["computed_tokens"] < base["computed_tokens"]


def test_weight_casts_counts_one_per_pass_for_ours_and_per_chunk_before(backbone, tokenizer, batch):
    seqs, loss_fn = bench.tokenized(batch, tokenizer, MAX_LENGTH)
    ours = bench.weight_casts(backbone, lambda: bench.ours_step(backbone, seqs, loss_fn, 200,
                                                                bf16=True))
    assert ours == 2
    count = bench.weight_casts(backbone, lambda: bench.count_chunk_step(backbone, seqs, loss_fn, 6, 0, bf16=True))
    assert count == 2 * 6  # two passes of 36 / 6 chunks, a cast per chunk
    # the work counter: 6 padded chunks per pass dispatch more ops than one packed chunk, and
    # the FLOPs count every token computed (a step's matmuls: over 6 x weights x tokens)
    ours = bench.work(backbone, lambda: bench.ours_step(backbone, seqs, loss_fn, 10**4))
    count = bench.work(backbone, lambda: bench.count_chunk_step(backbone, seqs, loss_fn, 6, 0))
    assert count["aten_ops"] > 2 * ours["aten_ops"] > 0
    weights = sum(p.numel() for n, p in backbone.named_parameters() if "embed" not in n)
    real = sum(len(s) for s in seqs)
    assert ours["flops"] > 6 * weights * real  # + the forward of pass 1 and attention


def test_pairs_step_is_sentence_transformers_cached_mnrl_in_each_mode(backbone, tokenizer, batch,
                                                                      tmp_path):
    """Comparison 5 compares like with like: our step with k = 0 (in-batch loss only) gives the
    loss and the gradients of CachedMultipleNegativesRankingLoss(scale=20) on the export of the
    same weights, in its count mode and its token-budget mode, whose mini-batches hold at most
    the budget's real tokens (a longer sequence alone)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss
    pairs = bench.Texts(batch.queries, batch.positives, [[] for _ in batch.queries])
    M.save_export(backbone, tokenizer, str(tmp_path / "export"), max_length=MAX_LENGTH)
    seqs, loss_fn = bench.tokenized(pairs, tokenizer, MAX_LENGTH)
    ours, grads = _grads_of(backbone, lambda: bench.ours_step(backbone, seqs, loss_fn, 100))
    st = SentenceTransformer(str(tmp_path / "export"), device="cpu").train()
    net = st[0].auto_model
    seen = []  # (rows, real tokens) of each forward ST runs
    st[0].register_forward_pre_hook(lambda module, args: seen.append(
        (len(args[0]["attention_mask"]), int(args[0]["attention_mask"].sum()))))
    args = SimpleNamespace(chunk_size=3, chunk_tokens=150)
    for mode in bench.ST_MODES:
        st_loss = CachedMultipleNegativesRankingLoss(st, scale=20.0, **bench.ST_MODES[mode](args))
        seen.clear()
        theirs = st_loss([st.preprocess(pairs.queries), st.preprocess(pairs.positives)], None)
        theirs.backward()
        assert_same_sums(theirs.item(), ours["loss"], f"CachedMNRL {mode} mode vs ours")
        assert_same_grads({n: p.grad for n, p in net.named_parameters()}, grads, mode)
        net.zero_grad(set_to_none=True)
        passes = seen[:len(seen) // 2]  # pass 1; pass 2 replays the same mini-batches
        assert seen[len(passes):] == passes and sum(rows for rows, _ in passes) == 8
        if mode == "count":
            assert [rows for rows, _ in passes] == [3, 1, 3, 1]
        else:
            assert all(tokens <= 150 or rows == 1 for rows, tokens in passes), passes
            assert any(rows > 1 for rows, _ in passes), passes  # cut by tokens, not by 3s


def test_goals_read_the_measurements():
    """Each goal's `met` follows its value: a change in a measurement moves the verdict."""
    spread = lambda x: dict(median=x, min=x, max=x, n=1)
    r = dict(steps=dict(speedup=dict(ours=spread(5.0)),
                        tokens_per_s=dict(ours=spread(2.0), count=spread(1.0)),
                        weight_casts_per_step=dict(ours=2)),
             sentence_transformers=dict(time_ratio=spread(0.9), loss_ours=1.0, loss_st=1.0),
             memory_growth=dict(ours=1.1), paper_batch_efficiency=dict(rows=spread(0.99)),
             encode=dict(speedup=spread(1.2)))
    assert all(g["met"] for g in bench.goals(r).values())
    r["steps"]["speedup"]["ours"] = spread(3.0)
    r["sentence_transformers"]["loss_ours"] = 1.001
    missed = {n for n, g in bench.goals(r).items() if not g["met"]}
    assert missed == {"speedup_vs_official", "loss_diff_vs_st"}


def test_the_table_prints_the_goals_it_is_given():
    """The table's goal column and verdicts come from `goals`: a goal exists in one place."""
    spread = lambda x: dict(median=x, min=x, max=x, n=1)
    r = dict(steps=dict(speedup=dict(ours=spread(3.0), count=spread(2.0)),
                        tokens_per_s=dict(ours=spread(2.0), count=spread(1.0)),
                        weight_casts_per_step=dict(ours=2, count=12),
                        work=dict(ours=dict(flops=100, aten_ops=10),
                                  count=dict(flops=103, aten_ops=59))),
             sentence_transformers=dict(time_ratio=spread(0.9), loss_ours=1.0, loss_st=1.0,
                                        best="tokens", flattened="ImportError: no flash-attn",
                                        modes=dict(count=dict(time_ratio=spread(0.6), loss=1.0),
                                                   tokens=dict(time_ratio=spread(0.9),
                                                               loss=1.0))),
             memory_growth=dict(ours=1.1, count=1.5, official=3.0),
             paper_batch_efficiency={n: spread(0.9) for n in ("rows", "varlen", "count",
                                                             "official")},
             encode=dict(speedup=spread(1.2)))
    r["goals"] = bench.goals(r)
    rows = {measure.strip(): (goal, met) for measure, _, goal, met in bench.table(r)}
    assert rows["1. step throughput, ours / official"] == (">= 4", False)
    assert rows["2. padding efficiency, paper batch: packed rows"] == (">= 0.98", False)
    assert rows["5. vs ST CachedMNRL, best mode: loss ours - ST"] == ("abs <= 1e-5", True)
    assert rows["step time ours / ST tokens mode"] == ("<= 1.0", True)  # the best mode's
    assert rows["ours / ST count mode (loss diff)"] == ("", None)  # each mode, no goal
    assert rows["count chunks | official"] == ("", None)  # a measure without a goal
    values = {measure.strip(): value for measure, value, _, _ in bench.table(r)}
    assert values["work per step, count / ours: FLOPs | aten ops"] == "1.03x | 5.90x"
    shown = {goal for goal, met in rows.values() if met is not None}
    assert shown == {g["goal"] for n, g in r["goals"].items() if n != "speedup_vs_count_chunks"}
