"""train.py with one fault injected: `python crash_worker.py FAULT STEP RANK -- train.py args`,
or in a test's own process `with injected(FAULT, STEP, RANK, argv): train.main(argv)` for a
fault that does not end the process (`save`, `nan`).

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
import contextlib
import gc
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
gc.disable()  # as train.py: the imports' objects are frozen out of every collection
import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp

import train

gc.freeze()
gc.enable()

SLOW_SECONDS = 8


class Fault:
    """The hooks of one fault. train.py clips the gradient once per step, skipped steps
    included: the clips count the steps computed."""

    def __init__(self, fault: str, at_step: int, at_rank: int, argv: list):
        self.fault, self.at_step, self.at_rank, self.argv = fault, at_step, at_rank, argv
        self.rank = int(os.environ.get("RANK", "0"))
        self.first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0
        self.steps_computed = 0
        self.real = dict(clip=torch.nn.utils.clip_grad_norm_, load=dcp.load,
                         serialise=safetensors.torch.save, replace=os.replace)

    def clip_grad_norm_(self, *args, **kwargs):
        self.steps_computed += 1
        if (self.fault == "kill" and self.steps_computed == self.at_step
                and self.rank == self.at_rank and self.first_attempt):
            os.kill(os.getpid(), signal.SIGKILL)
        return self.real["clip"](*args, **kwargs)

    def serialise(self, *args, **kwargs):
        """DCP serialises a rank's tensors with its shard file already open (empty so far):
        the checkpoint of step STEP is written after STEP's clip."""
        if self.steps_computed == self.at_step and self.rank == self.at_rank:
            if self.fault == "save":
                raise OSError(28, "No space left on device")
            if self.fault == "killsave" and self.first_attempt:
                os.kill(os.getpid(), signal.SIGKILL)
        return self.real["serialise"](*args, **kwargs)

    def load(self, state_dict, *args, **kwargs):
        if self.fault == "reads":
            out = self.argv[self.argv.index("--out") + 1]
            with open(os.path.join(out, f"reads.{self.rank}.json"), "w") as f:
                json.dump(sorted(state_dict), f)
        return self.real["load"](state_dict, *args, **kwargs)

    def nan_output(self, module, inputs, output):
        """The backbone's hidden states in STEP's forwards become NaN (layers return tuples or
        tensors; the backbone returns a ModelOutput with last_hidden_state)."""
        if (self.fault == "nan" and self.steps_computed == self.at_step - 1
                and hasattr(output, "last_hidden_state")):
            output.last_hidden_state = output.last_hidden_state * float("nan")
        return output

    def replace(self, src, dst, *args, **kwargs):
        """A slow filesystem on one rank: the renames that put a checkpoint and the export in
        place."""
        if self.fault == "slow" and self.rank == self.at_rank and (
                str(dst).endswith(f"step_{self.at_step:08d}")
                or os.path.basename(str(dst)) == "final"):
            time.sleep(SLOW_SECONDS)
        return self.real["replace"](src, dst, *args, **kwargs)

    def install(self):
        torch.nn.utils.clip_grad_norm_, dcp.load = self.clip_grad_norm_, self.load
        safetensors.torch.save, os.replace = self.serialise, self.replace
        self.hook = torch.nn.modules.module.register_module_forward_hook(self.nan_output)
        return self

    def remove(self):
        self.hook.remove()
        torch.nn.utils.clip_grad_norm_, dcp.load = self.real["clip"], self.real["load"]
        safetensors.torch.save, os.replace = self.real["serialise"], self.real["replace"]


@contextlib.contextmanager
def injected(fault: str, at_step: int, at_rank: int, argv: list):
    """The fault's hooks for the duration of the block, in this process."""
    hooks = Fault(fault, at_step, at_rank, [str(a) for a in argv]).install()
    try:
        yield hooks
    finally:
        hooks.remove()


class SlowEnd:
    """Freed with this module's globals, late in the interpreter's shutdown: after it has put
    back the default action of every signal that had a Python handler."""
    def __del__(self, sleep=time.sleep):  # the module's names are gone by then
        sleep(2)


if __name__ == "__main__":
    fault, at_step, at_rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    argv = sys.argv[sys.argv.index("--") + 1:]
    slow_end = SlowEnd() if fault == "slowend" and int(os.environ.get("RANK", "0")) == at_rank \
        else None
    Fault(fault, at_step, at_rank, argv).install()
    train.main(argv)
