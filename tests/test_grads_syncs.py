"""What a DDP step holds and waits for, on train.py's own loop with 2 gloo ranks: one copy of
the gradients (every accumulation of pass 2 lands in DDP's bucket views, from step 1), at most
2 host syncs and one metrics all-reduce per step. And the allocator setting train.py makes."""
import json
import os

import pytest
from conftest import launch

import train


@pytest.mark.slow
def test_ddp_step_accumulates_in_bucket_views_with_two_host_syncs(tmp_path, small_demo_dir):
    """3 steps of `--size tiny` on 2 ranks, several pass-2 chunks each (no_sync but the last).
    Every accumulation into a .grad, in every step, step 1 included, is into the view DDP's
    bucket holds for that parameter (set_to_none between steps, or no .grad before DDP is built,
    would make the no_sync chunks accumulate into fresh tensors: a second copy). Between two
    clips (one whole step), the host waits at most twice outside the backbone's forward and
    the metrics take one all-reduce; inside the forward only transformers' mask builder of the
    CPU's sdpa rows syncs (the CUDA varlen path builds no mask)."""
    out = tmp_path / "watch"
    launch("tests/step_worker.py", out, "--",
           "--size", "tiny", "--data", small_demo_dir, "--out", tmp_path / "run",
           "--steps", "3", "--batch-size", "8", "--max-length", "48", "--chunk-tokens", "300",
           "--eval-every", "0", "--save-every", "0", "--token-cache", small_demo_dir + "_tokens",
           nproc=2)
    for rank in (0, 1):
        watch = json.loads((tmp_path / f"watch.rank{rank}.json").read_text())
        per_step = {}
        for s, name, in_view in watch["accumulations"]:
            per_step.setdefault(s, {}).setdefault(name, []).append(in_view)
        assert sorted(per_step) == [1, 2, 3]
        for s, params in per_step.items():
            for name, seen in params.items():
                assert len(seen) >= 3, (rank, s, name, seen)  # one per pass-2 chunk
                assert all(seen), (rank, s, name, seen)
        for s in ("2", "3"):  # clip to clip: a whole step, setup and the end left out
            counts = watch["steps"][s]
            assert len(counts["syncs"]) <= 2, (rank, s, counts["syncs"])
            assert counts["all_reduces"] == 1, (rank, s, counts)
            assert all(where.startswith("masking_utils.py") for where in counts["forward_syncs"]), (
                rank, s, counts["forward_syncs"])


def test_expandable_segments_set_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    note = train.use_expandable_segments()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert "expandable_segments:True" in note
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    assert train.use_expandable_segments() is None
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"
