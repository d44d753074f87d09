"""train.py with one fault injected: `python crash_worker.py FAULT STEP RANK -- train.py args`.

FAULT is `kill` (SIGKILL this process in STEP, before its update, on the first attempt only,
so a torchrun restart runs clean), `killsave` (SIGKILL it while it writes its part of the
checkpoint of STEP, first attempt only), `save` (the disk fills up while writing the checkpoint
of STEP), `nan` (the backbone's output, hence the loss, of STEP is NaN, on every rank) or
`reads` (record the keys each rank asks torch.distributed.checkpoint.load for, in
OUT/reads.{rank}.json; STEP and RANK unused) or `slow` (RANK works SLOW_SECONDS longer on
its own: before it renames the checkpoint of STEP into place and before the final export) or
`slowend` (RANK's interpreter takes 2 s to shut down, after Python's signal handlers
are gone: the window in which torchrun's SIGTERM, sent once another rank has exited, kills a
rank that kept a Python handler; STEP unused).

Only public entry points are hooked (clip_grad_norm_, the global module forward hook, the
safetensors serialisation DCP writes each rank's file with, dcp.load, os.replace), never
train.py's or runtime/checkpoint.py's own names: they may rename their internals freely."""
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import json

import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp

import train

fault, at_step, at_rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
argv = sys.argv[sys.argv.index("--") + 1:]
rank = int(os.environ.get("RANK", "0"))
first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0
steps_computed = 0  # train.py clips the gradient once per step, skipped steps included
real_clip, real_load = torch.nn.utils.clip_grad_norm_, dcp.load
real_serialise = safetensors.torch.save
real_replace = os.replace
SLOW_SECONDS = 8


def clip_grad_norm_(*args, **kwargs):
    global steps_computed
    steps_computed += 1
    if fault == "kill" and steps_computed == at_step and rank == at_rank and first_attempt:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_clip(*args, **kwargs)


def serialise(*args, **kwargs):
    """DCP serialises a rank's tensors with its shard file already open (empty so far): the
    checkpoint of step STEP is written after STEP's clip."""
    if steps_computed == at_step and rank == at_rank:
        if fault == "save":
            raise OSError(28, "No space left on device")
        if fault == "killsave" and first_attempt:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_serialise(*args, **kwargs)


def load(state_dict, *args, **kwargs):
    if fault == "reads":
        out = argv[argv.index("--out") + 1]
        with open(os.path.join(out, f"reads.{rank}.json"), "w") as f:
            json.dump(sorted(state_dict), f)
    return real_load(state_dict, *args, **kwargs)


def nan_output(module, inputs, output):
    """The backbone's hidden states in STEP's forwards become NaN (layers return tuples or
    tensors; the backbone returns a ModelOutput with last_hidden_state)."""
    if fault == "nan" and steps_computed == at_step - 1 and hasattr(output, "last_hidden_state"):
        output.last_hidden_state = output.last_hidden_state * float("nan")
    return output


def replace(src, dst, *args, **kwargs):
    """A slow filesystem on one rank: the renames that put a checkpoint and the export in place."""
    if fault == "slow" and rank == at_rank and (str(dst).endswith(f"step_{at_step:08d}")
                                                or os.path.basename(str(dst)) == "final"):
        time.sleep(SLOW_SECONDS)
    return real_replace(src, dst, *args, **kwargs)


class SlowEnd:
    """Freed with this module's globals, late in the interpreter's shutdown: after it has put
    back the default action of every signal that had a Python handler."""
    def __del__(self, sleep=time.sleep):  # the module's names are gone by then
        sleep(2)


slow_end = SlowEnd() if fault == "slowend" and rank == at_rank else None
torch.nn.utils.clip_grad_norm_, dcp.load, os.replace = clip_grad_norm_, load, replace
safetensors.torch.save = serialise
torch.nn.modules.module.register_module_forward_hook(nan_output)
train.main(argv)
