"""The training step's invariants on a CPU: I2 (the cached step's loss and gradients equal the
naive step's, whatever the token budget, the attention path, the dropout masks, the options
and the distillation modes), one bf16 cast per weight per pass, the step copied alone, and
validation on both attention paths."""
import collections
import contextlib
import copy
import math

import options
import pytest
import step_path
import torch
from tolerance import assert_same_grads, assert_same_sums
from transformers import AutoModel

import data as D
import loss
import model as M
import train
from runtime import attention as A
from runtime import tokens as T


def _step(net, seqs, loss_fn, chunk_tokens, bf16=False, step=None):
    """train.cached_step as the loop runs it; the loop's bookkeeping comes from the chunks."""
    chunks = M.packed_chunks(net, seqs, chunk_tokens)
    losses = (step or train.cached_step)(net, chunks, loss_fn, torch.autocast(
        "cpu", dtype=torch.bfloat16, enabled=bf16))
    return dict(loss=losses[0].item(), terms=losses[1:].tolist(), chunks=len(chunks),
                real_tokens=sum(len(s) for s in seqs),
                computed_tokens=sum(packed.computed_tokens for packed, _ in chunks))


def _grads(net, seqs, loss_fn, chunk_tokens, bf16=False, step=None):
    m = _step(net, seqs, loss_fn, chunk_tokens, bf16, step)
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad(set_to_none=True)
    return m, grads


def _padded_reference(backbone, seqs, pad_id, loss_of_states):
    """One plain padded forward of the whole batch (no packing, no chunks) and one backward of
    loss_of_states(raw last-token states (S, D)) -> (loss, the trained parameters' grads)."""
    loss = loss_of_states(_raw_states(backbone, seqs, pad_id))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in backbone.named_parameters() if p.requires_grad}
    backbone.zero_grad(set_to_none=True)
    return loss, grads


def _lora_backbone(tokenizer):
    """The tiny model with rank-4 adapters, their B made non-zero so the adapters matter."""
    torch.manual_seed(0)
    lora = M.add_lora(M.tiny_backbone(tokenizer, seed=0), 4)
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    return lora


RECIPE = train.Config()  # the loss settings of the recipe: temperature 0.05, in-batch, autograd


def _rank_batch(small_demo_dir, tokenizer, task_type, size=6, max_length=128):
    """A rank's batch of the demo sample's first rows (one token cache for every test here)."""
    stream = D.BatchStream(T.load_tokenized(small_demo_dir, tokenizer, max_length,
                                            small_demo_dir + "_tokens"),
                           size, seed=0)
    source = {"retrieval": "bbc_headline_retrieval"}.get(task_type, f"bbc_topic_{task_type}")
    batch = next(b for b in stream if b.source == source)
    return batch, batch.sequences()


@pytest.mark.parametrize("task_type", ["retrieval", "classification"])
def test_chunk_tokens_do_not_change_gradients(tokenizer, small_demo_dir, task_type, attn):
    """I2, on sdpa rows and on the CUDA layout (one varlen row per chunk): packed chunks of one
    row or sequence each, of a few hundred tokens and of everything give the same loss and
    gradients as one plain padded forward/backward of the whole batch."""
    backbone = M.tiny_backbone(tokenizer, seed=0, attn=attn)
    batch, seqs = _rank_batch(small_demo_dir, tokenizer, task_type)
    loss_fn = train.step_loss(batch, RECIPE)
    results = {c: _grads(backbone, seqs, loss_fn, c) for c in (1, 300, 10**6)}
    ids, lengths = M.pad(seqs, tokenizer.pad_token_id)
    loss, direct = _padded_reference(backbone, seqs, tokenizer.pad_token_id,
                                     lambda states: loss_fn(states)[0])
    varlen = attn == A.VARLEN
    # a chunk per sequence (varlen rows) or per sdpa row as wide as the longest sequence
    rows = [[i] for i in range(len(seqs))] if varlen else M.first_fit(
        [len(s) for s in seqs], max(len(s) for s in seqs))
    assert [results[c][0]["chunks"] for c in (1, 10**6)] == [len(rows), 1]  # a row per chunk; all
    assert 1 < results[300][0]["chunks"] < len(rows) <= len(seqs)
    for c, (m, grads) in results.items():
        assert_same_sums(m["loss"], loss.item(), "loss")
        assert_same_grads(grads, direct, f"chunk_tokens={c}")
    # packed rows compute fewer tokens than one padded batch; varlen rows only the real ones
    assert results[1][0]["real_tokens"] == int(lengths.sum())
    computed = int(lengths.sum()) if varlen else len(rows) * ids.shape[1]
    assert results[1][0]["computed_tokens"] == computed < ids.numel()


def test_I2_under_dropout_pass_2_replays_pass_1_masks(tokenizer, small_demo_dir):
    """I2 with attention dropout 0.1 (Qwen3's only dropout): the cached step's gradients equal
    one uncached forward and backward that draws the same masks (the same chunks in the same
    order from the same RNG state). Without the RNG replay in pass 2, they do not."""
    torch.manual_seed(0)
    config = M.tiny_config(len(tokenizer))
    config.attention_dropout = 0.1
    backbone = AutoModel.from_config(config, attn_implementation="sdpa").train()
    assert [k for k, v in config.to_dict().items() if "dropout" in k and v] == ["attention_dropout"]
    batch, seqs = _rank_batch(small_demo_dir, tokenizer, "retrieval")
    loss_fn, chunk_tokens = train.step_loss(batch, RECIPE), 200
    torch.manual_seed(1)
    m, grads = _grads(backbone, seqs, loss_fn, chunk_tokens)
    assert m["chunks"] > 2
    # the reference: the step's chunks, forward WITH grad in order, one loss, one backward
    torch.manual_seed(1)
    reps = torch.empty(len(seqs), config.hidden_size)
    width = max(len(s) for s in seqs)  # the step's sdpa rows
    for rows in M.make_chunks([len(s) for s in seqs], chunk_tokens, width=width):
        reps = reps.index_put((torch.tensor(rows),),
                              M.embed_packed(backbone, M.pack([seqs[i] for i in rows], width)))
    loss = loss_fn(reps)[0]
    loss.backward()
    direct = {n: p.grad.clone() for n, p in backbone.named_parameters()}
    backbone.zero_grad(set_to_none=True)
    assert_same_sums(m["loss"], loss.item(), "loss")
    assert_same_grads(grads, direct, "dropout 0.1")
    torch.manual_seed(1)
    _, without = _grads(backbone, seqs, loss_fn, 10**6)  # dropout on: a different draw differs
    assert any((without[n] - g).abs().max() > 1e-2 * g.abs().max() for n, g in direct.items())


def test_one_bf16_cast_per_weight_per_pass(backbone, tokenizer, small_demo_dir):
    """Under bf16 autocast, the step casts each weight to bf16 once per pass (2 per step),
    not once per chunk: autocast's cache lives as long as its outermost region."""
    from torch.utils._python_dispatch import TorchDispatchMode

    params = {p.untyped_storage().data_ptr(): n for n, p in backbone.named_parameters()}
    casts = collections.Counter()

    class CountCasts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and out.dtype == torch.bfloat16 \
                    and args[0].untyped_storage().data_ptr() in params:
                casts[params[args[0].untyped_storage().data_ptr()]] += 1
            return out
    batch, seqs = _rank_batch(small_demo_dir, tokenizer, "retrieval")
    with CountCasts():
        m = _step(backbone, seqs, train.step_loss(batch, RECIPE), 300, bf16=True)
    assert m["chunks"] >= 4
    assert casts and max(casts.values()) == 2, casts.most_common(3)


# what a lecturer pastes above the copied definitions: the imports they use, nothing of this repo
COPY_HEADER = """import contextlib
import math
from dataclasses import dataclass

import torch.distributed as dist
import torch.nn.functional as F
"""
COPY_ROOTS = [("model", "packed_chunks"), ("train", "cached_step"), ("loss", "f2llm_loss"),
              ("train", "optimizer_step"), ("train", "lr_lambda")]


def test_the_step_copied_alone_gives_the_same_loss_gradients_and_update(backbone, tokenizer,
                                                                         small_demo_dir):
    """The copy-paste promise: the step (packing, pooling, the cached loop), the loss and the
    schedule, their text copied (tests/step_path.py: what the step reaches, the text the line
    count of docs/design.md §4 counts) into a namespace holding only torch, give train's loss,
    gradients and updated weights bit for bit."""
    text = COPY_HEADER + step_path.source_of(step_path.step_path(COPY_ROOTS))
    namespace = {"torch": torch}
    exec(text, namespace)
    assert namespace["cached_step"] is not train.cached_step
    assert {"pack", "last_token_pool", "_GatherWithGrad", "all_means"} <= namespace.keys()
    batch, seqs = _rank_batch(small_demo_dir, tokenizer, "retrieval")
    b, k = len(batch.queries), len(batch.negatives[0])
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=False)
    results = []
    for ns in (namespace, {**vars(M), **vars(train), **vars(loss)}):
        net = copy.deepcopy(backbone)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, ns["lr_lambda"](1e-3, 1e-5, 2, 10))
        chunks = ns["packed_chunks"](net, seqs, 300)
        losses = ns["cached_step"](net, chunks, lambda reps: ns["f2llm_loss"](reps, b, k, True),
                                   autocast)
        grads = {n: p.grad.clone() for n, p in net.named_parameters()}
        values, norm, applied = ns["optimizer_step"](optimizer, scheduler, list(net.parameters()),
                                                     1.0, losses)
        results.append((len(chunks), values, grads, net.state_dict(), scheduler.get_last_lr()))
    (chunks, values, grads, weights, lr), (chunks_t, values_t, grads_t, weights_t, lr_t) = results
    assert chunks >= 2 and applied and values == values_t and lr == lr_t
    assert all(torch.equal(grads[n], g) for n, g in grads_t.items())
    assert all(torch.equal(weights[n], w) for n, w in weights_t.items())


def test_options_keep_I2_mrl_lora_and_one_process_detached_gather(tokenizer, small_demo_dir):
    """With Matryoshka on a LoRA model, token budgets from one row per chunk to all-in-one give
    the adapter gradients of one plain padded forward with the naive Matryoshka sum; only the
    adapters train; with one process the detached gather changes nothing."""
    from loss import f2llm_loss
    backbone = _lora_backbone(tokenizer)
    trained = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    batch, seqs = _rank_batch(small_demo_dir, tokenizer, "retrieval")
    b, k, d = len(batch.queries), len(batch.negatives[0]), backbone.config.hidden_size
    naive, direct = _padded_reference(backbone, seqs, tokenizer.pad_token_id, lambda reps: sum(
        f2llm_loss(M.F.normalize(reps[:, :m], dim=-1), b, k, True)[0] / (n * math.sqrt(d / m))
        for n, m in enumerate([64, 32, 16, 8], start=1)))
    mrl = train.step_loss(batch, train.Config(mrl=True))
    for chunk_tokens in (1, 10**6):
        m, grads = _grads(backbone, seqs, mrl, chunk_tokens)
        assert_same_sums(m["loss"], naive.item(), "loss")
        assert_same_grads({n: g for n, g in grads.items() if n in trained}, direct, f"mrl+lora {chunk_tokens}")
        assert set(grads) == trained  # frozen weights get no gradient at all
    recipe = _grads(backbone, seqs, train.step_loss(batch, RECIPE), 200)
    detached = _grads(backbone, seqs, train.step_loss(
        batch, train.Config(in_batch_gather="detached")), 200)
    assert recipe[0]["loss"] == detached[0]["loss"]
    assert all(torch.equal(recipe[1][n], detached[1][n]) for n in trained)


@pytest.mark.slow  # ~1 s per option on 2 quiet cores; the recipe's own I2 tests stay quick
@pytest.mark.parametrize("option", list(options.OPTIONS))
def test_every_option_keeps_I2(tokenizer, small_demo_dir, option):
    """I2 for each option of tests/options.py (the list the I1 harness runs too): packed
    chunks of a few hundred tokens and of everything give the loss and the trained gradients
    of one plain padded forward and backward of the same loss; a teacher's states, when the
    option distils, are another tiny model's."""
    cfg = options.config(option)
    backbone = options.backbone(tokenizer, cfg)
    batch, seqs = _rank_batch(small_demo_dir, tokenizer, "retrieval", size=4)
    teacher = options.teacher(tokenizer) if cfg.teacher else None
    teacher_states = None if teacher is None else train.embed_chunks(
        teacher, M.packed_chunks(teacher, seqs, 10**6), contextlib.nullcontext())
    loss_fn = train.step_loss(batch, cfg, teacher_states)
    loss, direct = _padded_reference(backbone, seqs, tokenizer.pad_token_id,
                                     lambda states: loss_fn(states)[0])
    for chunk_tokens in (300, 10**6):
        m, grads = _grads(backbone, seqs, loss_fn, chunk_tokens)
        assert m["chunks"] > 1 or chunk_tokens == 10**6
        assert_same_sums(torch.tensor(m["loss"]), loss.detach(), f"{option} loss")
        assert set(grads) == set(direct)  # the trained parameters, and only those
        assert_same_grads(grads, direct, f"{option} chunk_tokens={chunk_tokens}")


def test_no_in_batch_drops_only_the_in_batch_term(backbone, tokenizer, small_demo_dir):
    """--no-in-batch (the ablation): on retrieval data the loss is the hard-negative term
    alone, the same term as the recipe's."""
    batch, seqs = _rank_batch(small_demo_dir, tokenizer, "retrieval")
    recipe = _grads(backbone, seqs, train.step_loss(batch, RECIPE), 10**6)[0]
    alone = _grads(backbone, seqs, train.step_loss(batch, train.Config(in_batch=False)), 10**6)[0]
    assert recipe["terms"][1] > 0 and alone["terms"][1] == 0
    assert alone["terms"][0] == recipe["terms"][0] == pytest.approx(alone["loss"])


def _raw_states(backbone, seqs, pad_id):
    """One plain padded forward: (S, D) raw last-token states (no packing, no normalisation)."""
    ids, lengths = M.pad(seqs, pad_id)
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()  # right padding
    with A.padded_attention(backbone):  # a varlen backbone builds no mask for padded rows
        hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    return hidden[torch.arange(len(seqs)), lengths - 1].float()


def _official_kd(student, teacher, b, k, mode, t=0.05):
    """Each distillation mode from its formula. v2 (F2LLM v2's utils.py accelerate_train):
    F.mse_loss of the raw query, positive and negative states, the teacher cut to D."""
    d = student.shape[1]
    groups = [slice(0, b), slice(b, 2 * b), slice(2 * b, None)]
    if mode == "v2":
        return sum(M.F.mse_loss(student[g], teacher[g, :d]) for g in groups)
    s, c = M.F.normalize(student, dim=-1), M.F.normalize(teacher[:, :d], dim=-1)
    if mode == "unit":
        return sum(((s[g] - c[g]) ** 2).sum(-1).mean() for g in groups)
    from loss import distillation_loss  # kl: its own loop test is in tests/test_loss.py
    return distillation_loss(student, teacher, b, k, True, "kl", t)


@pytest.mark.parametrize("mode, attn", [("v2", "sdpa"), ("v2", A.VARLEN), ("unit", "sdpa"),
                                        ("kl", A.VARLEN)], indirect=["attn"])
def test_distillation_keeps_I2_with_the_naive_gradient(tokenizer, small_demo_dir, mode, attn):
    """With a teacher's raw states of the same sequences (another tiny model, no grad), token
    budgets from one row per chunk to all-in-one give the gradients of one plain padded
    forward of F2LLM's loss + kd_weight x the mode's term written from its formula (v2: on the
    RAW states, which the cached step must therefore cache), and the term changes them. On
    the varlen cases student and teacher run the CUDA layout (varlen rows forced on this CPU)."""
    from loss import f2llm_loss
    backbone = M.tiny_backbone(tokenizer, seed=0, attn=attn)
    batch, seqs = _rank_batch(small_demo_dir, tokenizer, "retrieval")
    b, k = len(batch.queries), len(batch.negatives[0])
    teacher = M.tiny_backbone(tokenizer, seed=1, attn=attn)
    teacher_states = train.embed_chunks(  # its own packed pass
        teacher, M.packed_chunks(teacher, seqs, 200), contextlib.nullcontext())
    with torch.no_grad():
        assert_same_sums(teacher_states, _raw_states(teacher, seqs, tokenizer.pad_token_id),
                         "teacher's packed states vs padded")
    norms = teacher_states.norm(dim=-1)
    assert (norms - 1).abs().min() > 0.5  # raw, not unit: a normalised cache would fail v2
    terms = {}

    def naive_loss(states):
        terms["kd"] = _official_kd(states, teacher_states, b, k, mode)
        return f2llm_loss(M.F.normalize(states, dim=-1), b, k, True)[0] + 10 * terms["kd"]
    naive, direct = _padded_reference(backbone, seqs, tokenizer.pad_token_id, naive_loss)
    kd = terms["kd"]
    loss_fn = train.step_loss(batch, train.Config(kd_mode=mode, kd_weight=10), teacher_states)
    for chunk_tokens in (1, 10**6):
        m, grads = _grads(backbone, seqs, loss_fn, chunk_tokens)
        assert_same_sums(m["loss"], naive.item(), "loss")
        assert_same_sums(m["terms"][2], kd.item(), "kd term")
        assert m["terms"][2] > 0
        assert_same_grads(grads, direct, f"{mode} {chunk_tokens}")
    assert all(p.grad is None for p in teacher.parameters())
    recipe = _grads(backbone, seqs, train.step_loss(batch, RECIPE), 10**6)[1]
    assert any((recipe[n] - g).abs().max() > 1e-3 * g.abs().max() for n, g in direct.items())


def test_validation_on_the_varlen_path_matches_sdpa(tokenizer, small_demo_dir):
    """train.validate (packed chunks, no grad) gives the same held-out loss on the CUDA layout
    (varlen rows forced on this CPU) as on sdpa rows."""
    sources = T.load_tokenized(small_demo_dir, tokenizer, 128, small_demo_dir + "_tokens")
    batches = list(D.ValidationBatches(sources, 6, 1, seed=0))[:4]
    cfg = train.Config(chunk_tokens=200)
    losses = [train.validate(M.tiny_backbone(tokenizer, seed=0, attn=A.attention_implementation(
        torch.device("cpu"), False, forced)), batches, 0, 1, cfg, contextlib.nullcontext())[0]
        for forced in (False, True)]
    assert losses[0] > 0
    assert_same_sums(losses[1], losses[0], "validation loss, varlen vs sdpa")


def test_validation_reports_the_recipes_loss_beside_a_variants_own(tokenizer, small_demo_dir):
    """Comparable validation: a variant (--temperature 0.1 --no-in-batch --mrl) reports its
    own loss and, on the same held-out reps, the recipe's, which is the preset's own
    validation loss of the same model; the curves draw both lines."""
    from runtime.curves import curves_figure
    sources = T.load_tokenized(small_demo_dir, tokenizer, 128, small_demo_dir + "_tokens",
                               val_fraction=0.05)  # 7 rows per source: batches of 6 and 1
    # a retrieval batch of several queries (where --no-in-batch changes the loss) and a
    # classification batch
    batches = [next(b for b in D.ValidationBatches(sources, 6, 1, seed=0)
                    if b.task_type == task_type and len(b.queries) == 6)
               for task_type in ("retrieval", "classification")]
    backbone = M.tiny_backbone(tokenizer, seed=0)
    validate = lambda **variant: train.validate(backbone, batches, 0, 1, train.Config(**variant),
                                                contextlib.nullcontext())
    preset = validate()
    assert preset[0] == preset[1] > 0  # the preset's own loss is the recipe's
    for variant in (dict(temperature=0.1), dict(in_batch=False), dict(mrl=True)):
        own, recipe = validate(**variant)
        assert recipe == preset[0] and abs(own - recipe) > 0.01 * recipe, variant
    records = [dict(step=s, source="a", loss=1.0, hard=1.0, in_batch=0.0, lr=1e-3,
                    val_loss=2.0 + s, val_recipe_loss=3.0 + s) for s in (1, 2)]
    val_ax = curves_figure(records).axes[1]
    assert [list(line.get_ydata()) for line in val_ax.get_lines()] == [[3.0, 4.0], [4.0, 5.0]]
    line = lambda record: train.log_step(dict(record, time=1.0, grad_norm=1.0, tokens_per_s=1.0,
                                              chunks=1), 2, 0.0)
    assert line(records[0]).endswith("val 3.0000 (the recipe's loss 4.0000)")
    assert line(dict(records[0], val_recipe_loss=3.0)).endswith("val 3.0000")
