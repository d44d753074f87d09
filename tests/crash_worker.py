"""train.py with one fault injected: `python crash_worker.py FAULT STEP RANK -- train.py args`.

FAULT is `kill` (SIGKILL this process when it reaches STEP, on the first attempt only, so
a torchrun restart runs clean), `save` (the disk fills up while writing the checkpoint of
STEP) or `nan` (the loss of STEP is NaN, on every rank)."""
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
calls = {"step": 0}

real_step, real_save, real_loss = train.cached_step, torch.save, train.f2llm_loss


def cached_step(*args, **kwargs):
    calls["step"] += 1
    if fault == "kill" and calls["step"] == at_step and rank == at_rank and first_attempt:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_step(*args, **kwargs)


def save(obj, path, *args, **kwargs):
    if fault == "save" and isinstance(obj, dict) and obj.get("step") == at_step:
        with open(path, "wb") as f:
            f.write(b"\0" * 1000)  # a partial file, then the disk is full
        raise OSError(28, "No space left on device", str(path))
    return real_save(obj, path, *args, **kwargs)


def f2llm_loss(*args, **kwargs):
    total, hard, in_batch = real_loss(*args, **kwargs)
    if fault == "nan" and calls["step"] == at_step:
        total = total * float("nan")
    return total, hard, in_batch


train.cached_step, train.torch.save, train.f2llm_loss = cached_step, save, f2llm_loss
train.main(argv)
