"""I1 world-size independence and I7 matching collectives, with real torch.distributed:
2 gloo processes on CPU under torchrun."""
import json

import pytest
import torch
from conftest import launch
from options import OPTIONS
from tolerance import assert_same_sums

pytestmark = pytest.mark.slow  # torchrun / real processes / mteb / sentence-transformers

WORKER = "tests/dist_worker.py"


@pytest.fixture(scope="module")
def one_process(tokenizer, small_demo_dir):
    """The reference of both tests: every option's step in ONE process (this one) on sdpa rows
    (b=8, one chunk)."""
    import dist_worker
    _, grads, losses, collectives = dist_worker.step_gradients(tokenizer.name_or_path,
                                                               small_demo_dir, 8, 100000)
    return {"grads": grads, "losses": losses}, collectives


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tokenizer, small_demo_dir):
    """One torchrun launch of 2 gloo ranks (b=4 each, 120 tokens a chunk): every option on
    sdpa rows (OUT.sdpa.*), the recipe and v2's distillation on varlen rows (OUT.varlen.*)."""
    out = tmp_path_factory.mktemp("two_ranks") / "w2"
    launch(WORKER, tokenizer.name_or_path, small_demo_dir, out, 8, 120,
           "sdpa=" + ",".join(OPTIONS), "varlen=recipe,kd-v2", nproc=2)
    return out


def test_I1_two_ranks_give_the_one_process_gradients_with_one_allreduce_per_step(
        two_ranks, one_process):
    """One step, batch 8: world=2 (b=4 each, several packed chunks) == world=1 (b=8, one chunk),
    retrieval and clustering for the recipe, retrieval for each option of tests/options.py:
    Matryoshka, LoRA (adapter gradients), no in-batch term, another temperature, distillation
    (each mode; v2's 2-rank gradients equal a 1-process step written from v2's formula on the
    raw states) and the official code's detached gather, whose 2-rank gradients equal a
    1-process step in which no positive gets an in-batch gradient. docs/design.md §4: one all-reduce
    per step (per bucket), not per chunk."""
    two, one = torch.load(f"{two_ranks}.sdpa.pt"), one_process[0]
    # the recipe on retrieval and clustering, each option of tests/options.py on retrieval
    assert sorted(one["grads"]) == sorted([f"{o}/retrieval" for o in OPTIONS]
                                          + ["recipe/clustering"])
    for key in one["grads"]:
        assert_same_sums(two["losses"][key], one["losses"][key], f"{key} loss")
        for name, g in one["grads"][key].items():
            assert g.abs().sum() > 0, (key, name)
            # float32 reordering, relative to the tensor's scale (tests/tolerance.py)
            assert_same_sums(two["grads"][key][name], g, f"{key} {name}")
    lora = set(one["grads"]["lora/retrieval"])  # only the adapters train
    assert lora and all("lora_" in n for n in lora), lora
    # the detached gather really loses the passages' in-batch gradient (a retrieval batch)
    recipe, detached = one["grads"]["recipe/retrieval"], one["grads"]["detached/retrieval"]
    assert any((recipe[n] - detached[n]).abs().max() > 1e-3 * recipe[n].abs().max() for n in recipe)

    # one gradient all-reduce per DDP bucket per step, however many chunks pass 2 runs: each
    # bucket once, and together exactly the trained gradient elements (a per-chunk all-reduce
    # would send chunks x as many). DDP's first step runs on one initial bucket; it then
    # rebuilds them by bucket_cap_mb, so the second step (clustering) has several.
    for rank in (0, 1):
        for key, c in json.loads(open(f"{two_ranks}.sdpa.rank{rank}.json").read()).items():
            assert c["chunks"] >= 3, c
            assert c["allreduces"] == c["buckets"], (rank, key, c)
            assert c["elements"] == c["parameters"], (rank, key, c)
            assert key != "recipe/clustering" or c["buckets"] >= 2, c


def test_I1_on_the_cuda_attention_path_matches_one_sdpa_process(two_ranks, one_process):
    """The CUDA layout under DDP: forced on this CPU (F2LLM_FORCE_VARLEN=1's path), 2 gloo ranks
    run one varlen row per chunk (cumulative lengths passed down, no padding computed), the
    recipe and distillation from a teacher that also runs varlen rows, and give the gradients
    of ONE process on sdpa rows (float32 rounding), with one all-reduce per bucket per step."""
    two, (one, sdpa) = torch.load(f"{two_ranks}.varlen.pt"), one_process
    assert sorted(two["grads"]) == ["kd-v2/retrieval", "recipe/clustering", "recipe/retrieval"]
    for key in two["grads"]:
        assert_same_sums(two["losses"][key], one["losses"][key], f"{key} loss")
        for name, g in one["grads"][key].items():
            # float32 reordering relative to the tensor's scale (the two attentions sum in other
            # orders); attention that crossed sequences would give O(1)
            assert_same_sums(two["grads"][key][name], g, f"{key} {name}")
    for rank in (0, 1):
        for c in json.loads(open(f"{two_ranks}.varlen.rank{rank}.json").read()).values():
            assert c["attention"] == "f2llm_varlen" and c["chunks"] >= 3, c
            assert c["computed_tokens"] == c["real_tokens"], c  # one varlen row per chunk
            assert c["allreduces"] == c["buckets"] and c["elements"] == c["parameters"], c
    assert {c["attention"] for c in sdpa.values()} == {"sdpa"}
