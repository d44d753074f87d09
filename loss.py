"""The F2LLM contrastive losses: pure tensor functions, no state.

- `scores`: the one function that scores each query's candidates, used by every loss below.
- `hard_negative_loss`: each query against [its positive, its own k hard negatives],
  cross-entropy with the positive at index 0 (every task type).
- `in_batch_loss`: each query against the positives of the WHOLE global batch, gathered
  from all ranks WITH gradient, its own positive as label (retrieval data only).
- `f2llm_loss`: the recipe's total on one rank's reps [queries; positives; negatives]:
  hard-negative (k >= 1) + in-batch (retrieval only).
- `matryoshka`: F2LLM v2's Matryoshka loss: a loss summed over nested prefixes of the reps.
- `distillation_loss`: a teacher's cached states of the same sequences -> "v2" (F2LLM v2's
  MSE on the raw last-token states), "unit" (squared distance of the unit vectors) or "kl"
  (score distillation over each query's candidates, as FlagEmbedding and Tevatron offer).
- gather="detached" reproduces the official code's in-batch gather, which carries no gradient:
  on more than one process no positive gets an in-batch gradient, not even its own rank's.
The losses take the raw pooled states the cached step holds and L2-normalise them, as F2LLM
v2's utils.py does (unit vectors pass unchanged), so q @ p is the cosine; logits are fp32 /
temperature. Only distillation mode "v2" compares the raw states themselves.
Each loss is the mean over this rank's queries; DDP's gradient average over ranks then
makes the gradient that of the mean over the global batch (docs/design.md I1).
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

TEMPERATURE = 0.05
IN_BATCH_TYPES = {"retrieval"}  # other queries' positives are false negatives elsewhere


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums every rank's gradient w.r.t. the gathered tensor
    and keeps this rank's slice. all_reduce + slice instead of reduce_scatter: gloo (CPU)
    has no reduce_scatter."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)  # (world * b, D), rank order

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        b = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * b: (dist.get_rank() + 1) * b]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_detached(x: torch.Tensor) -> torch.Tensor:
    """The official code's gather: (b, D) -> (world * b, D) with no gradient to any rank's rows
    (its own included); with one process, x itself (gradient intact)."""
    if not _distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(b, D) on each rank -> (world * b, D) = [rank 0 rows, rank 1 rows, ...]."""
    return _GatherWithGrad.apply(x) if _distributed() else x


def scores(query, positive, negatives=None, in_batch: bool = False,
           temperature: float = TEMPERATURE, gather: str = "autograd"):
    """The one place the losses score candidates (the contrastive terms, kl distillation), so a
    variant that scores differently (a margin, another similarity) changes only this. query,
    positive (b, D), negatives (b, k, D) or None, raw or unit -> (hard (b, 1 + k): each query
    against [its positive, its negatives], or None; in-batch (b, world * b): against every
    rank's positives laid out [rank 0, rank 1, ...], or None unless in_batch), cosines in fp32
    / temperature. gather: "autograd" (the recipe) or "detached" (the official code's)."""
    query, positive = F.normalize(query.float(), dim=-1), F.normalize(positive.float(), dim=-1)
    hard = None
    if negatives is not None:
        candidates = torch.cat([positive[:, None], F.normalize(negatives.float(), dim=-1)],
                               dim=1)  # (b, 1 + k, D)
        hard = torch.einsum("bd,bcd->bc", query, candidates) / temperature  # (b, 1 + k)
    if not in_batch:
        return hard, None
    all_positives = (gather_with_grad if gather == "autograd" else gather_detached)(
        positive)  # (world * b, D)
    return hard, query @ all_positives.T / temperature  # (b, world * b)


def _own_columns(query) -> torch.Tensor:
    """(b,) the column of each query's own positive among the gathered ones: rank * b + i."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return rank * len(query) + torch.arange(len(query), device=query.device)


def hard_negative_loss(query, positive, negatives, temperature: float = TEMPERATURE):
    """query (b, D), positive (b, D), negatives (b, k, D), raw or unit -> scalar."""
    logits, _ = scores(query, positive, negatives, temperature=temperature)  # (b, 1 + k)
    labels = torch.zeros(len(query), dtype=torch.long, device=query.device)
    return F.cross_entropy(logits, labels)


def in_batch_loss(query, positive, temperature: float = TEMPERATURE, gather: str = "autograd"):
    """query (b, D), positive (b, D) of this rank -> scalar. Candidates are the positives of
    all ranks laid out [rank 0, rank 1, ...]; query i of rank r has label r * b + i.
    gather: "autograd" (the recipe) or "detached" (the official code's, an ablation)."""
    _, logits = scores(query, positive, None, True, temperature, gather)  # (b, world * b)
    return F.cross_entropy(logits, _own_columns(query))


def f2llm_loss(reps, b: int, k: int, in_batch: bool, temperature: float = TEMPERATURE,
               gather: str = "autograd"):
    """reps (S, D) = [b queries; b positives; b * k negatives, query by query] of this rank
    -> (total, hard, in-batch). k = 0 (pairs only) has no hard term; in_batch is True for
    retrieval data only (elsewhere other queries' positives would be false negatives)."""
    query, positive = reps[:b], reps[b:2 * b]  # (b, D) each
    hard, others = scores(query, positive, reps[2 * b:].view(b, k, -1) if k else None, in_batch,
                          temperature, gather)  # (b, 1 + k), (b, world * b)
    zero = torch.zeros((), device=reps.device)
    hard_term = F.cross_entropy(hard, torch.zeros_like(hard[:, 0], dtype=torch.long)) if k else zero
    in_batch_term = F.cross_entropy(others, _own_columns(query)) if in_batch else zero
    return hard_term + in_batch_term, hard_term, in_batch_term


def matryoshka_dims(dim: int) -> list[int]:
    """F2LLM v2's nested dimensions, largest first: dim, then the powers of two below it,
    down to 8."""
    return [dim] + [2 ** i for i in range(dim.bit_length() - 1, 2, -1) if 2 ** i < dim]


def matryoshka(loss_fn, reps, dims: list[int]):
    """sum over dims (largest first, n = 1, 2, ...) of loss_fn(the first `dim` components of
    reps, renormalised) / (n * sqrt(D / dim)), term by term: F2LLM v2's weighting. reps (S, D)."""
    total = None
    for n, dim in enumerate(dims, start=1):
        weight = 1.0 / (n * (reps.shape[1] / dim) ** 0.5)
        terms = loss_fn(F.normalize(reps[:, :dim], dim=-1))
        weighted = [w * weight for w in terms]
        total = weighted if total is None else [t + w for t, w in zip(total, weighted)]
    return tuple(total)


KD_MODES = ("v2", "unit", "kl")


def candidate_logits(reps, b: int, k: int, in_batch: bool, temperature: float,
                     gather: str = "autograd"):
    """One rank's reps [queries; positives; negatives] -> (b, 1 + k [+ world * b - 1]) logits
    of each query against its positive (column 0), its k hard negatives and, with in_batch,
    the other positives of the global batch (its own positive is not repeated): `scores`'
    two tables side by side."""
    query, positive = reps[:b], reps[b:2 * b]  # (b, D) each
    hard, others = scores(query, positive, reps[2 * b:].view(b, k, reps.shape[1]), in_batch,
                          temperature, gather)  # (b, 1 + k), (b, world * b)
    if not in_batch:
        return hard
    own = torch.zeros_like(others, dtype=torch.bool)
    own[torch.arange(b), _own_columns(query)] = True
    return torch.cat([hard, others[~own].view(b, -1)], dim=1)  # (b, 1 + k + world * b - 1)


def distillation_loss(student, teacher, b: int, k: int, in_batch: bool, mode: str,
                      temperature: float = TEMPERATURE, gather: str = "autograd"):
    """student (S, D) raw last-token states with grad, teacher (S, D_t) raw states of the same
    sequences, no grad -> scalar. Rows are [b queries; b positives; b * k negatives].
    v2: F2LLM v2's term (its utils.py, accelerate_train): F.mse_loss(queries) +
      F.mse_loss(positives) + F.mse_loss(negatives) of the RAW states, each a mean over
      elements, the teacher cut to its first D components (D_t >= D), not renormalised. It
      matches norms as well as directions, at the scale of the hidden states.
    unit: the same three groups on unit vectors (the cut teacher renormalised), each the mean
      over sequences of ||s - t||^2 = 2 - 2 cos: D times the element mean, so that weight 1
      is on the scale of the contrastive loss (measured in docs/differences.md).
    kl: KL(teacher || student) of the softmax over each query's candidates (candidate_logits),
      both at the training temperature, averaged over queries."""
    groups = [slice(0, b), slice(b, 2 * b)] + ([slice(2 * b, None)] if k else [])
    if mode == "v2":
        target = teacher[:, :student.shape[1]].float()  # (S, D), not renormalised
        return sum(F.mse_loss(student[g].float(), target[g]) for g in groups)
    if mode == "unit":
        s = F.normalize(student.float(), dim=-1)  # (S, D)
        t = F.normalize(teacher[:, :student.shape[1]].float(), dim=-1)  # (S, D)
        return sum(((s[g] - t[g]) ** 2).sum(-1).mean() for g in groups)
    if mode != "kl":
        raise ValueError(f"distillation mode {mode!r}: use one of {KD_MODES}")
    s = candidate_logits(student, b, k, in_batch, temperature, gather)
    t = candidate_logits(teacher.float(), b, k, in_batch, temperature, "detached")
    return F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), log_target=True,
                    reduction="batchmean")
