"""bench.py measures what it claims: the token-budget chunker and length-sorted chunks change
no gradient (I2), the baseline "official step" computes the same loss and gradients as ours,
and the pairs-only loss is sentence-transformers' CachedMultipleNegativesRankingLoss."""
import pytest
import torch

import bench
import data as D
import model as M
import train

CFG = train.Config(chunk_size=3, max_length=64)  # short texts keep the tests fast


def _batch(demo_dir, task_type, size=4):
    stream = D.BatchStream(D.load_sources(demo_dir), size, seed=0)
    return next(b for b in stream if b.task_type == task_type)


def _grads_of(net, step):
    m = step()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)
    return m, grads


def _assert_same_grads(grads, reference, what):
    for name, g in reference.items():
        # float32 rounding, relative to the tensor's scale; a wrong chunk or a lost term gives O(1)
        assert (grads[name] - g).abs().max() <= 1e-4 * g.abs().max(), f"{what}: {name}"


def test_token_chunks_are_sorted_within_budget_and_cover_every_sequence():
    seqs = [[1] * n for n in (5, 1, 9, 3, 7, 2, 2)]
    chunks = bench.make_chunks_by_tokens(seqs, 12)
    # longest first; a sequence over the budget alone; then as many as fit len * longest <= 12
    assert chunks == [[2], [4], [0, 3], [5, 6, 1]]
    for budget in (1, 6, 10, 100):
        chunks = bench.make_chunks_by_tokens(seqs, budget)
        assert sorted(i for c in chunks for i in c) == list(range(len(seqs)))
        flat = [len(seqs[i]) for c in chunks for i in c]
        assert flat == sorted(flat, reverse=True)
        for c, nxt in zip(chunks, chunks[1:] + [None]):
            longest = len(seqs[c[0]])
            assert len(c) == 1 or len(c) * longest <= budget
            if nxt:  # greedy: the next sequence would not have fitted
                assert (len(c) + 1) * longest > budget


def test_chunking_changes_no_gradient(backbone, tokenizer, demo_dir):
    """I2 for both chunkers the bench measures: length-sorted chunks of C and token budgets
    (down to one sequence per chunk) give the gradients of one plain forward of the batch."""
    batch = _batch(demo_dir, "retrieval")  # hard and in-batch terms both present
    seqs, _ = train.batch_sequences(batch, tokenizer, CFG.max_length)
    ids, lengths = M.pad(seqs, tokenizer.pad_token_id)
    direct_loss, direct = _grads_of(backbone, lambda: train.batch_loss(
        M.embed(backbone, ids, lengths), batch, CFG.temperature)[0].backward())
    longest = max(len(s) for s in seqs)
    for max_tokens in (0, 1, 3 * longest):  # 0 = train.make_chunks with C = 3
        m, grads = _grads_of(backbone, lambda: bench.ours_step(backbone, batch, tokenizer, CFG, max_tokens))
        _assert_same_grads(grads, direct, f"max_tokens={max_tokens}")
        assert m["real_tokens"] <= m["padded_tokens"] <= len(seqs) * longest
    assert bench.make_chunks_by_tokens(seqs, 1) == train.make_chunks(seqs, 1)  # same length order


def test_official_step_computes_our_loss_and_gradients(backbone, tokenizer, demo_dir):
    """The baseline is the same math: one padded forward with activation checkpointing gives
    our loss and gradients, and computes S x longest tokens."""
    batch = _batch(demo_dir, "retrieval")
    official = bench.checkpointed(backbone)
    assert all(layer.gradient_checkpointing for layer in official.layers)
    ours, grads = _grads_of(backbone, lambda: bench.ours_step(backbone, batch, tokenizer, CFG))
    base, base_grads = _grads_of(official, lambda: bench.official_step(official, batch, tokenizer, CFG))
    assert base["loss"] == pytest.approx(ours["loss"], rel=1e-5)
    assert base["in_batch"] == pytest.approx(ours["in_batch"], rel=1e-5) and base["in_batch"] > 0
    _assert_same_grads(base_grads, grads, "official vs ours")
    seqs, _ = train.batch_sequences(batch, tokenizer, CFG.max_length)
    assert base["padded_tokens"] == len(seqs) * max(len(s) for s in seqs)
    assert base["real_tokens"] == ours["real_tokens"] and ours["padded_tokens"] < base["padded_tokens"]


def test_pairs_loss_is_sentence_transformers_cached_mnrl(backbone, tokenizer, demo_dir, tmp_path):
    """Comparison 4 compares like with like: our step with the pairs-only loss gives the loss
    of CachedMultipleNegativesRankingLoss(scale=20) on the export of the same weights."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss
    batch = _batch(demo_dir, "retrieval")
    pairs = D.Batch(batch.source, batch.task_type, batch.queries, batch.positives, [[] for _ in batch.queries])
    M.save_export(backbone, tokenizer, str(tmp_path / "export"), max_length=CFG.max_length)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "batch_loss", bench.in_batch_only_loss)
        ours = bench.ours_step(backbone, pairs, tokenizer, CFG)["loss"]
    st = SentenceTransformer(str(tmp_path / "export"), device="cpu")
    loss_fn = CachedMultipleNegativesRankingLoss(st, scale=1 / CFG.temperature, mini_batch_size=3)
    with torch.no_grad():
        theirs = loss_fn([st.preprocess(pairs.queries), st.preprocess(pairs.positives)], None).item()
    assert theirs == pytest.approx(ours, rel=1e-5)
