"""I5 exact resume and crash safety in one process: SIGKILL at a step then --resume, a full disk
during a save, another config refused, LoRA with the Matryoshka loss, a SIGTERM mid-run then
the same command. A kill or a signal runs in a real process (crash_worker.py); the runs that
finish, are refused or fail with an error run train.main here (conftest.train_here: the same
weights, bit for bit, as a launched run). Several ranks: test_resume_ranks.py."""
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from conftest import ENV, ROOT, command, free_port, launch, train_here
from crash_worker import injected
from safetensors.torch import load_file
from torch.distributed.checkpoint.api import CheckpointException

pytestmark = pytest.mark.slow  # torchrun / real processes / mteb / sentence-transformers


def run(args, nproc=0, restarts=0, fault=None, check=True):
    """train.py ARGS in fresh processes: torchrun with nproc > 0, through crash_worker.py with
    a fault."""
    script = ["tests/crash_worker.py", *fault, "--"] if fault else ["train.py"]
    # the static rendezvous of a multi-node launch (--master-port), on a free port
    rendezvous = ["--master-port", free_port(), "--max-restarts", restarts]
    return launch(*script, *args, nproc=nproc, torchrun=rendezvous, timeout=240, check=check)


def args(small_demo_dir, out):
    # one token cache for every run here (keyed by data, tokenizer and length, so sharing is
    # safe): the first run tokenizes, the others memory-map its files
    return ["--size", "tiny", "--data", small_demo_dir, "--out", str(out), "--steps", "7",
            "--batch-size", "8",
            "--max-length", "48", "--save-every", "2", "--eval-every", "0", "--seed", "1",
            "--token-cache", small_demo_dir + "_tokens"]


def interrupted(args, out, nproc=0, rank=0, after=3, fault=None):
    """Start train.py ARGS (torchrun with nproc > 0; through crash_worker.py with a fault) and
    send SIGTERM to the process of `rank` alone once metrics.jsonl shows `after` steps.
    -> the finished process (stdout, stderr)."""
    rendezvous = ["--master-port", free_port(), "--max-restarts", 0]
    script = ["tests/crash_worker.py", *fault, "--"] if fault else ["train.py"]
    proc = subprocess.Popen(command(*script, *args, nproc=nproc, torchrun=rendezvous),
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics, deadline = out / "metrics.jsonl", time.time() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= after):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    os.kill(worker(proc.pid, rank) if nproc else proc.pid, signal.SIGTERM)
    proc.stdout_text, proc.stderr_text = proc.communicate(timeout=240)
    return proc


def worker(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker of global rank `rank` (a child with RANK=rank)."""
    for task in os.listdir(f"/proc/{launcher}/task"):
        with open(f"/proc/{launcher}/task/{task}/children") as f:
            for pid in f.read().split():
                with open(f"/proc/{pid}/environ", "rb") as env:
                    if f"RANK={rank}".encode() in env.read().split(b"\0"):
                        return int(pid)
    raise AssertionError(f"no worker of rank {rank} under {launcher}")


def weights(out):
    return load_file(os.path.join(out, "final", "model.safetensors"))


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, small_demo_dir):
    """One process, 7 steps, no fault."""
    root = tmp_path_factory.mktemp("clean")
    train_here(*args(small_demo_dir, root / "one"))
    return root


def test_sigkill_then_resume_is_bit_identical(tmp_path, small_demo_dir, uninterrupted):
    out = tmp_path / "run"
    proc = run(args(small_demo_dir, out), fault=["kill", "6", "0"], check=False)
    assert proc.returncode == -9  # killed at step 6, after the checkpoint of step 4
    assert not os.path.exists(out / "final")
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000002", "step_00000004"]
    # --keep-checkpoints is no math field: it may change at a resume, and prunes the older saves
    printed = train_here(*args(small_demo_dir, out), "--resume", "--keep-checkpoints", "1")
    assert "resumed from" in printed and "step_00000004" in printed
    assert_identical(weights(out), weights(uninterrupted / "one"))
    steps = [line for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 7  # the steps after the checkpoint are logged once, not twice
    assert os.listdir(out / "checkpoints") == ["step_00000007"]


def test_full_disk_during_save_keeps_the_previous_checkpoint(tmp_path, small_demo_dir,
                                                             uninterrupted):
    out = tmp_path / "run"
    with injected("save", 4, 0, args(small_demo_dir, out)), pytest.raises(
            CheckpointException, match="No space left on device"):  # DCP's, around the OSError
        train_here(*args(small_demo_dir, out))
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000002", "step_00000004.tmp"]
    train_here(*args(small_demo_dir, out), "--resume")  # from 2: the partial 4 is ignored
    assert_identical(weights(out), weights(uninterrupted / "one"))
    assert not any(name.endswith(".tmp") for name in os.listdir(out / "checkpoints"))


def test_resume_with_a_different_config_names_the_difference(tmp_path, small_demo_dir,
                                                             uninterrupted):
    shutil.copytree(uninterrupted / "one", tmp_path / "run")
    with pytest.raises(SystemExit) as refused:
        train_here(*args(small_demo_dir, tmp_path / "run"), "--resume", "--lr", "0.01",
                   "--lora-rank", "4")
    assert "lr was 0.001, now 0.01" in str(refused.value)
    # a LoRA resume of a full-finetune run is refused
    assert "lora_rank was 0, now 4" in str(refused.value)
    # without --resume: the same command of a finished run has nothing to do, another config
    # is refused, naming every difference
    with pytest.raises(SystemExit) as refused:
        train_here(*args(small_demo_dir, tmp_path / "run"), "--lr", "0.01", "--seed", "2")
    assert "holds another run" in str(refused.value)
    assert "lr was 0.001, now 0.01" in str(refused.value)
    assert "seed was 1, now 2" in str(refused.value)
    assert "is finished: its export is" in train_here(*args(small_demo_dir, tmp_path / "run"))


def test_lora_with_mrl_sigkill_then_resume_is_bit_identical(tmp_path, small_demo_dir,
                                                            uninterrupted):
    """I5 with the options on: LoRA adapters and the Matryoshka loss resume bit for bit; the
    export is merged (a plain Qwen3)."""
    options = ["--lora-rank", "4", "--mrl", "--steps", "4"]  # checkpoint at 2, killed at 4
    train_here(*args(small_demo_dir, tmp_path / "clean"), *options)
    out = tmp_path / "run"
    proc = run(args(small_demo_dir, out) + options, fault=["kill", "4", "0"], check=False)
    assert proc.returncode == -9
    train_here(*args(small_demo_dir, out), *options, "--resume")
    assert_identical(weights(out), weights(tmp_path / "clean"))
    assert not any("lora" in name for name in weights(out))
    assert any(not torch.equal(w, weights(uninterrupted / "one")[n])
               for n, w in weights(out).items())


def test_sigterm_saves_the_step_and_the_same_command_continues_bit_identical(
        tmp_path, small_demo_dir, uninterrupted):
    """A scheduler's preemption: SIGTERM mid-run finishes the step, saves it, exits 143 with
    one line naming the command; that same command (no --resume) continues and ends bit for
    bit where the uninterrupted run ends."""
    out = tmp_path / "run"
    proc = interrupted(args(small_demo_dir, out), out)
    assert proc.returncode == 143, proc.stderr_text[-2000:]
    assert "Traceback" not in proc.stderr_text
    line = next(x for x in proc.stdout_text.splitlines() if x.startswith("stopped by a signal"))
    step = int(line.split("after step ")[1].split("/")[0])
    assert 3 <= step < 7 and f"step_{step:08d}" in os.listdir(out / "checkpoints")
    assert line.endswith("continue with python train.py " + " ".join(args(small_demo_dir, out)))
    assert len((out / "metrics.jsonl").read_text().splitlines()) == step
    printed = train_here(*args(small_demo_dir, out))  # the same command
    assert "continuing the run in" in printed and f"at step {step}" in printed
    assert_identical(weights(out), weights(uninterrupted / "one"))
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 7
