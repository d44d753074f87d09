"""I3: pooling takes the hidden state of the EOS, whatever the padding side, after
truncation, and when the pad id is a real token."""
import torch

import model as M


def test_eos_survives_truncation(tokenizer):
    ids, n_cut = M.tokenize(tokenizer, ["word " * 500, "short"], max_length=16)
    assert [len(x) for x in ids][0] == 16 and n_cut == 1
    assert all(x[-1] == tokenizer.eos_token_id for x in ids)
    # the saved tokenizer appends EOS by itself and keeps it under truncation
    enc = tokenizer(["word " * 500], truncation=True, max_length=16)["input_ids"][0]
    assert len(enc) == 16 and enc[-1] == tokenizer.eos_token_id


def test_last_token_pool_left_and_right_padding(tokenizer, backbone):
    seqs, _ = M.tokenize(tokenizer, ["a long sentence about the economy and markets", "hi"], 64)
    single = [M.embed(backbone, torch.tensor([s]), torch.tensor([len(s)])) for s in seqs]
    for side in ("right", "left"):
        ids, lengths = M.pad(seqs, tokenizer.pad_token_id, side)
        mask = M.mask_from_lengths(lengths, ids.shape[1], side)
        hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = M.last_token_pool(hidden, mask)
        # the pooled position holds the EOS id
        last = [int(mask[i].nonzero().max()) for i in range(len(seqs))]
        assert [int(ids[i, j]) for i, j in enumerate(last)] == [tokenizer.eos_token_id] * 2
        batched = M.embed(backbone, ids, lengths, side)
        for i in range(len(seqs)):
            torch.testing.assert_close(batched[i], single[i][0], atol=1e-5, rtol=1e-4)
        if side == "right":  # naive [:, -1] would pool a pad position of the short row
            assert not torch.allclose(hidden[1, -1], pooled[1])


def test_pad_id_equal_to_real_token(tokenizer, backbone):
    """Masks come from lengths: padding with the EOS id itself (or any real id) changes nothing."""
    seqs, _ = M.tokenize(tokenizer, ["the match ended in a draw", "shares fell sharply today on news"], 64)
    for pad_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, seqs[0][0]):
        ids, lengths = M.pad(seqs, pad_id)
        out = M.embed(backbone, ids, lengths)
        ref = M.embed(backbone, *M.pad(seqs, tokenizer.pad_token_id))
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    # sum(mask)-1 from `ids != pad` would be wrong here: the pad id occurs inside the text
    ids, lengths = M.pad(seqs, seqs[0][0])
    assert (ids[0] == seqs[0][0]).sum() >= 1 and lengths.tolist() == [len(s) for s in seqs]


def test_encode_keeps_input_order(tokenizer, backbone):
    texts = ["short", "a much longer text " * 10, "mid length text here"]
    out = M.encode(backbone, tokenizer, texts, batch_size=2)
    for i, t in enumerate(texts):
        torch.testing.assert_close(out[i], M.encode(backbone, tokenizer, [t])[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))
