"""train.py's own loop with two things watched: `python step_worker.py OUT -- train.py args`,
under torchrun. Writes OUT.rank{R}.json:

- `accumulations`: every gradient accumulation (a post-accumulate-grad hook per parameter) as
  [step, parameter, whether its .grad IS the view DDP's bucket holds for it (data_ptr equal to
  the view the comm hook sees that step)];
- `steps`: per step, the host syncs (SyncCounter below) outside the backbone's forward, those
  inside it (by file), and the all-reduces that are not DDP's gradient buckets.

Step k runs from one clip_grad_norm_ call (train.py clips once per step) to the next. Only
public torch entry points are hooked (DDP.__init__, clip_grad_norm_, dist.all_reduce, global
module hooks), never train.py's own names."""
import gc
import json
import os
import sys
import threading
import traceback

gc.disable()  # as train.py: the imports' objects are frozen out of every collection
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train

gc.freeze()
gc.enable()

out, argv = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
step = 1  # the step being computed: 1 + clip_grad_norm_ calls so far
in_forward = 0  # depth of module forwards running (the backbone and its layers)
in_comm_hook = False
accumulations, views, steps = [], {}, {}


def record(kind, where=""):
    if threading.current_thread() is threading.main_thread():
        s = steps.setdefault(step, dict(syncs=[], forward_syncs=[], all_reduces=0))
        if kind == "sync":
            s["forward_syncs" if in_forward else "syncs"].append(where)
        else:
            s["all_reduces"] += 1


def caller() -> str:
    """file:line of the nearest frame outside torch's and this file's (who asked for the value)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in frame.filename and frame.filename != __file__:
            return f"{os.path.basename(frame.filename)}:{frame.lineno}"
    return "?"


def optimizer_step_count() -> bool:
    """torch's optimizers read their step count with .item() (optimizer._get_value): a tensor
    kept on the CPU on every device (capturable=False), so no device sync."""
    return any(f.name == "_get_value" and f.filename.endswith("optim/optimizer.py")
               for f in traceback.extract_stack()[-8:])


class SyncCounter(TorchDispatchMode):
    """Host syncs as a CUDA run would have them: `.item()`, `float(t)`, `bool(t)` (all reach
    aten._local_scalar_dense), copies from a device to the CPU (aten._to_copy / copy_), and
    `.tolist()` / `.numpy()`, which dispatch no op: patched below to report themselves. On a
    CPU every tensor is a host tensor, so every tolist counts: stricter than a GPU. Not
    counted: the optimizer's step count (optimizer_step_count)."""
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func is torch.ops.aten._local_scalar_dense.default and not optimizer_step_count():
            record("sync", caller())
        elif func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst = args[0] if func is torch.ops.aten.copy_.default else result
            if src.device.type != "cpu" and dst.device.type == "cpu":
                record("sync", caller())
        return result


def counted(method):
    def wrapper(self, *args, **kwargs):
        record("sync", caller())
        return method(self, *args, **kwargs)
    return wrapper


torch.Tensor.tolist = counted(torch.Tensor.tolist)
torch.Tensor.numpy = counted(torch.Tensor.numpy)
real_clip, real_all_reduce, real_ddp_init = (torch.nn.utils.clip_grad_norm_, dist.all_reduce,
                                             DDP.__init__)


def clip_grad_norm_(*args, **kwargs):
    global step
    result = real_clip(*args, **kwargs)
    step += 1
    return result


def all_reduce(*args, **kwargs):
    if not in_comm_hook:
        record("all_reduce")
    return real_all_reduce(*args, **kwargs)


def ddp_init(self, module, *args, **kwargs):
    """DDP as train.py builds it, plus the watch: the bucket view of each parameter each step
    (a comm hook that all-reduces as DDP's own does), and every accumulation into .grad."""
    real_ddp_init(self, module, *args, **kwargs)
    names = {id(p): n for n, p in module.named_parameters()}

    def hook(state, bucket):
        global in_comm_hook
        for p, g in zip(bucket.parameters(), bucket.gradients()):
            views.setdefault(step, {})[names[id(p)]] = g.data_ptr()
        in_comm_hook = True
        try:
            return default_hooks.allreduce_hook(None, bucket)
        finally:
            in_comm_hook = False
    self.register_comm_hook(None, hook)
    for name, p in module.named_parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(
                lambda p, name=name: accumulations.append((step, name, p.grad.data_ptr())))


def enter(module, inputs):
    global in_forward
    in_forward += 1


def leave(module, inputs, output):
    global in_forward
    in_forward -= 1


torch.nn.utils.clip_grad_norm_, dist.all_reduce = clip_grad_norm_, all_reduce
DDP.__init__ = ddp_init
torch.nn.modules.module.register_module_forward_pre_hook(enter)
torch.nn.modules.module.register_module_forward_hook(leave)
rank = int(os.environ["RANK"])
with SyncCounter():
    train.main(argv)
with open(f"{out}.rank{rank}.json", "w") as f:
    json.dump(dict(accumulations=[(s, n, views.get(s, {}).get(n) == ptr)
                                  for s, n, ptr in accumulations], steps=steps), f)
