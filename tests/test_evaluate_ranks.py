"""evaluate.py on several ranks, from a run's checkpoints/step_N, resumable, packed: 1 and 2
gloo processes give the same scores; a step's export equals what train.py exports (LoRA
merged); a killed evaluation resumes where it stopped; the packed encode agrees with the
loader's own on every encode call of every local task."""
import glob
import json
import os
import re
import subprocess
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import ENV, command, launch
from transformers import AutoModel, AutoTokenizer

import model as M
from runtime import checkpoint as C
from runtime.encoding import PackedEncode, SplitEncode, split_by_tokens

evaluate = mteb = None  # imported by the tests that use them: mteb takes seconds


@pytest.fixture(scope="module")
def modules():
    """Collecting this file (the quick loop does too) imports neither mteb nor evaluate.py."""
    global evaluate, mteb
    import mteb

    import evaluate

TEXTS = ["Fuel prices hit airline profits", "BA made a pre-tax profit of 75m.",
         "The central bank raised interest rates again. " * 30]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from a second thread on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_split_by_tokens_balances_and_partitions():
    tokens = [5, 100, 7, 60, 40, 3, 3, 90]
    shares = split_by_tokens(tokens, 3)
    assert sorted(i for s in shares for i in s) == list(range(len(tokens)))
    loads = [sum(tokens[i] for i in s) for s in shares]
    assert loads == [103, 102, 103]  # within the smallest unit of each other
    assert split_by_tokens(tokens, 3) == shares and split_by_tokens(tokens, 1) == [
        [1, 7, 3, 4, 2, 0, 5, 6]]  # longest first; ties by position


def _scores(results) -> dict:
    return {k: v["score"] for k, v in evaluate.read_json(results / "scores.json")["tasks"].items()}


@pytest.fixture(scope="module")
def step_50(trained_run, modules):
    return str(trained_run / "checkpoints" / "step_00000050")


@pytest.fixture(scope="module")
def uninterrupted(step_50, tmp_path_factory):
    """`python evaluate.py OUT/checkpoints/step_00000050 --tasks local`, one process."""
    results = tmp_path_factory.mktemp("one") / "results"
    evaluate.main([step_50, "--tasks", "local", "--results", str(results)])
    return results


@pytest.mark.slow
def test_a_step_is_scored_under_its_own_identity(uninterrupted, step_50, trained_run):
    identity = evaluate.read_json(uninterrupted / "checkpoint.json")
    assert identity["step"] == 50 and identity["run"] == str(trained_run)
    assert identity["sha256"] == evaluate.resolve_step(step_50).identity["sha256"]
    assert set(_scores(uninterrupted)) == set(evaluate.LOCAL_TASKS)
    assert not (uninterrupted / "export").exists()  # removed once every task is done


@pytest.mark.slow
def test_two_gloo_processes_give_the_one_process_scores(uninterrupted, step_50, tmp_path):
    results = tmp_path / "results"
    proc = launch("evaluate.py", step_50, "--tasks", "local", "--results", results, nproc=2)
    assert "packed encoding on 2 rank(s)" in proc.stdout
    one, two = _scores(uninterrupted), _scores(results)
    assert one.keys() == two.keys()
    for task in one:
        assert two[task] == pytest.approx(one[task], abs=1e-6), task


def _written(pattern) -> bool:
    """A file matching `pattern` holds complete JSON (mteb writes result files in place)."""
    for path in glob.glob(pattern, recursive=True):
        try:
            evaluate.read_json(path)
            return True
        except ValueError:
            pass
    return False


@pytest.mark.slow
def test_killed_evaluation_resumes_with_the_missing_tasks(uninterrupted, step_50, tmp_path, capsys):
    """Killed once the first task's result file is written; the same command then embeds only
    the missing tasks, and the table is the uninterrupted run's."""
    results = tmp_path / "results"
    proc = subprocess.Popen(command("evaluate.py", step_50, "--tasks", "local", "--results",
                                    results), cwd=os.path.dirname(evaluate.__file__), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = str(results / "mteb" / "**" / "BBCHeadlineRetrieval.json")
    deadline = time.time() + 240
    while not _written(first) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    done = {os.path.basename(f) for f in glob.glob(str(results / "mteb" / "**" / "*.json"),
                                                   recursive=True)} & {
        f"{t}.json" for t in evaluate.LOCAL_TASKS}
    assert "BBCHeadlineRetrieval.json" in done and len(done) < len(evaluate.LOCAL_TASKS), done
    assert not (results / "scores.json").exists()
    # a kill during mteb's write of a result file leaves it cut short: it is computed again
    cut = os.path.join(os.path.dirname(glob.glob(first, recursive=True)[0]), "LeeSTS.json")
    open(cut, "w").close()
    capsys.readouterr()
    evaluate.main([step_50, "--tasks", "local", "--results", str(results)])
    out = capsys.readouterr().out
    assert "BBCHeadlineRetrieval: kept from the results folder; 0 texts done" in out, out
    assert "LeeSTS: its result file was cut short" in out, out
    assert "LeeSTS: kept" not in out  # LeeSTS runs last: it was never finished before the kill
    assert _scores(results) == _scores(uninterrupted)
    # --overwrite recomputes a task that is there
    evaluate.main([step_50, "--tasks", "LeeSTS", "--results", str(results), "--overwrite"])
    out = capsys.readouterr().out
    assert "kept from" not in out and int(re.search(r"LeeSTS: ([\d,]+) texts done", out)[1]) > 0


@pytest.mark.slow
def test_last_step_exports_the_final_weights(trained_run, tmp_path, modules):
    """checkpoints/step_00000100 is the run's last step: read from its shards it embeds as
    final/ does (so the weights come from the shards, not from the seeded initialisation)."""
    ckpt = evaluate.resolve_checkpoint(str(trained_run / "checkpoints" / "step_00000100"))
    exported = evaluate.export_step(ckpt, str(tmp_path / "export"))
    embs = [M.encode(AutoModel.from_pretrained(p), AutoTokenizer.from_pretrained(p), TEXTS)
            for p in (exported, str(trained_run / "final"))]
    assert torch.allclose(embs[0], embs[1], atol=1e-6)
    step_50 = evaluate.export_step(evaluate.resolve_checkpoint(
        str(trained_run / "checkpoints" / "step_00000050")), str(tmp_path / "step_50"))
    other = M.encode(AutoModel.from_pretrained(step_50), AutoTokenizer.from_pretrained(step_50),
                     TEXTS)
    assert not torch.allclose(other, embs[1], atol=1e-3)


@pytest.mark.slow
def test_lora_step_is_scored_with_its_adapters_merged(tokenizer, tmp_path, modules):
    """A LoRA run's step (saved by runtime/checkpoint.save as train.py saves it): its export
    embeds as the adapters merged into the weights, not as the backbone alone."""
    lora = M.add_lora(M.tiny_backbone(tokenizer, seed=0), 4)
    with torch.no_grad():  # adapters as training leaves them: B is no longer zero
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    config = dict(model="tiny", seed=0, lora_rank=4)
    C.save(str(tmp_path / "run"), 3, lora, optimizer, scheduler, {}, config, tokenizer, keep=1)
    ckpt = evaluate.resolve_checkpoint(str(tmp_path / "run" / "checkpoints" / "step_00000003"))
    exported = evaluate.export_step(ckpt, str(tmp_path / "export"))
    from_step = M.encode(AutoModel.from_pretrained(exported), tokenizer, TEXTS)
    merged = M.encode(M.unwrap(lora), tokenizer, TEXTS)
    backbone_alone = M.encode(M.tiny_backbone(tokenizer, seed=0), tokenizer, TEXTS)
    assert torch.allclose(from_step, merged, atol=1e-6)
    assert not torch.allclose(from_step, backbone_alone, atol=1e-3)


@pytest.mark.slow
def test_packed_encode_agrees_with_the_loader_on_every_local_task(trained_run, tmp_path, modules):
    """Every encode call mteb makes on the local suite (queries with their instruction,
    documents without, symmetric texts), embedded both ways: cosine >= 0.9999 for every text."""
    wrapper = evaluate.load_f2llm(str(trained_run / "final"), "local/agree", "agree", 64, 8192,
                                  encode="loader")
    loader = wrapper.encoder.encode  # sentence-transformers' own encode, padded batches
    packed = SplitEncode(PackedEncode(wrapper.model))
    worst = {}
    for task in evaluate.select_tasks(["local"], "MTEB(eng, v2)"):
        name = task.metadata.name

        def both(sentences, **kwargs):
            ref = loader(sentences, **kwargs)
            cos = F.cosine_similarity(torch.as_tensor(packed(sentences, **kwargs)),
                                      torch.as_tensor(ref))
            worst[name] = min(worst.get(name, 1.0), cos.min().item())
            return ref
        wrapper.model.encode = both
        mteb.evaluate(wrapper, [task], cache=mteb.ResultCache(cache_path=str(tmp_path)),
                      overwrite_strategy="always", co2_tracker=False, show_progress_bar=False)
    assert set(worst) == set(evaluate.LOCAL_TASKS)
    assert min(worst.values()) >= 0.9999, worst


@pytest.mark.slow  # evaluate.py loads mteb
@pytest.mark.parametrize("meta, message", [
    ({"format": "f2llm-dcp-safetensors-1", "step": 1, "shards": {}}, "holds no run config"),
    ("not json", "truncated or not JSON"),
])
def test_a_step_without_a_readable_config_is_refused(meta, message, tmp_path, monkeypatch,
                                                    modules):
    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    (step / "meta.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    monkeypatch.setattr(evaluate, "load_f2llm", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit, match=message):
        evaluate.main([str(step), "--tasks", "LeeSTS", "--results", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()
