"""train.py: I2 chunk-size independence, the tiny recipe end to end, the schedule, and bad
command lines that fail before any model is loaded and write nothing."""
import contextlib
import json
import math
import os

import pytest
import torch

import data as D
import train


def _grads(backbone, tokenizer, batch, chunk_size):
    cfg = train.Config(chunk_size=chunk_size, max_length=128)
    m = train.cached_step(backbone, None, batch, tokenizer, cfg, torch.device("cpu"), contextlib.nullcontext)
    grads = {n: p.grad.clone() for n, p in backbone.named_parameters()}
    backbone.zero_grad(set_to_none=True)
    return m, grads


@pytest.mark.parametrize("task_type", ["retrieval", "classification"])
def test_chunk_size_does_not_change_gradients(backbone, tokenizer, demo_dir, task_type):
    """I2: chunks of 1, 3 and everything-in-one give the same gradients, and the same as a
    plain forward/backward of the whole batch without caching."""
    stream = D.BatchStream(D.load_sources(demo_dir), 6, seed=0)
    batch = next(b for b in stream if b.task_type == task_type)
    results = {c: _grads(backbone, tokenizer, batch, c) for c in (1, 3, 10_000)}
    # reference: one ordinary forward with grad through the model, no cache
    seqs, _ = train.batch_sequences(batch, tokenizer, 128)
    ids, lengths = train.M.pad(seqs, tokenizer.pad_token_id)
    loss = train.batch_loss(train.M.embed(backbone, ids, lengths), batch, 0.05)[0]
    loss.backward()
    direct = {n: p.grad.clone() for n, p in backbone.named_parameters()}
    for c, (m, grads) in results.items():
        assert m["loss"] == pytest.approx(loss.item(), rel=1e-5)
        for name, g in direct.items():
            # float32 rounding, relative to the tensor's scale; a wrong chunk gives O(1)
            assert (grads[name] - g).abs().max() <= 1e-4 * g.abs().max(), f"C={c} {name}"
    # length-sorted chunks pad less than one padded batch
    assert results[3][0]["padded_tokens"] < len(seqs) * max(len(s) for s in seqs)
    assert results[1][0]["padded_tokens"] == results[1][0]["real_tokens"]


def test_chunks_are_length_sorted():
    seqs = [[1] * n for n in (5, 1, 9, 3, 7)]
    assert train.make_chunks(seqs, 2) == [[2, 4], [0, 3], [1]]


def test_lr_schedule_warmup_cosine_floor():
    cfg = train.Config(lr=1e-3, min_lr=1e-5, warmup_steps=10)
    f = train.lr_lambda(cfg, total_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) * cfg.lr == pytest.approx((1e-3 + 1e-5) / 2)
    assert f(110) * cfg.lr == pytest.approx(1e-5) and f(500) * cfg.lr == pytest.approx(1e-5)


def test_tiny_recipe_end_to_end(trained_run):
    """`python train.py --size tiny` trains on real text: the validation loss and each
    source's training loss fall; the run folder holds the config, one metrics line per step,
    a resumable checkpoint and an export that AutoModel and AutoTokenizer load."""
    out = trained_run
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    for key in ("loss", "hard", "in_batch", "lr", "grad_norm", "seq_per_s"):
        assert all(math.isfinite(r[key]) for r in records)
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert vals[-1] < 0.8 * vals[0], vals
    for source in {r["source"] for r in records}:
        hard = [r["hard"] for r in records if r["source"] == source]
        q = len(hard) // 4
        assert sum(hard[-q:]) / q < 0.9 * sum(hard[:q]) / q, source
    assert json.load(open(out / "config.json"))["size"] == "tiny"
    assert os.listdir(out / "checkpoints") == [f"step_{len(records):08d}"] or \
        sorted(os.listdir(out / "checkpoints"))[-1] == f"step_{len(records):08d}"
    from transformers import AutoModel, AutoTokenizer
    backbone = AutoModel.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert tokenizer("x")["input_ids"][-1] == tokenizer.eos_token_id
    assert backbone.config.hidden_size == 64


@pytest.mark.parametrize("argv, message", [
    (["--no-such-flag", "1"], "unrecognized arguments: --no-such-flag"),
    (["--size", "7b"], "invalid choice: '7b'"),
    (["--batch-sz", "8"], "unrecognized arguments: --batch-sz"),  # no prefix matching
    (["--chunk-size", "0"], "--chunk-size must be positive"),
    (["--data", "/nonexistent/folder"], "--data /nonexistent/folder: no such folder"),
    (["--resume"], "--resume: no checkpoint in"),
])
def test_bad_command_lines(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        train.main(argv + ["--out", str(out)])
    assert message in str(e.value) + capsys.readouterr().err
    assert not out.exists()


def test_bad_data_folder_fails_before_model_and_writes_nothing(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("no data here")
    with pytest.raises(SystemExit, match="no .parquet or .jsonl files"):
        train.main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_batch_size_must_divide_over_ranks():
    with pytest.raises(SystemExit, match="--batch-size 9 is not divisible by the world size 2"):
        train.check_config(train.Config(batch_size=9, chunk_size=4, lr=1e-3, max_length=32), world=2)


def test_token_cap_bounds_chunks_and_count_cap_still_applies():
    seqs = [[1] * n for n in (5, 1, 9, 3, 7, 2, 2)]
    assert train.make_chunks(seqs, 10, 12) == [[2], [4], [0, 3], [5, 6, 1]]
    assert train.make_chunks(seqs, 2, 12) == [[2], [4], [0, 3], [5, 6], [1]]
    for cap in (1, 6, 10, 100):
        chunks = train.make_chunks(seqs, 100, cap)
        assert sorted(i for c in chunks for i in c) == list(range(len(seqs)))
        assert all(len(c) == 1 or len(c) * len(seqs[c[0]]) <= cap for c in chunks)
