"""I4: both losses equal a naive per-row loop; logits in fp32; in-batch only for retrieval."""
import math

import torch
import torch.nn.functional as F

import data as D
import train
from loss import hard_negative_loss, in_batch_loss


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
    assert abs(hard_negative_loss(q, p, n, t).item() - expected / b) < 1e-4


def test_in_batch_loss_matches_loop():
    torch.manual_seed(1)
    b, d, t = 6, 16, 0.05
    q, p = _unit(b, d), _unit(b, d)
    expected = 0.0
    for i in range(b):
        scores = [float(q[i] @ p[j]) / t for j in range(b)]
        expected += -scores[i] + math.log(sum(math.exp(s) for s in scores))
    assert abs(in_batch_loss(q, p, t).item() - expected / b) < 1e-4


def test_logits_are_fp32_for_bf16_inputs():
    torch.manual_seed(2)
    q, p, n = _unit(4, 32, dtype=torch.bfloat16), _unit(4, 32, dtype=torch.bfloat16), _unit(4, 3, 32, dtype=torch.bfloat16)
    out = hard_negative_loss(q, p, n)
    assert out.dtype == torch.float32
    ref = hard_negative_loss(q.float(), p.float(), n.float())
    assert torch.allclose(out, ref)
    assert in_batch_loss(q, p).dtype == torch.float32


def _batch(task_type, b=4, k=7):
    return D.Batch("s", task_type, ["q"] * b, ["p"] * b, [["n"] * k] * b)


def test_in_batch_negatives_only_for_retrieval():
    torch.manual_seed(3)
    b, k, d = 4, 7, 8
    reps = _unit(b * (2 + k), d)
    total, hard, in_batch = train.batch_loss(reps, _batch("retrieval", b, k), 0.05)
    assert in_batch.item() > 0 and torch.allclose(total, hard + in_batch)
    assert torch.allclose(in_batch, in_batch_loss(reps[:b], reps[b:2 * b]))
    for task_type in ("clustering", "classification"):
        kk = D.K_BY_TYPE[task_type]
        reps = _unit(b * (2 + kk), d)
        total, hard, in_batch = train.batch_loss(reps, _batch(task_type, b, kk), 0.05)
        assert in_batch.item() == 0 and torch.equal(total, hard)


def test_k_per_task_type():
    assert D.K_BY_TYPE == {"retrieval": 7, "clustering": 7, "classification": 1}
