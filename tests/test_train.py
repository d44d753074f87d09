"""train.py: the tiny recipe end to end, the schedule, the flags, a clean stop on a signal, a
run that distils from a teacher, the LoRA export, and bad command lines that fail before any
model is loaded and write nothing."""
import json
import math
import os
import re

import pytest
from conftest import ROOT
from test_step import _lora_backbone
from tolerance import assert_same_sums
from transformers import AutoModel, AutoTokenizer

import data as D
import model as M
import train
from runtime import tokens as T
from tiny import tokenizer as tiny_tokenizer


def test_choice_flags_offer_what_the_code_accepts():
    """Each Literal field's choices are exactly the values the code behind it knows."""
    from typing import get_args

    from loss import KD_MODES
    from runtime.flags import field_help
    hints = train.Config.__annotations__ | train.Recipe.__annotations__
    assert get_args(hints["kd_mode"]) == KD_MODES
    assert set(get_args(hints["data_set"])) == set(D.DATA_SETS)
    assert set(get_args(hints["size"])) == set(train.PRESETS)
    helps = field_help(train.Config)  # runtime/flags.py's, tools/mine.py's too: aligned continuations
    assert helps["kd_mode"] == ("v2: F2LLM v2's MSE of raw states; unit: of unit vectors; "
                                "kl: of scores")
    assert helps["source_sampling"] == "how a batch's source is drawn"  # not the block above


def test_the_imports_are_frozen_out_of_the_collector_and_it_stays_on():
    """train.py (and evaluate.py) freeze what their imports made, ~600k objects that no later
    collection need walk; the collector stays on for what a run makes (off, a long run's
    cycles would never be freed)."""
    import gc
    assert gc.isenabled() and gc.get_freeze_count() > 300_000


def test_lr_schedule_warmup_cosine_floor():
    cfg = train.Config(lr=1e-3, min_lr=1e-5, warmup_steps=10)
    f = train.lr_lambda(cfg.lr, cfg.min_lr, cfg.warmup_steps, total_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) * cfg.lr == pytest.approx((1e-3 + 1e-5) / 2)
    assert f(110) * cfg.lr == pytest.approx(1e-5) and f(500) * cfg.lr == pytest.approx(1e-5)


@pytest.mark.slow
def test_tiny_recipe_end_to_end(trained_run):
    """`python train.py --size tiny` on a small config of its own (conftest.trained_run)
    trains on real text: the validation loss and each source's training loss fall; the run
    folder holds the config, one metrics line per step, a resumable checkpoint and an export
    that AutoModel and AutoTokenizer load."""
    out = trained_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    for key in ("loss", "hard", "in_batch", "lr", "grad_norm", "seq_per_s"):
        assert all(math.isfinite(r[key]) for r in records)
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    # the preset's own validation loss is the recipe's, which other variants' runs also report
    assert vals == [r["val_recipe_loss"] for r in records if "val_loss" in r]
    # 1.3 epochs of 600 rows per source: the held-out loss falls, then the rows start to repeat
    assert vals[-1] < vals[0] and min(vals) < 0.9 * vals[0], vals
    for source in {r["source"] for r in records}:
        # the whole loss: retrieval's hard term alone (mined negatives, a 361k model) falls by
        # 3-10% depending on the batch order, its in-batch term by 15-25%
        loss = [r["loss"] for r in records if r["source"] == source]
        q = len(loss) // 4
        assert sum(loss[-q:]) / q < 0.95 * sum(loss[:q]) / q, source
    assert json.loads((out / "config.json").read_text())["size"] == "tiny"
    # a save every 50 of the 100 steps, the newest 2 kept (--keep-checkpoints' default)
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000050", "step_00000100"]
    backbone = AutoModel.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert tokenizer("x")["input_ids"][-1] == tokenizer.eos_token_id
    assert backbone.config.hidden_size == 64


@pytest.mark.parametrize("argv, message", [
    (["--no-such-flag", "1"], "unrecognized arguments: --no-such-flag"),
    (["--size", "7b"], "invalid choice: '7b'"),
    (["--batch-sz", "8"], "unrecognized arguments: --batch-sz"),  # no prefix matching
    (["--chunk-tokens", "-1"], "--chunk-tokens must be >= 0 (0 = planned), got -1"),
    (["--data", "/nonexistent/folder"], "--data /nonexistent/folder: no such folder"),
    (["--resume"], "--resume: no checkpoint in"),
    (["--kd-mode", "l2"], "argument --kd-mode: invalid choice: 'l2' (choose from"),
    (["--kd-mode", "mse"], "argument --kd-mode: mse is now two modes: v2"),
    (["--k-clustering", "0"], "--k-clustering must be positive"),
    (["--demo-negatives", "best"], "argument --demo-negatives: invalid choice: 'best'"),
    (["--precision", "fp16"], "argument --precision: invalid choice: 'fp16'"),
    (["--in-batch-gather", "none"], "argument --in-batch-gather: invalid choice: 'none'"),
    (["--source-sampling", "uniform"], "argument --source-sampling: invalid choice"),
    (["--data-set", "v3"], "argument --data-set: invalid choice: 'v3'"),
    (["--collective-timeout", "-1"], "--collective-timeout must be >= 0 (0 = torch's)"),
])
def test_bad_command_lines(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        train.main(argv + ["--out", str(out)])
    assert message in str(e.value) + capsys.readouterr().err
    assert not out.exists()


SIGNALS = """
import os, signal, time
from runtime.signals import StopSignals
# Python's own SIGINT handler, also where the suite started with SIGINT ignored (a shell's
# background job), which this process inherits: Python then installs none
signal.signal(signal.SIGINT, signal.default_int_handler)
stop = StopSignals().install()
os.kill(os.getpid(), signal.SIG{first})
print(stop.signum, stop.exit_code, flush=True)  # the first one only asks for a stop
stop.restore()
assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
stop.install()
os.kill(os.getpid(), signal.SIGINT)
time.sleep(30)
print("not stopped", flush=True)
"""


@pytest.mark.parametrize("first", ["TERM", "INT"])
def test_a_first_signal_asks_for_a_stop_a_second_sigint_exits_at_once(first):
    """runtime/signals.py in a fresh process: SIGTERM or SIGINT sets the stop (exit code 128 +
    its number, as a shell reports a signal); restore() gives the caller its handlers back; a
    later SIGINT exits at once with 130, saying so in one line."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", SIGNALS.format(first=first)], cwd=ROOT,
                          capture_output=True, text=True, timeout=20)
    number = {"TERM": 15, "INT": 2}[first]
    assert proc.stdout.split() == [str(number), str(128 + number)], proc.stderr
    assert proc.returncode == 130 and "not stopped" not in proc.stdout
    assert proc.stderr.splitlines()[-1] == ("train.py: second SIGINT: exiting now, without a "
                                            "checkpoint"), proc.stderr


def test_bad_data_folder_fails_before_model_and_writes_nothing(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("no data here")
    with pytest.raises(SystemExit, match="no .parquet or .jsonl files"):
        train.main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_batch_size_must_divide_over_ranks():
    with pytest.raises(SystemExit, match="--batch-size 9 is not divisible by the world size 2"):
        train.check_config(train.Config(batch_size=9, chunk_size=4, lr=1e-3, max_length=32), world=2)


@pytest.mark.slow
def test_a_run_distils_from_a_teacher_with_its_own_tokenizer(tmp_path, small_demo_dir, capsys):
    """train.py --teacher FOLDER --kd-mode kl: the teacher (an export with another tokenizer)
    gets token cache files of its own beside the student's, the distillation term is logged per
    step, and resuming with another --kd-weight is refused. The token cache is the shared test
    cache (a warm session tokenizes nothing; test_data counts what a build writes)."""
    texts = D.iter_texts(D.load_sources(small_demo_dir))
    other = tiny_tokenizer.train_tokenizer(texts, vocab_size=600)
    M.save_export(M.tiny_backbone(other, seed=3), other, str(tmp_path / "teacher"))
    token_cache = small_demo_dir + "_tokens"
    argv = ["--data", small_demo_dir, "--out", str(tmp_path / "run"), "--steps", "2",
            "--max-length", "48", "--eval-every", "0", "--teacher", str(tmp_path / "teacher"),
            "--kd-mode", "kl", "--token-cache", token_cache]
    train.main(argv)
    printed = capsys.readouterr().out
    assert "teacher tokenizer: its own" in printed and ", kd " in printed
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["kd"] > 0 for line in lines)
    # the student's and the teacher's ids of each source: two keys, a usable file for each
    student = AutoTokenizer.from_pretrained(re.search(r"^tokenizer: (\S+)", printed, re.M)[1])
    teacher = AutoTokenizer.from_pretrained(tmp_path / "teacher")  # as train.py loads them
    caches = [T.TokenCache(token_cache, t, 48) for t in (student, teacher)]
    sources = D.load_sources(small_demo_dir)
    assert caches[0].tokenizer_id != caches[1].tokenizer_id and len(sources) == 4
    assert all(c.problem(s) is None for c in caches for s in sources)
    assert len({c.path(s) for c in caches for s in sources}) == 2 * len(sources)
    with pytest.raises(SystemExit, match="kd_weight was 1.0, now 2.0"):
        train.main(argv + ["--resume", "--kd-weight", "2"])


def test_lora_export_is_a_plain_qwen3_with_the_adapter_embeddings(tokenizer, tmp_path):
    """The final export merges the adapters: AutoModel loads it without peft and embeds as the
    adapter model does."""
    lora = _lora_backbone(tokenizer)
    M.save_export(M.unwrap(lora), tokenizer, str(tmp_path / "final"))
    assert not (tmp_path / "final" / "adapter_config.json").exists()
    loaded = AutoModel.from_pretrained(tmp_path / "final")
    assert type(loaded).__name__ == "Qwen3Model"
    texts = ["Fuel prices hit airline profits", "The match ended in a draw."]
    assert_same_sums(M.encode(loaded, tokenizer, texts), M.encode(lora, tokenizer, texts),
                     "merged export vs adapters")
    base = M.tiny_backbone(tokenizer, seed=0)  # the adapters changed the embeddings
    assert (M.encode(base, tokenizer, texts) - M.encode(loaded, tokenizer, texts)).abs().max() > 1e-3


def test_k_clustering_sets_the_hard_negatives_of_clustering_data_only(small_demo_dir,
                                                                      tokenizer):
    """--k-clustering: 7 in every preset (F2LLM v1), 9 is F2LLM v2's (arguments.py
    num_hard_neg_clustering); it changes the clustering batches' negatives per query and
    nothing else, and a k the data cannot give fails naming the file."""
    assert all(train.parse_config(["--size", s]).k_clustering == 7 for s in train.PRESETS)
    assert train.parse_config(["--size", "4b", "--k-clustering", "9"]).k_clustering == 9
    memo = small_demo_dir + "_tokens"  # the shared test cache: files scanned and tokenized once
    default = {s.name: s.k for s in D.load_sources(small_demo_dir, memo_folder=memo)}
    nine = D.load_sources(small_demo_dir, memo_folder=memo, k_clustering=9)
    assert {s.task_type for s in nine} >= {"retrieval", "clustering", "classification"}
    for s in nine:
        assert s.k == (9 if s.task_type == "clustering" else default[s.name]), s.name
    clustering = [s for s in nine if s.task_type == "clustering"]
    cache = T.TokenCache(memo, tokenizer, 128)
    cache.build(clustering, log=lambda *a: None)
    cache.open(clustering)
    batch = next(D.BatchStream(clustering, 4, seed=0))
    assert [len(n) for n in batch.negatives] == [9] * 4
    with pytest.raises(D.DataError, match="negative_25"):
        D.load_sources(small_demo_dir, memo_folder=memo, k_clustering=25)


# each script run as its user runs it: (path, module), one of them, and the words before a flag
SCRIPTS = [("train.py", None, []), ("evaluate.py", None, []), (None, "tools.gpu_check", []),
           (None, "tools.mine", ["demo", "--model", "m"])]
WITHOUT_TORCH = """
import contextlib, io, json, runpy, sys
answers = []
for path, module, words in json.loads(sys.argv[1]):
    for argv in ([*words, "--chunk-token", "5"], [*words, "-h"]):
        sys.argv, err, out = [path or module, *argv], io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                runpy.run_path(path, run_name="__main__") if path else \\
                    runpy.run_module(module, run_name="__main__", alter_sys=True)
            except SystemExit as e:
                answers.append([e.code, err.getvalue() + out.getvalue(), "torch" in sys.modules])
print(json.dumps(answers))
"""


def test_scripts_answer_help_and_a_misspelt_flag_before_torch_loads():
    """train.py, evaluate.py and `python -m tools.gpu_check | tools.mine`, as run from the
    repository root: a misspelt flag gets argparse's usage error naming it (exit 2), and -h
    its help (exit 0), before torch (~20 s here) is imported; tools.gpu_check's -h says in one
    line what it does and every flag has help. Config's temperature is loss.TEMPERATURE."""
    import subprocess
    import sys

    from conftest import ENV, ROOT

    from loss import TEMPERATURE
    from tools import gpu_check
    proc = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, json.dumps(SCRIPTS)], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=120)
    answers = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(answers) == 2 * len(SCRIPTS), proc.stderr[-2000:]
    for (path, module, _), misspelt, help in zip(SCRIPTS, answers[::2], answers[1::2]):
        assert misspelt[0] == 2 and "unrecognized arguments: --chunk-token" in misspelt[1], path
        assert help[0] == 0 and "usage:" in help[1], (path or module, help[1][-500:])
        assert not misspelt[2] and not help[2], f"{path or module} imported torch first"
    parser = gpu_check.flags()
    assert "\n" not in parser.description and parser.description.endswith(".")
    assert all(action.help for action in parser._actions)
    assert train.Config.temperature == TEMPERATURE
