"""data.py: single-source batches identical on every rank, k by task type, deterministic
per seed, proportional mixing, resumable position; bad files fail naming file, row, column."""
import collections
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data as D


def test_batches_single_source_k_and_shards(demo_dir):
    sources = D.load_sources(demo_dir, seed=0)
    by_name = {s.name: s for s in sources}
    stream = D.BatchStream(sources, batch_size=8, seed=0)
    for _ in range(30):
        batch = next(stream)
        source = by_name[batch.source]
        table = source.table.to_pydict()
        pairs = collections.defaultdict(list)  # BBC has duplicate articles: a pair may be several rows
        for r, qp in enumerate(zip(table["query"], table["passage"])):
            pairs[qp].append(r)
        rows = [pairs[qp] for qp in zip(batch.queries, batch.positives)]  # all from this source
        k = D.K_BY_TYPE[source.task_type]
        assert all(len(n) == k and len(set(n)) == k for n in batch.negatives)
        cands = [[{table[f"negative_{j}"][r] for j in range(1, 25) if f"negative_{j}" in table}
                  for r in rs] for rs in rows]
        assert all(any(set(n) <= c for c in cs) for n, cs in zip(batch.negatives, cands))
        assert all(set(rs) - set(source.val_rows.tolist()) for rs in rows)  # held-out rows never train
        shards = [batch.shard(r, 4) for r in range(4)]
        assert sum((s.queries for s in shards), []) == batch.queries
        assert all(len(s.queries) == 2 and s.source == batch.source for s in shards)


def test_every_rank_sees_the_same_stream(demo_dir):
    """Each rank builds its own stream; the global batches agree without communication."""
    streams = [D.BatchStream(D.load_sources(demo_dir, seed=3), 8, seed=3) for _ in range(2)]
    for _ in range(20):
        a, b = next(streams[0]), next(streams[1])
        assert (a.source, a.queries, a.negatives) == (b.source, b.queries, b.negatives)


def test_deterministic_per_seed_and_seeds_differ(demo_dir):
    def first(seed, n=10):
        stream = D.BatchStream(D.load_sources(demo_dir, seed=seed), 8, seed=seed)
        return [(b.source, b.queries, b.negatives) for b in (next(stream) for _ in range(n))]
    assert first(0) == first(0)
    assert first(0) != first(1)


def test_sources_mixed_in_proportion_and_epoch_covers_all(tmp_path, demo_dir):
    # make one source 3x smaller: it should be drawn ~3x less often, spread over the epoch
    shutil.copytree(demo_dir, tmp_path / "d")
    path = tmp_path / "d" / "bbc_topic_classification.parquet"
    pq.write_table(pq.read_table(path).slice(0, 580), path)
    sources = D.load_sources(str(tmp_path / "d"), seed=0)
    stream = D.BatchStream(sources, 8, seed=0)
    expected = {s.name: len(s.train_rows) // 8 for s in sources}
    seen = [next(stream).source for _ in range(stream.batches_per_epoch)]
    assert collections.Counter(seen) == expected
    first_half = collections.Counter(seen[: len(seen) // 2])
    assert 0.3 < first_half["bbc_topic_classification"] / expected["bbc_topic_classification"] < 0.7


def test_position_save_and_restore(demo_dir):
    sources = D.load_sources(demo_dir, seed=0)
    stream = D.BatchStream(sources, 8, seed=0)
    for _ in range(stream.batches_per_epoch - 2):  # cross an epoch boundary after restoring
        next(stream)
    state = stream.state_dict()
    expected = [next(stream).queries for _ in range(5)]
    again = D.BatchStream(sources, 8, seed=0)
    again.load_state_dict(json.loads(json.dumps(state)))
    assert [next(again).queries for _ in range(5)] == expected


def test_validation_split_is_one_percent_and_disjoint(demo_dir):
    for s in D.load_sources(demo_dir, seed=0):
        assert len(s.val_rows) == int(s.table.num_rows * 0.01)
        assert not set(s.val_rows) & set(s.train_rows)
        assert len(s.val_rows) + len(s.train_rows) == s.table.num_rows


def test_jsonl_layout_reads_like_parquet(tmp_path, demo_dir):
    table = pq.read_table(os.path.join(demo_dir, "bbc_topic_classification.parquet")).slice(0, 50)
    with open(tmp_path / "bbc_topic_classification.jsonl", "w") as f:
        for row in table.to_pylist():
            f.write(json.dumps(row) + "\n")
    shutil.copy(os.path.join(demo_dir, "task_types.csv"), tmp_path)
    (src,) = D.load_sources(str(tmp_path))
    assert src.table.to_pydict() == table.to_pydict() and src.task_type == "classification"


# ---------------------------------------------------------------- bad input
def _write(folder, name, rows, task_type="retrieval"):
    os.makedirs(folder, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows) if rows else pa.table({"query": pa.array([], pa.string())}),
                   os.path.join(folder, f"{name}.parquet"))
    with open(os.path.join(folder, "task_types.csv"), "w") as f:
        f.write(f"dataset,task_type\n{name},{task_type}\n")


def _row(n_neg=7, **kw):
    return {"query": "q", "passage": "p", **{f"negative_{i}": f"n{i}" for i in range(1, n_neg + 1)}, **kw}


@pytest.mark.parametrize("rows, task_type, expected", [
    ([{"query": "q", "negative_1": "n"}], "classification", ["src.parquet", "missing column 'passage'"]),
    ([], "retrieval", ["src.parquet", "no rows"]),
    ([_row(), _row(query=3)], "retrieval", ["src.parquet", "column 'query'", "expected strings"]),
    ([_row(), _row(), _row(passage="")], "retrieval", ["src.parquet", "row 2", "column 'passage'", "empty"]),
    ([_row(), _row(negative_3=None)], "retrieval", ["src.parquet", "row 1", "column 'negative_3'", "k = 7"]),
    ([_row(n_neg=5)], "retrieval", ["src.parquet", "missing column 'negative_6'"]),
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
        D.load_sources(folder)
    for part in expected:
        assert part in str(e.value), str(e.value)


def test_classification_needs_one_negative(tmp_path):
    folder = str(tmp_path / "d")
    _write(folder, "src", [_row(n_neg=1)] * 3, "classification")
    assert D.load_sources(folder)[0].k == 1


def test_source_missing_from_type_table(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([_row()]), folder / "my_source.parquet")
    with pytest.raises(D.DataError, match=r"my_source.parquet.*'my_source' is not in .*task_types.csv"):
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
    with pytest.raises(D.DataError, match=r"msmarco.jsonl line 2, column 'query': expected a string"):
        D.load_sources(str(folder))
    (folder / "msmarco.jsonl").unlink()
    with pytest.raises(D.DataError, match="no .parquet or .jsonl files"):
        D.load_sources(str(folder))
