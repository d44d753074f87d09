"""The shared cache (runtime/cache.py, tiny/shared.py): the tiny preset's data sample, tokenizer
and token cache are built once per CONTENT and read by every run, whatever its --out; two runs
started together build each entry once; a key names content (the data's bytes, the tokenizer's
ids-deciding parts), never a path or a time; the bytes are those written before the cache."""
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ENV, ROOT, command
from transformers import AutoTokenizer

import data as D
import model as M
from runtime import tokens as T
from runtime.cache import build_once, file_digest
from tiny import demo, shared
from tiny import tokenizer as tiny_tokenizer

# sha256 of the demo sample's files (seed 0, mined negatives) as train.py wrote them to
# OUT/data before the shared cache (commit 92740c4), with the pinned pyarrow: the data of the
# tiny run's figures
DEMO_SHA256 = {
    "bbc_headline_retrieval.parquet":
        "0e283aa76c310eff99b847aec2eb24fe2ab9d30a8d151c0342db79babe23df82",
    "bbc_sentence_retrieval.parquet":
        "0d7381e6258942cbbb8b0609290a4d860d26c379d3f5115bc180eb4302d76525",
    "bbc_topic_classification.parquet":
        "4948ff109c3b55d169c8d34e3fd721b9de16d4166219d30b459280f557726801",
    "bbc_topic_clustering.parquet":
        "f96658310e6eb7d575a18445e961e7f133ad5589c138082acf228d5a2bbdb001",
    "task_types.csv":
        "1edd7c9762f97ce3c6b1e78a85e790ecfbd85676da72c16342a5aad4f3843b7b",
}


def test_the_shared_demo_sample_keeps_the_bytes_of_the_tiny_runs_figures(demo_dir):
    """conftest's demo_dir is shared.sample_folder, as train.py --size tiny reads it."""
    assert os.path.dirname(demo_dir) == os.path.join(os.environ["F2LLM_CACHE"], "tiny-data")
    assert {f: file_digest(os.path.join(demo_dir, f)) for f in os.listdir(demo_dir)} == DEMO_SHA256


def test_the_sample_key_names_what_changes_the_bytes(tmp_path):
    """Seed, negatives mode and the CSV's content change the key; the CSV's path does not."""
    mined = shared.sample_key(0, "mined")
    assert shared.sample_key(0, "mined") == mined
    assert len({mined, shared.sample_key(1, "mined"), shared.sample_key(0, "random")}) == 3
    copy = tmp_path / "elsewhere" / "negatives.csv"
    copy.parent.mkdir()
    shutil.copy(demo.DEMO_NEGATIVES, copy)
    assert shared.sample_key(0, str(copy)) == mined  # the same rows: the same sample
    copy.write_text("".join(copy.read_text().splitlines(keepends=True)[:-1]))  # one row fewer
    assert shared.sample_key(0, str(copy)) != mined
    with pytest.raises(D.DataError, match=f"{tmp_path}/none.csv: no such file"):
        shared.sample_key(0, str(tmp_path / "none.csv"))


BUILDER = """
import glob, os, sys, time
from runtime.cache import build_once
def build(tmp):
    os.makedirs(tmp)
    time.sleep(0.5)  # the others are waiting
    open(os.path.join(tmp, "by"), "w").write(str(os.getpid()))
open(f"{sys.argv[2]}/{os.getpid()}", "w").close()
while len(glob.glob(f"{sys.argv[2]}/*")) < 3:  # start together: all three are up
    time.sleep(0.01)
print(build_once(sys.argv[1], build, poll_s=0.05))
"""


def test_build_once_one_builder_among_processes_and_a_failed_build_leaves_nothing(tmp_path):
    """Three processes started together: one builds, all get the folder. A build that fails
    leaves no folder, temporary folder or lock, and the next call builds; a lock of a dead
    process of this host is broken."""
    entry = str(tmp_path / "cache" / "entry")
    (tmp_path / "ready").mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", BUILDER, entry, tmp_path / "ready"],
                              cwd=ROOT, env=ENV,
                              stdout=subprocess.PIPE, text=True) for _ in range(3)]
    printed = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum(f"built {entry}" in out for out in printed) == 1
    assert sum(f"waiting for another process to build {entry}" in out for out in printed) == 2
    assert pathlib.Path(entry, "by").read_text() in {str(p.pid) for p in procs}
    assert sorted(os.listdir(tmp_path / "cache")) == ["entry"]  # no lock, no temporary folder

    def failing(tmp):
        os.makedirs(tmp)
        raise RuntimeError("disk full")
    other = str(tmp_path / "cache" / "other")
    with pytest.raises(RuntimeError, match="disk full"):
        build_once(other, failing, log=lambda *a: None)
    assert sorted(os.listdir(tmp_path / "cache")) == ["entry"]
    dead = subprocess.Popen(["true"])
    dead.wait()
    pathlib.Path(other + ".lock").write_text(f"{socket.gethostname()} {dead.pid}\n")
    build_once(other, os.makedirs, log=lambda *a: None, poll_s=0.01)
    assert sorted(os.listdir(tmp_path / "cache")) == ["entry", "other"]


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory, small_demo_dir):
    """The first 40 rows of two demo sources (retrieval, classification): cheap to tokenize."""
    folder = tmp_path_factory.mktemp("two_sources")
    for name in ("bbc_headline_retrieval", "bbc_topic_classification"):
        table = pq.read_table(os.path.join(small_demo_dir, f"{name}.parquet")).slice(0, 40)
        pq.write_table(table, folder / f"{name}.parquet")
    shutil.copy(os.path.join(small_demo_dir, "task_types.csv"), folder)
    return str(folder)


def _copy(folder, to):
    shutil.copytree(folder, to)
    return str(to)


def test_the_same_content_elsewhere_reuses_a_changed_file_rebuilds(tmp_path, two_sources,
                                                                     tokenizer):
    """The data copied to another folder (another path, another mtime) finds the tokenizer and
    the tokens built for the first; a row changed in one file gives that file new tokens and
    the tokenizer a new entry, the other files keep theirs. The tokenizer is the one trained
    without the cache, byte for byte."""
    root = str(tmp_path / "cache")
    first = D.load_sources(_copy(two_sources, tmp_path / "a"), memo_folder=f"{root}/tokens")
    again = D.load_sources(_copy(two_sources, tmp_path / "b"), memo_folder=f"{root}/tokens")
    built = []
    tok_dir = shared.tokenizer_folder(root, first, built.append)
    assert shared.tokenizer_folder(root, again, built.append) == tok_dir and len(built) == 1
    tiny_tokenizer.train_tokenizer(D.iter_texts(first)).save_pretrained(tmp_path / "direct")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert pathlib.Path(tok_dir, name).read_bytes() == (tmp_path / "direct" / name).read_bytes()

    cache = T.TokenCache(f"{root}/tokens", tokenizer, 48)
    cache.build(first, log=built.append, workers=1)
    assert [cache.problem(s) for s in again] == [None] * len(again)  # found, not built again
    changed = os.path.join(tmp_path, "b", "bbc_topic_classification.parquet")
    table = pq.read_table(changed).to_pylist()
    table[3]["query"] += " (updated)"
    pq.write_table(pa.Table.from_pylist(table), changed)
    edited = D.load_sources(str(tmp_path / "b"), memo_folder=f"{root}/tokens")
    assert {s.name: cache.problem(s) for s in edited} == {
        s.name: "no cache file yet" if s.name == "bbc_topic_classification" else None for s in edited}
    assert shared.tokenizer_folder(root, edited, built.append) != tok_dir


def test_a_teacher_exported_from_the_student_reads_the_students_tokens(tmp_path, tokenizer,
                                                                      two_sources):
    """The export's tokenizer files differ from the student's, its ids do not: one fingerprint,
    so the teacher reads the student's cache files and nothing is tokenized twice. A tokenizer
    whose normalizer differs gets another fingerprint and its own files."""
    M.save_export(M.tiny_backbone(tokenizer, seed=1), tokenizer, str(tmp_path / "teacher"))
    teacher = AutoTokenizer.from_pretrained(tmp_path / "teacher")
    student_files = pathlib.Path(tokenizer.name_or_path)
    assert (tmp_path / "teacher" / "tokenizer_config.json").read_bytes() != (
        student_files / "tokenizer_config.json").read_bytes()  # what the old fingerprint hashed
    assert T.tokenizer_fingerprint(teacher) == T.tokenizer_fingerprint(tokenizer)
    folder = str(tmp_path / "tokens")
    sources = D.load_sources(two_sources, memo_folder=folder)
    T.TokenCache(folder, tokenizer, 48).build(sources, log=lambda *a: None, workers=1)
    assert [T.TokenCache(folder, teacher, 48).problem(s) for s in sources] == [None] * len(sources)

    from tokenizers import normalizers
    lower = AutoTokenizer.from_pretrained(tmp_path / "teacher")
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()
    assert T.tokenizer_fingerprint(lower) != T.tokenizer_fingerprint(tokenizer)
    assert T.TokenCache(folder, lower, 48).problem(sources[0]) == "no cache file yet"


@pytest.mark.slow
def test_two_runs_started_together_build_each_entry_once(tmp_path, two_sources, capsys):
    """Two `train.py --size tiny` runs with their own --out and one --cache-dir, started
    together: the tokenizer is trained once and each token cache file written once; a third
    run builds nothing, and the three exports carry one tokenizer."""
    import train
    cache = tmp_path / "cache"
    argv = lambda out: ["--size", "tiny", "--data", two_sources, "--out", str(tmp_path / out),
                        "--cache-dir", str(cache), "--steps", "1", "--batch-size", "8",
                        "--max-length", "48", "--eval-every", "0"]
    procs = [subprocess.Popen(command("train.py", *argv(f"run{i}")), cwd=ROOT, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in (1, 2)]
    printed = "".join(p.communicate(timeout=300)[0] for p in procs)
    assert all(p.returncode == 0 for p in procs), printed[-3000:]
    assert printed.count(f"built {cache}/tiny-tokenizer/") == 1
    names = ["bbc_headline_retrieval", "bbc_topic_classification"]
    assert sorted(re.findall(r"tokenized (\w+) \(no cache file yet\)", printed)) == names
    assert len([f for f in os.listdir(cache / "tokens") if f.endswith(".arrow")]) == len(names)
    train.main(argv("run3"))
    third = capsys.readouterr().out
    assert "built" not in third and "tokenized" not in third and f"tokens: {cache}/tokens" in third
    exports = {(tmp_path / f"run{i}" / "final" / "tokenizer.json").read_bytes() for i in (1, 2, 3)}
    assert len(exports) == 1
