"""data.py: single-source batches of token ids identical on every rank, k by task type,
deterministic per seed, every row in every epoch, both sampling rules, resumable position; bad
files fail naming file, row, column. runtime/tokens.py: the token cache (EOS rule, keyed by
data/tokenizer/length, crash-safe, memory-mapped)."""
import collections
import csv
import hashlib
import json
import os
import pathlib
import shutil
import socket
import subprocess
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SHARED_CACHE

import data as D
import model as M
from runtime import tokens as T
from tiny import demo
from tiny import tokenizer as tiny_tokenizer

MAX_LENGTH = 64


@pytest.fixture(scope="module")
def tok(tokenizer):
    return tokenizer


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return os.path.join(SHARED_CACHE, "tokens")  # keyed by content: every test may share it


def _sources(folder, tok, cache_dir, seed=0, **kw):
    return T.load_tokenized(folder, tok, kw.pop("max_length", MAX_LENGTH), cache_dir, seed=seed, **kw)


def test_batches_single_source_k_and_shards(small_demo_dir, tok, cache_dir):
    sources = _sources(small_demo_dir, tok, cache_dir)
    rows_of, texts = {}, {}
    for s in sources:  # every row's texts, as the cache gives them
        texts[s.name] = [s.tokens.texts(r, s.columns) for r in range(s.num_rows)]
        rows_of[s.name] = collections.defaultdict(list)  # BBC repeats articles: a pair may be several rows
        for r, t in enumerate(texts[s.name]):
            rows_of[s.name][str(t[0][0]), str(t[1][0])].append(r)
    by_name = {s.name: s for s in sources}
    stream = D.BatchStream(sources, batch_size=8, seed=0)
    for _ in range(30):
        batch = next(stream)
        source = by_name[batch.source]
        rows = [rows_of[source.name][str(q), str(p)]
                for q, p in zip(batch.queries, batch.positives)]
        assert all(rows)  # every pair is a row of this source
        assert all(set(rs) - set(source.val_rows.tolist()) for rs in rows)  # held-out rows never train
        k = D.K_BY_TYPE[source.task_type]
        assert all(len(n) == k for n in batch.negatives)  # distinct picks: test_every_row_trains_every_epoch
        cands = [[{str(ids)
                   for ids, _ in texts[source.name][r][2:2 + source.n_candidates[r]]} for r in rs]
                 for rs in rows]
        assert all(any({str(x) for x in n} <= c for c in cs)
                   for n, cs in zip(batch.negatives, cands))
        seqs = batch.sequences()  # [queries; positives; negatives row by row]
        assert seqs == batch.queries + batch.positives + sum(batch.negatives, [])
        assert len(seqs) == 8 * (2 + k)
        assert all(s[-1] == tok.eos_token_id and len(s) <= MAX_LENGTH for s in seqs)
        shards = [batch.shard(r, 4) for r in range(4)]
        assert sum((s.queries for s in shards), []) == batch.queries
        assert all(len(s.queries) == 2 and s.source == batch.source for s in shards)
        assert sum(s.truncated for s in shards) == batch.truncated
    assert batch.truncated > 0  # BBC articles are longer than 64 tokens


def test_every_rank_sees_the_same_stream(small_demo_dir, tok, cache_dir):
    """Each rank builds its own stream; the global batches agree without communication."""
    streams = [D.BatchStream(_sources(small_demo_dir, tok, cache_dir, seed=3), 8,
                             seed=3) for _ in range(2)]
    for _ in range(20):
        a, b = next(streams[0]), next(streams[1])
        assert (a.source, a.queries, a.negatives, a.cut) == (b.source, b.queries, b.negatives, b.cut)


def test_deterministic_per_seed_and_seeds_differ(small_demo_dir, tok, cache_dir):
    def first(seed, sampling, n=10):
        stream = D.BatchStream(_sources(small_demo_dir, tok, cache_dir, seed=seed), 8, seed, sampling)
        return [(b.source, b.queries, b.negatives) for b in (next(stream) for _ in range(n))]
    for sampling in D.SAMPLING_RULES:
        assert first(0, sampling) == first(0, sampling)
        assert first(0, sampling) != first(1, sampling)


def test_position_save_and_restore(small_demo_dir, tok, cache_dir):
    sources = _sources(small_demo_dir, tok, cache_dir)
    stream = D.BatchStream(sources, 8, seed=0)
    for _ in range(stream.batches_per_epoch - 2):  # cross an epoch boundary after restoring
        next(stream)
    state = stream.state_dict()
    expected = [next(stream).queries for _ in range(5)]
    again = D.BatchStream(sources, 8, seed=0)
    again.load_state_dict(json.loads(json.dumps(state)))
    assert [next(again).queries for _ in range(5)] == expected


def test_every_row_trains_every_epoch(tmp_path, tok, cache_dir):
    """A 20-row source at batch 32 still gives a batch (its rows, then the first 12 again),
    and a 70-row one gives 3: the last is filled from the start of the epoch's order. With
    dropped partial batches the first would never train."""
    folder = str(tmp_path / "d")
    _write(folder, "small", [_row(query=f"q{i}", passage=f"p{i}") for i in range(20)])
    _write(folder, "large", [_row(query=f"Q{i}", passage=f"P{i}") for i in range(70)],
           types={"small": "retrieval", "large": "retrieval"})
    sources = _sources(folder, tok, cache_dir, val_fraction=0)
    stream = D.BatchStream(sources, 32, seed=0)
    assert stream.source_batches == [3, 1] and stream.batches_per_epoch == 4  # large, small
    for _epoch in range(2):
        for sid, source in enumerate(sources):
            order = np.concatenate([rows for s, rows in stream.plan if s == sid])
            n = source.num_rows
            assert sorted(order[:n]) == list(range(n))  # every row once ...
            assert (order[n:] == order[: len(order) - n]).all()  # ... then the start again
        batches = [next(stream) for _ in range(4)]
        small = next(b for b in batches if b.source == "small")
        assert len(small.queries) == 32 and len({str(q) for q in small.queries}) == 20
        assert all(len({str(x) for x in n}) == 7 for n in small.negatives)  # 7 of 7, no repeats
    assert stream.epoch == 1


@pytest.mark.parametrize("sampling", D.SAMPLING_RULES)
def test_sources_mixed_in_proportion_and_epoch_covers_all(tmp_path, demo_dir, sampling):
    # make one source 3x smaller: it should be drawn ~3x less often, spread over the epoch
    shutil.copytree(demo_dir, tmp_path / "d")
    path = tmp_path / "d" / "bbc_topic_classification.parquet"
    pq.write_table(pq.read_table(path).slice(0, 580), path)
    sources = D.load_sources(str(tmp_path / "d"), seed=0)
    stream = D.BatchStream(sources, 8, seed=0, sampling=sampling)  # the plan needs no tokens
    expected = {s.name: -(-len(s.train_rows) // 8) for s in sources}
    seen = [sources[sid].name for sid, _ in stream.plan]
    assert collections.Counter(seen) == expected
    first_half = collections.Counter(seen[: len(seen) // 2])
    assert 0.3 < first_half["bbc_topic_classification"] / expected["bbc_topic_classification"] < 0.7


def test_sampling_rules_official_fixed_weights_remaining_batches_left():
    """A source of 1 batch beside one of 9. Fixed weights 1:9 (official): it comes last when
    the first 9 draws all take the big source, 0.9^9 = 0.39 of the epochs. In proportion to
    the batches left (remaining): 1/10."""
    last = {rule: np.mean([D.source_order([1, 9], np.random.default_rng(seed), rule)[-1] == 0
                           for seed in range(400)]) for rule in D.SAMPLING_RULES}
    assert 0.31 < last["official"] < 0.47 and 0.05 < last["remaining"] < 0.16, last
    for rule in D.SAMPLING_RULES:  # both draw each batch of the epoch exactly once
        order = D.source_order([3, 1, 5], np.random.default_rng(0), rule)
        assert np.bincount(order).tolist() == [3, 1, 5]


def test_validation_split_is_one_percent_and_disjoint(demo_dir):
    for i, s in enumerate(D.load_sources(demo_dir, seed=5)):
        assert len(s.val_rows) == int(s.num_rows * 0.01)
        assert not set(s.val_rows) & set(s.train_rows)
        assert len(s.val_rows) + len(s.train_rows) == s.num_rows
        # the held-out rows of a seed do not change with the code around them
        expected = np.sort(np.random.default_rng([5, i]).permutation(s.num_rows)[: len(s.val_rows)])
        assert (s.val_rows == expected).all()


def test_validation_batches_are_built_when_iterated(small_demo_dir, tok, cache_dir):
    """Held-out rows only, in batches that are a multiple of the world size, the same each
    time they are iterated (they are built then: the ids of 1% of the released set are GBs)."""
    sources = _sources(small_demo_dir, tok, cache_dir, val_fraction=0.05)
    val = D.ValidationBatches(sources, batch_size=4, world=3, seed=0)
    first, again = list(val), list(val)
    assert [(b.source, b.queries, b.negatives) for b in first] == [(b.source, b.queries, b.negatives) for b in again]
    assert len(first) == len(val) == 2 * len(sources)  # 7 rows per source: 4 -> 3, 3
    assert all(len(b.queries) == 3 for b in first)
    for s in sources:
        held_out = {str(s.tokens.texts(int(r), ["query"])[0][0]) for r in s.val_rows}
        assert {str(q) for b in first if b.source == s.name for q in b.queries} <= held_out


def test_checking_keeps_no_text_in_memory(demo_dir):
    """load_sources streams the files: no Arrow memory is left holding the ~60 MB of text."""
    before = pa.total_allocated_bytes()
    sources = D.load_sources(demo_dir)
    assert pa.total_allocated_bytes() - before < 1e6
    assert sum(s.num_rows for s in sources) == 1751 + 2 * 1777 + 5253  # + 3 sentences/headline


def test_jsonl_layout_reads_like_parquet(tmp_path, demo_dir):
    table = pq.read_table(os.path.join(demo_dir, "bbc_topic_classification.parquet")).slice(0, 50)
    for layout in ("jsonl", "parquet"):
        os.makedirs(tmp_path / layout)
        shutil.copy(os.path.join(demo_dir, "task_types.csv"), tmp_path / layout)
    with open(tmp_path / "jsonl" / "bbc_topic_classification.jsonl", "w") as f:
        for row in table.to_pylist():
            f.write(json.dumps(row) + "\n")
    pq.write_table(table, tmp_path / "parquet" / "bbc_topic_classification.parquet")
    (src,) = D.load_sources(str(tmp_path / "jsonl"))
    (ref,) = D.load_sources(str(tmp_path / "parquet"))
    assert src.task_type == "classification" and src.columns == ref.columns
    assert (src.n_candidates == ref.n_candidates).all() and (src.train_rows == ref.train_rows).all()
    assert list(D.iter_texts([src])) == list(D.iter_texts([ref])) == table["query"].to_pylist() + table["passage"].to_pylist()


# ---------------------------------------------------------------- the token cache
def _files(folder):
    """name -> (size, mtime, sha256) of every file under folder."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = (os.path.getsize(path), os.stat(path).st_mtime_ns,
                                                  hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest())
    return out


def test_cache_ids_end_with_eos_like_model_tokenize(small_demo_dir, tok, cache_dir):
    """The cached ids are model.tokenize's: cut to max_length - 1, then the EOS id; the cut
    texts are counted; ids are stored as int32 (Qwen3's 151k vocab does not fit int16)."""
    sources = _sources(small_demo_dir, tok, cache_dir)
    source = next(s for s in sources if s.task_type == "clustering")
    raw = pq.read_table(source.path).slice(0, 6)
    texts = [raw[c][r].as_py() for r in range(6) for c in source.columns]
    ids, n_cut = M.tokenize(tok, texts, MAX_LENGTH)
    got = [t for r in range(6) for t in source.tokens.texts(r, source.columns)]
    assert [g for g, _ in got] == ids
    assert sum(c for _, c in got) == n_cut > 0
    assert all(f.type == pa.list_(pa.int32()) for f in source.tokens.reader.schema)


@pytest.mark.slow
def test_a_teacher_with_its_own_tokenizer_reads_the_same_texts(small_demo_dir, tok, cache_dir):
    """--teacher with another tokenizer: its ids come from its own cache files in the same
    folder, and every batch (and each shard of it) holds the same texts in both."""
    sources = _sources(small_demo_dir, tok, cache_dir, max_length=512)
    other = tiny_tokenizer.train_tokenizer(D.iter_texts(sources), vocab_size=600)
    teacher_cache = T.TokenCache(cache_dir, other, 512)
    teacher_cache.build(sources, log=lambda *a: None)
    teacher_cache.open(sources, attr="teacher_tokens")
    assert teacher_cache.path(sources[0]) != T.TokenCache(cache_dir, tok, 512).path(sources[0])
    stream = D.BatchStream(sources, 4, seed=0)
    for batch in [next(stream) for _ in range(3)]:
        for shard in (batch, batch.shard(1, 2)):
            ours, theirs = shard.sequences(), shard.teacher.sequences()
            assert len(ours) == len(theirs) and ours != theirs
            for mine, its in zip(ours, theirs):  # equal, or up to the shorter one's cut
                a, b = tok.decode(mine[:-1]), other.decode(its[:-1])
                if max(len(mine), len(its)) < 512:
                    assert a == b
                else:  # a cut may split a character: compare before it
                    common = min(a, b, key=len)[:-4]
                    assert a.startswith(common) and b.startswith(common) and len(common) > 200
            assert all(s[-1] == other.eos_token_id for s in theirs)


def test_cache_is_keyed_by_data_tokenizer_and_length(tmp_path, tok, small_demo_dir):
    """Another max length, another tokenizer or a rewritten data file each gets its own file;
    a cache file of another key under this name is refused (open) and rebuilt (build), and
    nothing in the data folder changes."""
    folder, cache = str(tmp_path / "d"), str(tmp_path / "cache")
    os.makedirs(folder)
    for name in ("bbc_topic_classification.parquet", "task_types.csv"):
        shutil.copy(os.path.join(small_demo_dir, name), folder)
    data_files = _files(folder)
    (source,) = _sources(folder, tok, cache)
    first = T.TokenCache(cache, tok, MAX_LENGTH).path(source)
    other_tok = tiny_tokenizer.train_tokenizer(["a few words", "of another text"], vocab_size=300)
    other = {"length": T.TokenCache(cache, tok, MAX_LENGTH // 2),
             "tokenizer": T.TokenCache(cache, other_tok, MAX_LENGTH)}
    for what, c in other.items():
        assert c.path(source) != first and c.problem(source) == "no cache file yet", what
        c.build([source], log=lambda *a: None)
    assert len([f for f in os.listdir(cache) if f.endswith(".arrow")]) == 3 and _files(folder) == data_files
    # a file of the other tokenizer under this key's name: refused by open, replaced by build
    shutil.copy(other["tokenizer"].path(source), first)
    this = T.TokenCache(cache, tok, MAX_LENGTH)
    with pytest.raises(D.DataError, match=f"token cache {first}: made for .*delete it"):
        this.open([source])
    this.build([source], log=lambda *a: None)
    this.open([source])
    assert source.tokens.texts(0, ["passage"])[0][0] == M.tokenize(tok, [pq.read_table(source.path)["passage"][0].as_py()], MAX_LENGTH)[0][0]
    # the data file changes: a new key, the old file is not read
    table = pq.read_table(os.path.join(folder, "bbc_topic_classification.parquet")).slice(0, 100)
    pq.write_table(table, os.path.join(folder, "bbc_topic_classification.parquet"))
    (changed,) = D.load_sources(folder)
    assert this.path(changed) != first and this.problem(changed) == "no cache file yet"


def test_half_written_cache_is_rebuilt_and_waiting_ranks_open_it(tmp_path, tok, small_demo_dir, monkeypatch):
    folder, cache = str(tmp_path / "d"), str(tmp_path / "cache")
    os.makedirs(folder)
    for name in ("bbc_topic_classification.parquet", "task_types.csv"):
        shutil.copy(os.path.join(small_demo_dir, name), folder)
    (source,) = D.load_sources(folder)
    real, calls = T.tokenize_rows, []

    def crashing(*args):  # the builder dies after 3 of its 10 row ranges
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(T, "tokenize_rows", crashing)
    builder = T.TokenCache(cache, tok, MAX_LENGTH, rows_per_batch=16)
    with pytest.raises(KeyboardInterrupt):
        builder.build([source], workers=1)
    monkeypatch.setattr(T, "tokenize_rows", real)
    assert builder.problem(source) == "no cache file yet"  # only the temporary file was written
    assert [f for f in os.listdir(cache) if ".tmp-" in f]
    assert not [f for f in os.listdir(cache) if f.endswith(".lock")]  # released on the way out
    # a rank that waits for the builder opens the files once they are complete
    waiter = D.load_sources(folder)[0]
    thread = threading.Thread(target=T.TokenCache(cache, tok, MAX_LENGTH).open, args=([waiter],),
                              kwargs=dict(wait=True))
    thread.start()
    T.TokenCache(cache, tok, MAX_LENGTH, rows_per_batch=16).build([source], log=lambda *a: None,
                                                                  workers=1)
    thread.join(timeout=30)
    assert waiter.tokens is not None and waiter.tokens.num_rows == source.num_rows
    assert not [f for f in os.listdir(cache) if ".tmp" in f]  # the dead builder's file is gone
    # a cache file cut short (say, a disk that filled up before the rename): refused, then rebuilt
    cache_obj = T.TokenCache(cache, tok, MAX_LENGTH)
    path = cache_obj.path(source)
    expected = T.TokenTable(path, MAX_LENGTH, tok.eos_token_id).texts(7, source.columns)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    assert cache_obj.problem(source).startswith("unreadable")
    with pytest.raises(D.DataError, match=f"token cache {path}: unreadable"):
        cache_obj.open([source])
    cache_obj.build([source], log=lambda *a: None, workers=1)
    cache_obj.open([source])
    assert source.tokens.texts(7, source.columns) == expected


def test_two_builders_on_one_host_take_turns(tmp_path, tok, small_demo_dir):
    """Two processes building one cache (two runs sharing --token-cache, or every rank of a
    test) never write the same temporary file at once: the second waits, then finds it built."""
    folder, cache = str(tmp_path / "d"), str(tmp_path / "cache")
    os.makedirs(folder)
    for name in ("bbc_topic_classification.parquet", "task_types.csv"):
        shutil.copy(os.path.join(small_demo_dir, name), folder)
    (source,) = D.load_sources(folder)
    built = []
    threads = [threading.Thread(target=T.TokenCache(cache, tok, MAX_LENGTH, rows_per_batch=16,
                                                    poll_s=0.05).build,
                                args=([source],), kwargs=dict(log=built.append, workers=1))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(built) == 1 and T.TokenCache(cache, tok, MAX_LENGTH).problem(source) is None


def test_batches_read_the_memory_map(small_demo_dir, tok, cache_dir):
    """Opening the cache and drawing batches allocates no Arrow memory: ids come from the
    memory-mapped file (shared page cache), not from a copy per process."""
    sources = _sources(small_demo_dir, tok, cache_dir)
    before = pa.total_allocated_bytes()
    stream = D.BatchStream(sources, 8, seed=0)
    for _ in range(20):
        next(stream)
    assert pa.total_allocated_bytes() - before < 1e5


# ---------------------------------------------------------------- bad input
def _write(folder, name, rows, task_type="retrieval", types=None):
    os.makedirs(folder, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows) if rows else pa.table({"query": pa.array([], pa.string())}),
                   os.path.join(folder, f"{name}.parquet"))
    with open(os.path.join(folder, "task_types.csv"), "w") as f:
        f.write("dataset,task_type\n" + "".join(f"{n},{t}\n"
                                                for n, t in (types or {name: task_type}).items()))


def _row(n_neg=7, **kw):
    return {"query": "q", "passage": "p", **{f"negative_{i}": f"n{i}" for i in range(1, n_neg + 1)}, **kw}


@pytest.mark.parametrize("rows, task_type, expected", [
    ([{"query": "q", "negative_1": "n"}], "classification",
     ["src.parquet", "missing column 'passage'"]),
    ([], "retrieval", ["src.parquet", "no rows"]),
    ([_row(), _row(query=3)], "retrieval", ["src.parquet", "column 'query'", "expected strings"]),
    ([_row(), _row(), _row(passage="")], "retrieval",
     ["src.parquet", "row 2", "column 'passage'", "empty"]),
    ([_row(), _row(query=None)], "retrieval",
     ["src.parquet", "row 1", "column 'query'", "missing"]),
    ([_row(), _row(negative_3=None)], "retrieval",
     ["src.parquet", "row 1", "column 'negative_3'", "k = 7"]),
    ([_row(n_neg=5)], "retrieval", ["src.parquet", "missing column 'negative_6'"]),
    # read in ranges of 1024 rows: the row number counts from the start of the file
    ([_row()] * 5000 + [_row(passage=None)], "retrieval",
     ["src.parquet", "row 5000", "column 'passage'"]),
    ([_row()] * 4097 + [_row(negative_1="")], "retrieval",
     ["row 4097", "column 'negative_1'", "0 hard negatives"]),
])
def test_bad_files_name_file_row_column(tmp_path, rows, task_type, expected):
    folder = str(tmp_path / "d")
    if rows and rows[-1].get("query") == 3:  # a column of ints
        rows = [_row(query=None), _row(query=None)]
        _write(folder, "src", rows)
        t = pq.read_table(os.path.join(folder, "src.parquet")).set_column(0, "query", pa.array([1, 2]))
        pq.write_table(t, os.path.join(folder, "src.parquet"))
        with open(os.path.join(folder, "task_types.csv"), "w") as f:
            f.write("dataset,task_type\nsrc,retrieval\n")
    else:
        _write(folder, "src", rows, task_type)
    with pytest.raises(D.DataError) as e:
        D.load_sources(folder, strict=True)
    for part in expected:
        assert part in str(e.value), str(e.value)


def test_a_restart_reads_no_text_but_checks_the_task_type_again(tmp_path, monkeypatch):
    """The scan of a file is kept per (path, size, mtime): a second start reads none of the
    text, the checks that depend on the task type still run, and a changed file is scanned."""
    folder, memo = str(tmp_path / "d"), str(tmp_path / "memo")
    _write(folder, "src", [_row(n_neg=3)] * 5, "classification")
    (first,) = D.load_sources(folder, memo_folder=memo)
    with monkeypatch.context() as m:
        m.setattr(D, "read_batches", lambda *a, **k: pytest.fail("the data was read again"))
        (again,) = D.load_sources(folder, memo_folder=memo)
        assert again.columns == first.columns == ["query", "passage", "negative_1", "negative_2",
                                                  "negative_3"]
        assert (again.n_candidates == first.n_candidates).all()
        with open(os.path.join(folder, "task_types.csv"), "w") as f:
            f.write("dataset,task_type\nsrc,retrieval\n")  # k = 7 now
        with pytest.raises(D.DataError, match="src.parquet: missing column 'negative_4'"):
            D.load_sources(folder, memo_folder=memo)
    _write(folder, "src", [_row(n_neg=3)] * 4 + [_row(n_neg=3, passage="")], "classification")
    with pytest.raises(D.DataError, match="row 4, column 'passage': empty"):
        D.load_sources(folder, memo_folder=memo, strict=True)


def test_classification_needs_one_negative(tmp_path):
    folder = str(tmp_path / "d")
    _write(folder, "src", [_row(n_neg=1)] * 3, "classification")
    assert D.load_sources(folder)[0].k == 1


def test_source_missing_from_type_table(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([_row()]), folder / "my_source.parquet")
    with pytest.raises(D.DataError,
                       match=r"my_source.parquet.*'my_source' is not in .*task_types.csv"):
        D.load_sources(str(folder))


def test_released_source_name_needs_no_table(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([_row(n_neg=1)]), folder / "imdb.parquet")
    assert D.load_sources(str(folder))[0].task_type == "classification"


def test_not_parquet_jsonl_errors_and_mixed_layouts(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "msmarco.parquet").write_text("not parquet")
    with pytest.raises(D.DataError, match="msmarco.parquet: cannot be read as parquet"):
        D.load_sources(str(folder))
    (folder / "msmarco.jsonl").write_text('{"query": "q"}\n')
    with pytest.raises(D.DataError, match="mixes .parquet and .jsonl"):
        D.load_sources(str(folder))
    (folder / "msmarco.parquet").unlink()
    (folder / "msmarco.jsonl").write_text(json.dumps(_row()) + "\n" + '{"query": 5}\n')
    with pytest.raises(D.DataError,
                       match=r"msmarco.jsonl line 2, column 'query': expected a string"):
        D.load_sources(str(folder))
    (folder / "msmarco.jsonl").unlink()
    with pytest.raises(D.DataError, match="no .parquet or .jsonl files"):
        D.load_sources(str(folder))


@pytest.mark.slow
def test_random_demo_negatives_keep_the_headlines_and_every_other_draw(tmp_path, demo_dir):
    """--demo-negatives random (the ablation): the same headlines, each with 24 other articles
    of its topic instead of its mined negatives; clustering and classification unchanged."""
    demo.write_demo_sample(str(tmp_path), seed=0, negatives="random")
    topic_of = {a["body"]: a["topic"] for a in demo.bbc_articles() if not a["heldout"]}
    for name in os.listdir(demo_dir):
        if not name.endswith(".parquet"):
            continue
        mined, random = (pq.read_table(os.path.join(d, name)).to_pylist() for d in (demo_dir, tmp_path))
        assert [r["query"] for r in mined] == [r["query"] for r in random], name
        if name in ("bbc_topic_clustering.parquet", "bbc_topic_classification.parquet"):
            assert mined == random, name
        elif name == "bbc_headline_retrieval.parquet":
            for _m, r in zip(mined, random):
                negatives = [r[f"negative_{n}"] for n in range(1, 25)]
                assert len(negatives) == 24 and r["passage"] not in negatives
                assert {topic_of[x] for x in negatives} == {topic_of[r["passage"]]}
            assert sum(m != r for m, r in zip(mined, random)) > 0.9 * len(mined)


# ---------------------------------------------------------------- the released set at scale
def _one_source(tmp_path, small_demo_dir, name="bbc_topic_classification", rows=150):
    folder = str(tmp_path / "d")
    os.makedirs(folder)
    shutil.copy(os.path.join(small_demo_dir, "task_types.csv"), folder)
    table = pq.read_table(os.path.join(small_demo_dir, f"{name}.parquet")).slice(0, rows)
    pq.write_table(table, os.path.join(folder, f"{name}.parquet"))
    return folder, D.load_sources(folder)[0]


def test_worker_pool_build_is_byte_identical_with_a_progress_line(tmp_path, tok, small_demo_dir):
    """Two tokenizer processes write the same bytes as one; the builder says where it is."""
    _, source = _one_source(tmp_path, small_demo_dir, rows=40)
    files, lines = [], []
    for workers in (1, 2):
        cache = T.TokenCache(str(tmp_path / f"c{workers}"), tok, MAX_LENGTH, rows_per_batch=8)
        cache.build([source], log=lines.append, workers=workers, progress_every=0)
        files.append(pathlib.Path(cache.path(source)).read_bytes())
    assert files[0] == files[1] and len(files[0]) > 10_000
    progress = [line for line in lines if "tokenizing bbc_topic_classification" in line]
    assert len(progress) == 2 * 5  # 40 rows in 5 ranges, per build
    assert "0/1 sources, 8/40 rows" in progress[0] and "tokens/s, ETA" in progress[0]


def test_one_builder_per_file_and_the_stale_lock_rule(tmp_path, tok, small_demo_dir):
    """A lock held by a live builder elsewhere is waited for; one untouched for stale_after_s,
    or held by a dead process of this host, is broken and the file built once; a built file
    is never replaced (its inode stays, a memory map of it stays valid)."""
    folder, source = _one_source(tmp_path, small_demo_dir)
    cache = T.TokenCache(str(tmp_path / "c"), tok, MAX_LENGTH, stale_after_s=60, poll_s=0.02)
    os.makedirs(cache.folder)
    lock = cache.path(source) + ".lock"
    pathlib.Path(lock).write_text("another-node 12345\n")
    built = []
    thread = threading.Thread(target=cache.build, args=([source],),
                              kwargs=dict(log=built.append, workers=1))
    thread.start()
    thread.join(timeout=0.5)
    assert thread.is_alive() and cache.problem(source) == "no cache file yet"  # waiting, not building
    os.utime(lock, (time.time() - 120, time.time() - 120))  # that builder stopped touching it
    thread.join(timeout=30)
    assert not thread.is_alive() and cache.problem(source) is None and len(built) == 1
    assert not os.path.exists(lock)
    # a dead builder on this host: its lock is broken at once
    other = D.load_sources(folder, seed=1)[0]
    dead = subprocess.Popen(["true"])
    dead.wait()
    cache2 = T.TokenCache(str(tmp_path / "c"), tok, MAX_LENGTH + 1, poll_s=0.02)
    pathlib.Path(cache2.path(other) + ".lock").write_text(f"{socket.gethostname()} {dead.pid}\n")
    cache2.build([other], log=lambda *a: None, workers=1)
    assert cache2.problem(other) is None
    # built files are left alone: same inode, the open map still reads
    table = T.TokenTable(cache.path(source), MAX_LENGTH, tok.eos_token_id)
    inode = os.stat(cache.path(source)).st_ino
    cache.build([source], workers=1)
    assert os.stat(cache.path(source)).st_ino == inode and table.texts(3, ["query"])


def test_rows_that_cannot_train_are_skipped_counted_and_named(tmp_path):
    folder = str(tmp_path / "d")
    rows = [_row(query=f"q{i}", passage=f"p{i}") for i in range(300)]
    rows[5]["passage"], rows[9]["query"], rows[17]["negative_3"] = "", None, ""
    _write(folder, "src", rows)
    (src,) = D.load_sources(folder, val_fraction=0.1)
    assert {why: r.tolist() for why, r in src.skipped.items()} == {
        "empty query": [9], "empty passage": [5], "fewer than k = 7 negatives": [17]}
    used = np.concatenate([src.train_rows, src.val_rows])
    assert sorted(used.tolist()) == sorted(set(range(300)) - {5, 9, 17})
    stream = D.BatchStream([src], 32, seed=0)  # every usable training row, every epoch
    assert {int(r) for _, rows in stream.plan for r in rows} == set(src.train_rows.tolist())
    report = D.data_report([src])["src"]
    assert report["rows"] == 300 and report["usable"] == 297
    assert report["skipped"]["empty passage"] == {"count": 1, "first_rows": [5]}
    # one row in 100 is the limit: four are an error naming the file and the counts
    rows[40]["passage"] = ""
    _write(folder, "src", rows)
    with pytest.raises(D.DataError, match=r"src.parquet: 4 of its 300 rows cannot train .*"
                                          r"empty passage: 2 \(rows 5, 40\).*fraction 0.01"):
        D.load_sources(folder)
    assert D.load_sources(folder, max_bad_fraction=0.02)[0].num_rows == 300
    with pytest.raises(D.DataError, match="row 5, column 'passage': empty"):
        D.load_sources(folder, strict=True)
    _write(folder, "src", [_row(passage="")] * 3)
    with pytest.raises(D.DataError, match="3 of its 3 rows cannot train.*none is left"):
        D.load_sources(folder, max_bad_fraction=0.99)


def test_released_set_downloaded_once_per_node(tmp_path, monkeypatch, small_demo_dir):
    """Local rank 0 downloads (a stub of snapshot_download: no network); the node's other
    ranks wait for its marker file; a rank nobody answers stops with a clear error."""
    import huggingface_hub
    calls = []

    def snapshot_download(repo, repo_type):
        calls.append((repo, repo_type))
        time.sleep(0.3)  # the others are already waiting
        return small_demo_dir
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    marker, paths = str(tmp_path / "out" / ".downloads" / "v2-node0"), {}

    def rank(local_rank):
        paths[local_rank] = D.download_released_data("v2", local_rank, marker, poll_s=0.02)
    threads = [threading.Thread(target=rank, args=(r,)) for r in (1, 2, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert calls == [("codefuse-ai/F2LLM-v2", "dataset")]
    assert paths == {0: small_demo_dir, 1: small_demo_dir, 2: small_demo_dir}
    with pytest.raises(D.DataError, match="for local rank 0 to download codefuse-ai/F2LLM .*no "):
        D.download_released_data("v1", 1, str(tmp_path / "none"), timeout_s=0.1, poll_s=0.02)
    # train.py without --data: the download, the data set's table, the report in OUT
    import train
    cfg = train.parse_config(["--size", "0.6b", "--out", str(tmp_path / "run"),
                              "--data-set", "v2", "--val-fraction", "0.5"])
    sources, _, _ = train.setup_data(cfg, 0, 1)
    assert calls[-1] == ("codefuse-ai/F2LLM-v2", "dataset") and len(sources) == 4
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert {s: r["usable"] for s, r in report.items()} == {s.name: 150 for s in sources}


def test_v2_table_from_the_official_lists_and_an_extra_column_is_ignored(tmp_path):
    with open(D.DATA_SETS["v2"][1], newline="") as f:
        v2 = list(csv.DictReader(f))
    assert len(v2) == len({r["dataset"] for r in v2}) == 502  # F2LLM/utils.py lines 8-10
    assert collections.Counter(r["task_type"] for r in v2) == {
        "retrieval": 459, "clustering": 33, "classification": 10}
    assert {r["hard_negatives"] for r in v2 if r["task_type"] == "clustering"} == {"9"}
    v1 = D.read_task_types()
    types = D.read_task_types(table=D.DATA_SETS["v2"][1])
    assert len(v1) == 62 and all(types[name] == t for name, t in v1.items())  # v1 within v2
    folder = str(tmp_path / "d")
    os.makedirs(folder)
    pq.write_table(pa.Table.from_pylist([{**_row(), "lang": "eng"}] * 4),
                   os.path.join(folder, "webfaq_eng.parquet"))
    with pytest.raises(D.DataError, match="'webfaq_eng' is not in .*f2llm_v1_datasets.csv"):
        D.load_sources(folder)
    (src,) = D.load_sources(folder, task_table=D.DATA_SETS["v2"][1])
    assert src.task_type == "retrieval" and "lang" not in src.columns


@pytest.mark.parametrize("argv, message", [
    (["--max-bad-fraction", "1.5"], "--max-bad-fraction must be in [0, 1), got 1.5"),
    (["--tokenize-workers", "-1"], "--tokenize-workers must be >= 0"),
    (["--strict-data"], "src.parquet, row 3, column 'passage': empty or missing text"),
    ([], "src.parquet: 1 of its 5 rows cannot train (empty passage: 1 (rows 3))"),
    ([], "rows count from 0"),  # the 4th row is row 3, and the message says so
])
def test_data_flags_fail_before_any_model(tmp_path, argv, message):
    import train
    folder = str(tmp_path / "d")
    _write(folder, "src", [_row()] * 3 + [_row(passage="")] + [_row()])
    with pytest.raises(SystemExit) as e:
        train.main(["--data", folder, "--out", str(tmp_path / "out")] + argv)
    assert message in str(e.value)
    # before the config and any model; at most the scans' memos (the next start reads no text)
    assert not (tmp_path / "out" / "config.json").exists()
    assert {p.name for p in (tmp_path / "out").glob("*")} <= {"token_cache"}


def test_export_prompts_are_the_instructions_the_run_trained_with(small_demo_dir):
    """The tiny preset's own instructions, named as mteb's sentence-transformers loader looks
    them up (query, document, task types); a run on the released set stores the paper's per
    mteb task, never on a document; no sources: the web-search query prompt."""
    from tiny import demo
    sources = D.load_sources(small_demo_dir)
    own = {name: D.instruct(demo.DEMO_INSTRUCTIONS[f"bbc_{name}"], "") for name in
           ["headline_retrieval", "topic_clustering", "topic_classification"]}
    assert D.export_prompts(sources) == {"query": own["headline_retrieval"], "document": "",
                                         "Clustering": own["topic_clustering"],
                                         "Classification": own["topic_classification"]}
    released = [D.Source(name, "", task_type, 7, [], np.zeros(1), np.zeros(1), np.zeros(0))
                for name, task_type in list(D.read_task_types().items())[:3]]
    paper = D.export_prompts(released)
    assert paper["ArguAna"] == D.instruct("Given a claim, find documents that refute the "
                                          "claim.", "") and paper["ArguAna-document"] == ""
    assert paper["STS12"] == D.instruct("Retrieve semantically similar text.", "")
    assert len(paper) == 2 + 2 * 41 and paper["document"] == ""
    assert D.export_prompts() == {"query": D.instruct(D.DEFAULT_QUERY_INSTRUCTION, ""),
                                  "document": ""}
