"""I3: pooling takes the hidden state of the EOS, whatever the padding side, after
truncation, and when the pad id is a real token."""
import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_same_sums

import model as M
from runtime import attention as A


def test_eos_survives_truncation(tokenizer):
    ids, n_cut = M.tokenize(tokenizer, ["word " * 500, "short"], max_length=16)
    assert [len(x) for x in ids][0] == 16 and n_cut == 1
    assert all(x[-1] == tokenizer.eos_token_id for x in ids)
    # the saved tokenizer appends EOS by itself and keeps it under truncation
    enc = tokenizer(["word " * 500], truncation=True, max_length=16)["input_ids"][0]
    assert len(enc) == 16 and enc[-1] == tokenizer.eos_token_id


def test_last_token_pool_left_and_right_padding(tokenizer, backbone):
    """I3 through the padded reference (model.embed, which pools with model.last_token_pool,
    the pooling of training and encode): each row's EOS, on either padding side."""
    seqs, _ = M.tokenize(tokenizer, ["a long sentence about the economy and markets", "hi"], 64)
    single = [M.embed(backbone, torch.tensor([s]), torch.tensor([len(s)])) for s in seqs]
    for side in ("right", "left"):
        ids, lengths = M.pad(seqs, tokenizer.pad_token_id, side)
        width = ids.shape[1]
        eos_at = lengths - 1 if side == "right" else torch.full_like(lengths, width - 1)
        assert ids[torch.arange(2), eos_at].tolist() == [tokenizer.eos_token_id] * 2
        batched = M.embed(backbone, ids, lengths, side)
        for i in range(len(seqs)):
            assert_same_sums(batched[i], single[i][0], f"{side} padding, row {i}")
        positions = torch.arange(width)[None]
        mask = (positions < lengths[:, None]) if side == "right" else (
            positions >= width - lengths[:, None])
        hidden = backbone(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        pooled = M.last_token_pool(hidden, torch.arange(2) * width + eos_at)
        assert_same_sums(pooled, batched, f"{side} padding, pooled from the hidden states")
        if side == "right":  # naive [:, -1] would pool a pad position of the short row
            assert not torch.allclose(F.normalize(hidden[1, -1], dim=-1), pooled[1])


def test_pad_id_equal_to_real_token(tokenizer, backbone):
    """Masks come from lengths: padding with the EOS id itself (or any real id) changes nothing."""
    seqs, _ = M.tokenize(tokenizer,
                         ["the match ended in a draw", "shares fell sharply today on news"], 64)
    for pad_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, seqs[0][0]):
        ids, lengths = M.pad(seqs, pad_id)
        out = M.embed(backbone, ids, lengths)
        ref = M.embed(backbone, *M.pad(seqs, tokenizer.pad_token_id))
        assert_same_sums(out, ref, f"pad id {pad_id}")
    # sum(mask)-1 from `ids != pad` would be wrong here: the pad id occurs inside the text
    ids, lengths = M.pad(seqs, seqs[0][0])
    assert (ids[0] == seqs[0][0]).sum() >= 1 and lengths.tolist() == [len(s) for s in seqs]


def test_encode_keeps_input_order(tokenizer, backbone):
    texts = ["short", "a much longer text " * 10, "mid length text here"]
    out = M.encode(backbone, tokenizer, texts, batch_size=2)
    for i, t in enumerate(texts):
        assert_same_sums(out[i], M.encode(backbone, tokenizer, [t])[0], f"text {i}")
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))


def test_make_chunks_first_fit_within_budget_and_count():
    lengths = [5, 1, 9, 3, 7, 2, 2]
    assert M.make_chunks(lengths, 12) == [[2, 3], [4, 0], [5, 6, 1]]  # first fit, longest first
    # sdpa rows of width 9 over the whole batch, then runs of rows: [2], [4, 5], [0, 3, 1], [6]
    assert M.make_chunks(lengths, 18, width=9) == [[2, 4, 5], [0, 3, 1, 6]]
    for budget in (1, 6, 10, 100):
        for cap in (0, 2):
            for width in (None, 9):
                chunks = M.make_chunks(lengths, budget, cap, width)
                assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
                computed = [M.pack([[0] * lengths[i] for i in c],
                                   width).computed_tokens for c in chunks]
                assert all(len(c) == 1 or n <= max(budget, width or 0)
                           for c, n in zip(chunks, computed))
                assert not cap or all(len(c) <= cap for c in chunks)


def _varlen_reference(backbone):
    """The same weights behind model.packed_attention (its CPU path: one sdpa per sequence)."""
    import copy
    assert A.attention_implementation(torch.device("cpu"), forced=True) == A.VARLEN
    net = copy.deepcopy(backbone)
    net.set_attn_implementation(A.VARLEN)
    assert M.uses_varlen(net) and not M.uses_varlen(backbone)
    return net


def test_packed_sequences_pool_their_own_eos_and_match_padded(tokenizer, backbone):
    """I3 for packed chunks: each sequence pools its own EOS; packed rows (sdpa, block-diagonal
    masks) and one varlen row give each sequence's unpacked embedding (fp32, tests/tolerance.py)."""
    texts = ["a long sentence about the economy and markets " * 3, "hi", "the match ended",
             "shares fell sharply today on news of the merger", "ok"]
    seqs, _ = M.tokenize(tokenizer, texts, 64)
    single = torch.cat([M.embed(backbone, torch.tensor([s]), torch.tensor([len(s)])) for s in seqs])
    varlen = _varlen_reference(backbone)
    longest = max(len(s) for s in seqs)
    for net, width in ((backbone, longest), (varlen, None)):
        one_row = width is None
        packed = M.pack(seqs, width)
        flat = packed.input_ids.flatten()
        assert flat[packed.last].tolist() == [tokenizer.eos_token_id] * len(seqs)
        if not one_row:  # rows as wide as the longest sequence, short ones sharing a row
            assert packed.input_ids.shape == (2, longest)
        if one_row:
            assert packed.computed_tokens == sum(len(s) for s in seqs)
            assert packed.cu_seqlens.diff().tolist() == sorted((len(s) for s in seqs), reverse=True)
        assert_same_sums(M.embed_packed(net, packed), single, f"width {width}")
    # attention that crossed sequences would change every sequence but the first of a row
    one_row = M.pack(seqs)
    positions = torch.arange(one_row.computed_tokens)[None]  # no restart: attention crosses sequences
    leaky = backbone(input_ids=one_row.input_ids, position_ids=positions).last_hidden_state[0, one_row.last]
    leaky = M.F.normalize(leaky, dim=-1)
    assert (leaky - single).abs().max() > 1e-2


def test_no_kv_cache_in_training_forwards(tokenizer, backbone):
    seqs, _ = M.tokenize(tokenizer, ["one text", "another text"], 32)
    packed = M.pack(seqs, width=32)
    seen = []
    hook = backbone.register_forward_hook(lambda mod, args, kwargs, out: seen.append(out),
                                          with_kwargs=True)
    M.embed_packed(backbone, packed)
    M.embed(backbone, *M.pad(seqs, 0))
    hook.remove()
    assert backbone.config.use_cache  # Qwen3's default: a forward would build a cache unless told
    assert [out.past_key_values for out in seen] == [None, None]


def test_every_function_that_takes_a_backbone_runs_on_a_varlen_one(tokenizer, backbone):
    """With the CUDA attention forced on a CPU: encode (one varlen row per chunk) and the padded
    reference (model.embed, run as sdpa) give the sdpa backbone's embeddings in fp32; a
    padded forward that skips model.embed is refused with what to do, not a None deep inside
    transformers; the varlen backbone keeps its attention afterwards."""
    varlen = _varlen_reference(backbone)
    texts = ["a long sentence about the economy and markets " * 4, "hi", "the match ended"]
    assert_same_sums(M.encode(varlen, tokenizer, texts, batch_size=2),
                     M.encode(backbone, tokenizer, texts, batch_size=2), "encode, varlen vs sdpa")
    ids, lengths = M.pad(M.tokenize(tokenizer, texts, 64)[0], tokenizer.pad_token_id)
    assert_same_sums(M.embed(varlen, ids, lengths), M.embed(backbone, ids, lengths),
                     "padded forward, varlen vs sdpa backbone")
    assert M.uses_varlen(varlen)
    refused = r"got 3 row\(s\) and cu_seq_lens_q=None.*padded_attention"
    with pytest.raises(ValueError, match=refused):
        varlen(input_ids=ids, attention_mask=(torch.arange(ids.shape[1])[None] < lengths[:, None]).long())


@pytest.mark.parametrize("device, bf16, forced, kernels, expected", [
    ("cuda", True, False, ["flash-attn", "torch varlen_attn"], (A.VARLEN, "flash-attn")),
    ("cuda", True, False, ["torch varlen_attn"], (A.VARLEN, "torch varlen_attn")),
    ("cuda", True, False, [], ("sdpa", "no flash-attn")),
    ("cuda", False, True, ["flash-attn"], ("sdpa", "bf16/fp16 only")),  # --precision fp32
    ("cpu", False, False, [], ("sdpa", "block-diagonal")),
    ("cpu", False, True, [], (A.VARLEN, "F2LLM_FORCE_VARLEN=1")),
])
def test_attention_choice(device, bf16, forced, kernels, expected):
    """The decision on every device: fp32 on CUDA runs sdpa rows (the varlen kernels refuse
    fp32 tensors), so it never meets a kernel error mid-step; the forced CPU path is VARLEN."""
    attn, note = A.choose_attention(device, bf16, forced, kernels)
    assert attn == expected[0] and expected[1] in note


def test_force_varlen_environment_variable(monkeypatch):
    monkeypatch.setenv(A.FORCE_VARLEN, "1")
    assert A.attention_implementation(torch.device("cpu"), bf16=False) == A.VARLEN
    monkeypatch.setenv(A.FORCE_VARLEN, "0")
    assert A.attention_implementation(torch.device("cpu"), bf16=False) == "sdpa"
    monkeypatch.setenv(A.FORCE_VARLEN, "yes")
    with pytest.raises(ValueError, match="F2LLM_FORCE_VARLEN='yes': use 1"):
        A.attention_implementation(torch.device("cpu"))


@pytest.mark.parametrize("gqa_flag", [False, True])  # torch 2.11's signature, torch 2.13's
def test_torch_varlen_kernel_gets_grouped_heads_and_kwargs_fixed_at_registration(
        tokenizer, backbone, monkeypatch, gqa_flag):
    """The torch varlen_attn path, its CUDA kernel replaced by a recorder (per-sequence sdpa):
    k and v arrive with their H_kv heads (no repeat), causal as window_size=(-1, 0), Qwen3's
    scale, enable_gqa only where the signature has it; the signature is read when the
    attention is registered, never per call; the embeddings are sdpa's."""
    import functools
    import inspect

    import torch.nn.attention.varlen as varlen_module
    calls = []

    def recorder(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                 scale=None, window_size=(-1, -1), **gqa):
        calls.append((query.shape[1], key.shape[1], value.shape[1], window_size, scale, gqa))
        return A.sdpa_per_sequence(query, key, value, cu_seq_q, max_q, scale, 0.0)
    if gqa_flag:
        recorder = functools.partial(recorder, enable_gqa=False)  # a keyword-only parameter
        recorder.__signature__ = inspect.signature(varlen_module.varlen_attn)
    monkeypatch.setattr(varlen_module, "varlen_attn", recorder)
    kernel = A._torch_kernel()
    monkeypatch.setattr(A.inspect, "signature", None)  # any call from here on would fail
    net = _varlen_reference(backbone)
    A.AttentionInterface.register(A.VARLEN, functools.partial(A.packed_attention, kernel=kernel))
    try:
        seqs, _ = M.tokenize(tokenizer, ["the match ended in a draw", "shares fell", "ok"], 32)
        assert_same_sums(M.embed_packed(net, M.pack(seqs)),
                         M.embed_packed(backbone, M.pack(seqs, 32)), "varlen_attn vs sdpa rows")
    finally:
        A.attention_implementation(torch.device("cpu"), forced=True)  # the CPU stand-in again
    config = backbone.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    assert kv_heads < heads and len(calls) == config.num_hidden_layers
    for call in calls:
        assert call[:5] == (heads, kv_heads, kv_heads, (-1, 0), config.head_dim ** -0.5)
        assert call[5] == ({"enable_gqa": True} if gqa_flag else {})
