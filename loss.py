"""The F2LLM contrastive losses: pure tensor functions, no state.

- `hard_negative_loss`: each query against [its positive, its own k hard negatives],
  cross-entropy with the positive at index 0 (every task type).
- `in_batch_loss`: each query against the positives of the WHOLE global batch, gathered
  from all ranks WITH gradient, its own positive as label (retrieval data only).
- `f2llm_loss`: the recipe's total on one rank's reps [queries; positives; negatives]:
  hard-negative (k >= 1) + in-batch (retrieval only).
Embeddings come in L2-normalised, so q @ p is the cosine; logits are fp32 / temperature.
Each loss is the mean over this rank's queries; DDP's gradient average over ranks then
makes the gradient that of the mean over the global batch (DESIGN I1).
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

TEMPERATURE = 0.05


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


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(b, D) on each rank -> (world * b, D) = [rank 0 rows, rank 1 rows, ...]."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def hard_negative_loss(query, positive, negatives, temperature: float = TEMPERATURE):
    """query (b, D), positive (b, D), negatives (b, k, D) -> scalar."""
    candidates = torch.cat([positive[:, None], negatives], dim=1)  # (b, 1 + k, D)
    logits = torch.einsum("bd,bcd->bc", query.float(), candidates.float()) / temperature  # (b, 1 + k)
    labels = torch.zeros(len(query), dtype=torch.long, device=query.device)
    return F.cross_entropy(logits, labels)


def in_batch_loss(query, positive, temperature: float = TEMPERATURE):
    """query (b, D), positive (b, D) of this rank -> scalar. Candidates are the positives of
    all ranks laid out [rank 0, rank 1, ...]; query i of rank r has label r * b + i."""
    all_positives = gather_with_grad(positive.float())  # (world * b, D)
    logits = query.float() @ all_positives.T / temperature  # (b, world * b)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    labels = rank * len(query) + torch.arange(len(query), device=query.device)
    return F.cross_entropy(logits, labels)


def f2llm_loss(reps, b: int, k: int, in_batch: bool, temperature: float = TEMPERATURE):
    """reps (S, D) = [b queries; b positives; b * k negatives, query by query] of this rank
    -> (total, hard, in-batch). k = 0 (pairs only) has no hard term; in_batch is True for
    retrieval data only (elsewhere other queries' positives would be false negatives)."""
    query, positive = reps[:b], reps[b:2 * b]  # (b, D) each
    zero = torch.zeros((), device=reps.device)
    hard = hard_negative_loss(query, positive, reps[2 * b:].view(b, k, -1), temperature) if k else zero
    in_batch_term = in_batch_loss(query, positive, temperature) if in_batch else zero
    return hard + in_batch_term, hard, in_batch_term
