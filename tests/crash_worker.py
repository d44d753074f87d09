"""train.py with one fault injected: `python crash_worker.py FAULT STEP RANK -- train.py args`.

FAULT is `kill` (SIGKILL this process in STEP, before its update, on the first attempt only,
so a torchrun restart runs clean), `save` (the disk fills up while writing the checkpoint of
STEP) or `nan` (the backbone's output, hence the loss, of STEP is NaN, on every rank).

Only public torch entry points are hooked (torch.save, clip_grad_norm_, the global module
forward hook), never train.py's own names: train.py may rename its internals freely."""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import train  # noqa: E402

fault, at_step, at_rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
argv = sys.argv[sys.argv.index("--") + 1:]
rank = int(os.environ.get("RANK", "0"))
first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0
steps_computed = 0  # train.py clips the gradient once per step, skipped steps included
real_clip, real_save = torch.nn.utils.clip_grad_norm_, torch.save


def clip_grad_norm_(*args, **kwargs):
    global steps_computed
    steps_computed += 1
    if fault == "kill" and steps_computed == at_step and rank == at_rank and first_attempt:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_clip(*args, **kwargs)


def save(obj, path, *args, **kwargs):
    if fault == "save" and isinstance(obj, dict) and obj.get("step") == at_step:
        with open(path, "wb") as f:
            f.write(b"\0" * 1000)  # a partial file, then the disk is full
        raise OSError(28, "No space left on device", str(path))
    return real_save(obj, path, *args, **kwargs)


def nan_output(module, inputs, output):
    """The backbone's hidden states in STEP's forwards become NaN (layers return tuples or
    tensors; the backbone returns a ModelOutput with last_hidden_state)."""
    if fault == "nan" and steps_computed == at_step - 1 and hasattr(output, "last_hidden_state"):
        output.last_hidden_state = output.last_hidden_state * float("nan")
    return output


torch.nn.utils.clip_grad_norm_, torch.save = clip_grad_norm_, save
torch.nn.modules.module.register_module_forward_hook(nan_output)
train.main(argv)
