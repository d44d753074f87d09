"""The processes of a run (torchrun's ranks): the process group, DDP as the cached step needs
it (gradients in the bucket views, kept there between steps), rank-0 printing, barriers that
outlast NCCL's watchdog, and the clean exit. Importing
this file does nothing; train.py, tools/gpu_check.py and the tests call these."""
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


def restarted_by_torchrun() -> bool:
    """torchrun --max-restarts N restarts every rank after a failure: continue, no flag needed."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def setup_distributed(timeout_s: int = 0):
    """torchrun sets RANK/WORLD_SIZE: nccl on GPU, gloo on CPU; plain python = one process.
    timeout_s: how long a collective may wait for every rank (0: torch's, 10 minutes for
    NCCL's watchdog, 30 for gloo); work a rank does alone waits in wait_for_every_rank."""
    if "RANK" not in os.environ:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return 0, 1, device
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    # torchrun restarts reuse one rendezvous store, so the keys of a failed attempt (the gloo
    # addresses of dead ranks) would be read by the new ranks: one key prefix per attempt
    store, rank, world = next(dist.rendezvous("env://", timeout=timedelta(minutes=30)))
    store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store,
                            rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s) if timeout_s else None)
    return rank, world, device


def wrap_ddp(backbone, device, **kwargs) -> DDP:
    """gradient_as_bucket_view: the gradients live in DDP's buckets, saving one model-sized
    copy. broadcast_buffers=False: Qwen3's only buffer (rotary frequencies) is a constant, and
    a broadcast per forward would be one collective per chunk (ranks may differ in chunks).
    DDP points a .grad at its bucket only if it exists when DDP is built (or at the first
    synced backward, after the no_sync chunks of step 1 have accumulated into fresh tensors):
    zero gradients made here make step 1 accumulate in the buckets too; train.optimizer_step
    keeps them."""
    for p in backbone.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)  # copied into the bucket view, then freed
    return DDP(backbone, device_ids=[device.index] if device.type == "cuda" else None,
               gradient_as_bucket_view=True, broadcast_buffers=False, **kwargs)


def use_expandable_segments() -> str | None:
    """PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True unless the user set the variable: chunks
    of varying size then grow and shrink one segment instead of fragmenting cached blocks (the
    plan leaves 7.65 GiB of an 80 GB card for that). Set before CUDA starts; -> the note."""
    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ:
        return None
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    return ("allocator: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (set by train.py; "
            "set the variable yourself to choose otherwise)")


def barrier():
    if dist.is_initialized():
        dist.barrier()


_barriers = 0  # store barriers this process has passed: every rank passes the same ones in order


def wait_for_every_rank(tag: str, timeout: timedelta = timedelta(hours=6)) -> None:
    """A barrier on the rendezvous store, not a collective: while one rank works alone (a
    node downloading or tokenizing, rank 0 writing the final export or renaming and pruning a
    checkpoint) the others wait here, for up to `timeout`, where NCCL's watchdog would stop
    them after 10 minutes in a collective (docs/design.md §8). The last rank to arrive sets a
    key the others block on (no polling: no added latency). A rank waiting longer exits naming
    `tag`."""
    global _barriers
    if not dist.is_initialized():
        return
    _barriers += 1
    store = dist.distributed_c10d._get_default_store()
    key = f"barrier/{_barriers}/{tag}"  # unique per barrier: a key's count only grows
    if store.add(key, 1) == dist.get_world_size():
        store.set(key + "/all", "1")
    try:
        store.wait([key + "/all"], timeout)
    except dist.DistStoreError:  # the store's timeout
        raise SystemExit(f"train.py: error: rank {dist.get_rank()} waited {timeout} for every "
                         f"rank at {tag!r}; a rank died or is stuck (see its log)") from None


def teardown(timeout: timedelta = timedelta(hours=6)):
    """Close the process group once every rank is done with it: first a store barrier (rank 0
    may still be writing the final export, for longer than a collective may wait), then a
    collective one, instant now that all are there. Without it, a rank that closes its gloo
    connections while another still holds them (DDP) makes that one abort at exit,
    'terminate called without an active exception' (1 run in 5, torch 2.13)."""
    if dist.is_initialized():
        wait_for_every_rank("the end of the run", timeout)
        dist.barrier()
        dist.destroy_process_group()


def print0(*args, **kwargs) -> None:
    """print on global rank 0 only (torchrun sets RANK; a plain process is rank 0)."""
    if os.environ.get("RANK", "0") == "0":
        print(*args, **kwargs)
