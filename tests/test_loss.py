"""I4: both losses equal a naive per-row loop; logits in fp32; in-batch only for retrieval."""
import math

import torch
import torch.nn.functional as F
from tolerance import assert_same_sums

import data as D
from loss import (
    IN_BATCH_TYPES,
    distillation_loss,
    f2llm_loss,
    hard_negative_loss,
    in_batch_loss,
    matryoshka,
    matryoshka_dims,
)


def _unit(*shape, dtype=torch.float32):
    return F.normalize(torch.randn(*shape), dim=-1).to(dtype)


def test_hard_negative_loss_matches_loop():
    torch.manual_seed(0)
    b, k, d, t = 5, 7, 16, 0.05
    q, p, n = _unit(b, d), _unit(b, d), _unit(b, k, d)
    expected = 0.0
    for i in range(b):
        scores = [float(q[i] @ p[i]) / t] + [float(q[i] @ n[i, j]) / t for j in range(k)]
        expected += -scores[0] + math.log(sum(math.exp(s) for s in scores))
    assert_same_sums(hard_negative_loss(q, p, n, t).item(), expected / b, "hard vs loop")


def test_in_batch_loss_matches_loop():
    torch.manual_seed(1)
    b, d, t = 6, 16, 0.05
    q, p = _unit(b, d), _unit(b, d)
    expected = 0.0
    for i in range(b):
        scores = [float(q[i] @ p[j]) / t for j in range(b)]
        expected += -scores[i] + math.log(sum(math.exp(s) for s in scores))
    assert_same_sums(in_batch_loss(q, p, t).item(), expected / b, "in-batch vs loop")


def test_logits_are_fp32_for_bf16_inputs():
    torch.manual_seed(2)
    q, p, n = _unit(4, 32, dtype=torch.bfloat16), _unit(4, 32, dtype=torch.bfloat16), _unit(4, 3, 32, dtype=torch.bfloat16)
    out = hard_negative_loss(q, p, n)
    assert out.dtype == torch.float32
    ref = hard_negative_loss(q.float(), p.float(), n.float())
    assert torch.allclose(out, ref)
    assert in_batch_loss(q, p).dtype == torch.float32


def test_total_is_hard_plus_in_batch_for_retrieval_only():
    torch.manual_seed(3)
    b, k, d = 4, 7, 8
    reps = _unit(b * (2 + k), d)
    total, hard, in_batch = f2llm_loss(reps, b, k, in_batch=True)
    assert in_batch.item() > 0 and torch.allclose(total, hard + in_batch)
    assert torch.allclose(in_batch, in_batch_loss(reps[:b], reps[b:2 * b]))
    assert torch.allclose(hard,
                          hard_negative_loss(reps[:b], reps[b:2 * b], reps[2 * b:].view(b, k, d)))
    for task_type in ("clustering", "classification"):
        kk = D.K_BY_TYPE[task_type]
        reps = _unit(b * (2 + kk), d)
        total, hard, in_batch = f2llm_loss(reps, b, kk, in_batch=task_type in IN_BATCH_TYPES)
        assert in_batch.item() == 0 and torch.equal(total, hard)
    # pairs only (k = 0): the in-batch term alone
    total, hard, in_batch = f2llm_loss(reps[:2 * b], b, 0, in_batch=True)
    assert hard.item() == 0 and torch.equal(total, in_batch)


def _naive_f2llm(reps, b, k, t=0.05):
    """The recipe's loss, one query at a time in plain Python."""
    q, p, n = reps[:b], reps[b:2 * b], reps[2 * b:].view(b, k, -1)
    hard = inb = 0.0
    for i in range(b):
        s = [float(q[i] @ p[i]) / t] + [float(q[i] @ n[i, j]) / t for j in range(k)]
        hard += -s[0] + math.log(sum(math.exp(x) for x in s))
        s = [float(q[i] @ p[j]) / t for j in range(b)]
        inb += -s[i] + math.log(sum(math.exp(x) for x in s))
    return hard / b + inb / b


def test_matryoshka_matches_a_naive_loop():
    """F2LLM v2's MRL: the loss on each nested prefix (renormalised), largest first, the n-th
    weighted 1 / (n sqrt(D / dim)); dims are D and the powers of two below it down to 8."""
    torch.manual_seed(4)
    b, k, d = 3, 2, 48
    reps = _unit(b * (2 + k), d)
    dims = matryoshka_dims(d)
    assert dims == [48, 32, 16, 8]
    total = matryoshka(lambda r: f2llm_loss(r, b, k, in_batch=True), reps, dims)[0]
    expected = sum(_naive_f2llm(F.normalize(reps[:, :m], dim=-1), b, k) / (n * math.sqrt(d / m))
                   for n, m in enumerate(dims, start=1))
    assert_same_sums(total.item(), expected, "matryoshka vs loop")
    assert matryoshka(lambda r: f2llm_loss(r, b, k, True), reps, [d])[0].item() == \
        f2llm_loss(reps, b, k, True)[0].item()  # one dim = the plain loss


def test_v2_distillation_is_v2s_three_means_on_the_raw_cut_teacher():
    """F2LLM v2 (utils.py, accelerate_train): F.mse_loss(q_s, q_t[..., :d]) + the same for
    positives and negatives, on RAW states: a plain loop over elements of each group, the
    teacher cut to the student's dimension and NOT renormalised; k = 0 leaves two groups."""
    torch.manual_seed(4)
    b, k, d, dt = 3, 2, 8, 12
    student, teacher = 5 * torch.randn(b * (2 + k), d), 9 * torch.randn(b * (2 + k), dt)

    def group_mse(rows):
        errors = [(float(student[i, j]) - float(teacher[i, j])) ** 2
                  for i in rows for j in range(d)]
        return sum(errors) / len(errors)
    q, p, n = range(b), range(b, 2 * b), range(2 * b, b * (2 + k))
    got = distillation_loss(student, teacher, b, k, True, "v2")
    assert_same_sums(got.item(), group_mse(q) + group_mse(p) + group_mse(n), "v2 vs loop")
    pairs = distillation_loss(student[:2 * b], teacher[:2 * b], b, 0, False, "v2")
    assert_same_sums(pairs.item(), group_mse(q) + group_mse(p), "v2 pairs vs loop")
    assert distillation_loss(teacher[:, :d], teacher, b, k, True, "v2").item() == 0
    # v2 matches norms too: the same directions at half the norm are far from the teacher
    assert distillation_loss(teacher[:, :d] / 2, teacher, b, k, True, "v2").item() > 1


def test_unit_distillation_is_the_squared_distance_of_unit_vectors():
    """unit: per sequence ||s / |s| - t_d / |t_d| ||^2 = 2 - 2 cos (D x the element mean), its
    mean over the sequences of each group, summed over the three groups; blind to norms."""
    torch.manual_seed(6)
    b, k, d, dt = 3, 2, 8, 12
    student, teacher = 5 * torch.randn(b * (2 + k), d), 9 * torch.randn(b * (2 + k), dt)
    cos = [float(F.cosine_similarity(student[i], teacher[i, :d], dim=0))
           for i in range(len(student))]
    groups = (range(b), range(b, 2 * b), range(2 * b, b * (2 + k)))
    expected = sum(sum(2 - 2 * cos[i] for i in g) / len(g) for g in groups)
    got = distillation_loss(student, teacher, b, k, True, "unit")
    assert_same_sums(got.item(), expected, "unit vs loop")
    assert distillation_loss(teacher[:, :d] / 2, teacher, b, k, True, "unit").item() < 1e-10


def test_contrastive_loss_normalises_raw_states():
    """The cached step hands the losses raw states: f2llm_loss normalises them (as v2's
    hard_loss and inbatch_loss do), so raw states and their unit vectors give one loss."""
    torch.manual_seed(7)
    b, k, d = 4, 3, 8
    raw = 7 * torch.randn(b * (2 + k), d)
    unit = F.normalize(raw, dim=-1)
    for in_batch in (False, True):
        assert_same_sums(f2llm_loss(raw, b, k, in_batch)[0], f2llm_loss(unit, b, k, in_batch)[0],
                         f"raw vs unit, in_batch={in_batch}")
    assert_same_sums(f2llm_loss(raw, b, k, True)[0].item(), _naive_f2llm(unit, b, k), "raw vs loop")


def test_kl_distillation_matches_a_loop_over_each_querys_candidates():
    """KL(teacher || student) of the cosines over [positive, hard negatives] and, for
    retrieval, the other queries' positives, both at the temperature; raw states of another
    dimension for the teacher."""
    torch.manual_seed(5)
    b, k, d, dt, t = 4, 2, 8, 12, 0.05
    student, teacher = 3 * torch.randn(b * (2 + k), d), 5 * torch.randn(b * (2 + k), dt)  # raw
    for in_batch in (False, True):
        expected = 0.0
        for i in range(b):
            candidates = [b + i] + [2 * b + i * k + j for j in range(k)]
            candidates += [b + j for j in range(b) if j != i] if in_batch else []
            s = torch.stack([F.cosine_similarity(student[i], student[c], dim=0) / t
                             for c in candidates]).log_softmax(0)
            p = torch.stack([F.cosine_similarity(teacher[i], teacher[c], dim=0) / t
                             for c in candidates]).log_softmax(0)
            expected += float((p.exp() * (p - s)).sum())
        got = distillation_loss(student, teacher, b, k, in_batch, "kl", t)
        assert_same_sums(got.item(), expected / b, f"kl vs loop, in_batch={in_batch}")
    assert distillation_loss(student, student, b, k, True, "kl").abs().item() < 1e-6
