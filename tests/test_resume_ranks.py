"""I5 on several ranks, with real torchrun processes: 1 and 2 ranks end with the same weights, a
torchrun restart after a rank dies while it writes a checkpoint, a resume on another world
size, a NaN loss, a SIGTERM to one rank then the same command, a slow rank 0 under a short
collective timeout. One process: test_resume.py, whose helpers these tests share."""
import json
import os
import shutil

import pytest
import torch
from conftest import train_here
from crash_worker import injected
from test_resume import args, assert_identical, interrupted, run, weights

pytestmark = pytest.mark.slow  # torchrun / real processes / mteb / sentence-transformers


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, small_demo_dir):
    """One process and two processes, 7 steps, no fault."""
    root = tmp_path_factory.mktemp("clean")
    train_here(*args(small_demo_dir, root / "one"))
    run(args(small_demo_dir, root / "two"), nproc=2)
    return root


def test_two_processes_end_with_the_one_process_weights(uninterrupted):
    """I1 on the command line: same weights from 1 and 2 ranks, up to float32 rounding."""
    a, b = weights(uninterrupted / "one"), weights(uninterrupted / "two")
    # Adam turns float32 rounding of a near-zero gradient into up to an lr-sized (1e-3)
    # step; a real bug (a dropped gradient term) moves most weights by that much.
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-4)


def test_torchrun_restart_after_a_kill_during_a_save(tmp_path, small_demo_dir, uninterrupted):
    """Rank 1 is SIGKILLed on the first attempt while it writes its part of step 4's checkpoint
    (DCP; rank 0 may have written its own): step_4 stays a .tmp, --max-restarts 1 restarts both
    ranks, which continue, without a flag, from step 2 and end bit-identical."""
    out = tmp_path / "run"
    proc = run(args(small_demo_dir, out), nproc=2, restarts=1, fault=["killsave", "4", "1"])
    assert "resumed from" in proc.stdout and "step_00000002 at step 2" in proc.stdout
    assert_identical(weights(out), weights(uninterrupted / "two"))
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000006", "step_00000007"]


def from_step_6(run_folder, to):
    """A copy of a finished run as it was after the checkpoint of step 6."""
    shutil.copytree(run_folder, to)
    shutil.rmtree(to / "checkpoints" / "step_00000007")
    shutil.rmtree(to / "final")
    return to


def test_resume_on_another_world_size_lands_where_that_world_lands(tmp_path, small_demo_dir,
                                                                   uninterrupted):
    """Item 4: the checkpoint of 2 ranks (each holding half the AdamW state) resumed by 1, and
    of 1 resumed by 2, end where an uninterrupted run of the new world ends (I1's float32
    tolerance). On 2 ranks each parameter's state is read by exactly one rank, its owner."""
    out = from_step_6(uninterrupted / "two", tmp_path / "two_to_one")
    assert "step_00000006 at step 6 (saved by 2 ranks)" in train_here(
        *args(small_demo_dir, out), "--resume")
    for name, w in weights(uninterrupted / "one").items():
        torch.testing.assert_close(weights(out)[name], w, rtol=1e-3, atol=1e-4)
    out = from_step_6(uninterrupted / "one", tmp_path / "one_to_two")
    proc = run(args(small_demo_dir, out) + ["--resume"], nproc=2, fault=["reads", "0", "0"])
    assert "step_00000006 at step 6 (saved by 1 rank)" in proc.stdout
    for name, w in weights(uninterrupted / "two").items():
        torch.testing.assert_close(weights(out)[name], w, rtol=1e-3, atol=1e-4)
    reads = [set(json.loads((out / f"reads.{r}.json").read_text())) for r in (0, 1)]
    optim = [{k for k in keys if k.startswith("optim.")} for keys in reads]
    model = {"model." + name for name in weights(out)}  # the export names the same weights
    # rank 1 had no twin in the saved world: it takes rank 0's RNG (every rank seeds alike)
    assert reads[0] - optim[0] == reads[1] - optim[1] == model | {"rng.0.cpu"}
    assert optim[0] and optim[1] and not optim[0] & optim[1]
    assert {k[len("optim."):] for k in optim[0] | optim[1]} == {
        f"{name}.{state}" for name in weights(out) for state in ("step", "exp_avg", "exp_avg_sq")}
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 7


def test_nan_loss_never_reaches_the_weights(tmp_path, small_demo_dir):
    out = tmp_path / "run"
    proc = run(args(small_demo_dir, out), nproc=2, fault=["nan", "3", "0"])
    assert "step 3: non-finite loss or gradient, update skipped" in proc.stdout
    for name, w in weights(out).items():
        assert torch.isfinite(w).all(), name
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lrs[2] == lrs[1]  # the skipped step did not advance the schedule either
    one = args(small_demo_dir, tmp_path / "r2") + ["--max-bad-steps", "1"]  # one process
    with injected("nan", 3, 0, one), pytest.raises(
            SystemExit, match=r"1 non-finite steps in a row \(--max-bad-steps\)"):
        train_here(*one)
    assert not os.path.exists(tmp_path / "r2" / "final")


def test_sigterm_to_one_rank_stops_both_then_a_slow_rank_0_outlasts_the_timeout(
        tmp_path, small_demo_dir, uninterrupted):
    """2 gloo ranks, SIGTERM to rank 1 only: the ranks agree at the step's all-reduce, both
    save the same step and exit 143, rank 0 too though its shutdown is slow (torchrun sends it
    SIGTERM when rank 1 exits). The same command continues with collectives limited to 4 s
    while rank 0 spends 8 s alone renaming the last checkpoint and then the export: the others
    wait on the store, not in a collective, so no rank is killed; bit-identical."""
    out = tmp_path / "run"
    timeout = ["--collective-timeout", "4"]
    proc = interrupted(args(small_demo_dir, out) + timeout, out, nproc=2, rank=1,
                       fault=["slowend", "0", "0"])
    assert proc.returncode != 0  # torchrun reports its workers' 143 as a failure
    assert proc.stderr_text.count("exitcode  : 143") == 2, proc.stderr_text[-3000:]
    line = next(x for x in proc.stdout_text.splitlines() if x.startswith("stopped by a signal"))
    assert "continue with the same torchrun command (train.py --size tiny" in line
    step = int(line.split("after step ")[1].split("/")[0])
    assert latest_step(out) == step < 7
    proc = run(args(small_demo_dir, out) + timeout, nproc=2, fault=["slow", "7", "0"])
    assert "continuing the run in" in proc.stdout
    assert_identical(weights(out), weights(uninterrupted / "two"))


def latest_step(out):
    return int(sorted(os.listdir(out / "checkpoints"))[-1].split("_")[1])
