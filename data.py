"""F2LLM training data: checked sources -> (token ids, cached once by runtime/tokens.py) -> one
global batch per step.

Contract:
- `download_released_data(data_set, ...)`: the released set (`DATA_SETS`: F2LLM v1 or v2) from
  the hub, downloaded once per node, the node's other processes waiting on a marker file.
- `load_sources(folder)` checks every `{source}.parquet` (or `{source}.jsonl`) of the released
  layout (`query`, `passage`, `negative_1` .. `negative_24`; other columns are ignored) row
  range by row range, without keeping its texts; the task type comes from the data set's table
  (a `task_types.csv` in the folder overrides or extends it). Bad input raises `DataError`
  naming the file, row and column, before any model is loaded. A row that cannot train (an
  empty query or passage, fewer usable negatives than k) is skipped and counted
  (`data_report`), unless `strict`. 1% of each source (`val_fraction`) is held out.
- runtime/tokens.py's `TokenCache` tokenizes each source once and memory-maps it into
  `source.tokens`; this file does not import it (the batches only call `source.tokens.texts`).
- `BatchStream(sources, batch_size, seed, sampling)` yields `Batch`es of token ids, each
  ending with EOS: every batch holds rows of ONE source, every training row is in a batch
  every epoch (the last batch of a source wraps around to the start of its order), and k
  negatives per query are sampled from its candidates. The stream is a pure function of
  (seed, epoch, position), so every rank computes the same global batch and takes its slice
  with `batch.shard(rank, world)`, and `state_dict()` is two integers.
- `instruct` and `export_prompts`: F2LLM's instruction format (the demo sample is tiny/demo.py).
- Your own data in this layout: tools/mine.py (hard-negative mining, labelled-text conversions).
Importing this file does nothing.
"""
import csv
import glob
import hashlib
import json
import os
import re
import socket
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
TASK_TABLE = os.path.join(HERE, "reference", "f2llm_v1_datasets.csv")
# --data-set: the released sets, (hub dataset id, source -> task type table). v2's table is the
# official v2 code's three lists (docs/data.md), 502 sources; its own config samples k = 9
# negatives for clustering (hard_negatives column), where v1 samples 7.
DATA_SETS = {"v1": ("codefuse-ai/F2LLM", TASK_TABLE),
             "v2": ("codefuse-ai/F2LLM-v2",
                    os.path.join(HERE, "reference", "f2llm_v2_datasets.csv"))}
K_BY_TYPE = {"retrieval": 7, "clustering": 7, "classification": 1}  # hard negatives per query
SAMPLING_RULES = ("official", "remaining")  # how the next batch's source is drawn (BatchStream)


class DataError(ValueError):
    """Bad training data; the message names the file, row and column and what to do."""


@dataclass
class Source:
    name: str
    path: str
    task_type: str
    k: int
    columns: list[str]  # the text columns: query, passage, negative_1 .. negative_m
    n_candidates: np.ndarray  # (rows,) usable negatives per row (the first n are non-empty)
    train_rows: np.ndarray  # (rows - held out,) int32 row ids used for training
    val_rows: np.ndarray  # int32 row ids held out
    skipped: dict = field(default_factory=dict)  # why -> row ids left out (cannot train)
    tokens: object = None  # a tokens.TokenTable, set by tokens.TokenCache.open
    teacher_tokens: object = None  # the same, in a teacher's own tokenizer's ids (--teacher)
    digest: str = ""  # sha256 of the file's bytes: what the token cache's key names

    @property
    def num_rows(self) -> int:
        return len(self.n_candidates)


@dataclass
class Batch:
    source: str
    task_type: str
    queries: list[list[int]]  # (B,) token ids, each ending with EOS
    positives: list[list[int]]  # (B,)
    negatives: list[list[list[int]]]  # (B, k)
    cut: list[int] = field(default_factory=list)  # (B,) texts of each row cut to max_length
    teacher: "Batch | None" = None  # the same texts in a teacher's tokenizer; None = same ids

    @property
    def truncated(self) -> int:
        return sum(self.cut)

    def sequences(self) -> list[list[int]]:
        """The S = B * (2 + k) id lists in the order the loss reads them: [queries; positives;
        negatives row by row]."""
        return self.queries + self.positives + [n for negs in self.negatives for n in negs]

    def shard(self, rank: int, world: int) -> "Batch":
        b = len(self.queries) // world
        s = slice(rank * b, (rank + 1) * b)
        return Batch(self.source, self.task_type, self.queries[s], self.positives[s],
                     self.negatives[s], self.cut[s],
                     self.teacher.shard(rank, world) if self.teacher else None)


# ---------------------------------------------------------------------------- reading
def read_task_types(folder: str | None = None, table: str = TASK_TABLE) -> dict[str, str]:
    """Source name -> task type: the released sources of `table`, then `folder/task_types.csv`."""
    paths = [table] + ([os.path.join(folder, "task_types.csv")] if folder else [])
    types = {}
    for path in paths:
        if not os.path.exists(path):
            continue
        with open(path, newline="") as f:
            for line, row in enumerate(csv.DictReader(f), start=2):
                if row.get("task_type") not in K_BY_TYPE:
                    raise DataError(f"{path} line {line}: task_type {row.get('task_type')!r} "
                                    f"is not one of {sorted(K_BY_TYPE)}")
                types[row["dataset"]] = row["task_type"]
    return types


def _read_jsonl(path: str) -> pa.Table:
    rows = []
    with open(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {line_no}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {line_no}: expected a JSON object per line")
            for column, value in row.items():
                if value is not None and not isinstance(value, str):
                    raise DataError(f"{path} line {line_no}, column {column!r}: expected a "
                                    f"string, got {type(value).__name__}")
            rows.append(row)
    columns = sorted({c for r in rows for c in r})
    return pa.Table.from_pylist(rows, schema=pa.schema([(c, pa.string()) for c in columns]))


def _not_parquet(path, e) -> DataError:
    return DataError(f"{path}: cannot be read as parquet ({e}); re-export it with "
                     f"pandas.DataFrame.to_parquet or pyarrow.parquet.write_table")


def read_table(path: str) -> pa.Table:
    """A whole file in memory: for small inputs (tools/mine.py); training streams (read_batches)."""
    if path.endswith(".jsonl"):
        return _read_jsonl(path)
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise _not_parquet(path, e) from None


def _parquet(path: str) -> pq.ParquetFile:
    try:  # pages are streamed, never a whole row group at once
        return pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
    except (pa.ArrowInvalid, OSError) as e:
        raise _not_parquet(path, e) from None


def read_batches(path: str, columns: list[str], size: int = 1024):
    """A source file's columns, `size` rows at a time (a .jsonl file is read whole first)."""
    if path.endswith(".jsonl"):
        yield from _read_jsonl(path).select(columns).to_batches(size)
        return
    try:
        yield from _parquet(path).iter_batches(size, columns=columns, use_threads=False)
    except (pa.ArrowInvalid, OSError) as e:
        raise _not_parquet(path, e) from None


def _scan(path: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The checks that do not depend on the task type, streaming through the file one column
    at a time (the parquet reader then holds one column's pages, not 26). Returns the file's
    column names, the number of usable negatives per row and, per row, its first empty text
    column (1 = query, 2 = passage, 0 = none)."""
    if path.endswith(".jsonl"):
        table = _read_jsonl(path)  # small files: read whole, once
        schema, num_rows, chunks = table.schema, table.num_rows, lambda column: [table[column]]
    else:
        f = _parquet(path)
        schema, num_rows = f.schema_arrow, f.metadata.num_rows
        chunks = lambda column: (b[column] for b in read_batches(path, [column]))
    if num_rows == 0:
        raise DataError(f"{path}: the file has no rows; remove it from the data folder")
    for column in ["query", "passage"]:
        if column not in schema.names:
            raise DataError(f"{path}: missing column {column!r} (found {schema.names}); "
                            f"the layout is query, passage, negative_1 .. negative_n")
    columns = _text_columns(schema.names)
    for column in columns:
        if not pa.types.is_string(schema.field(column).type) and \
                not pa.types.is_large_string(schema.field(column).type):
            raise DataError(f"{path}, column {column!r}: expected strings, found "
                            f"{schema.field(column).type}; convert the column to text")
    n = np.zeros(num_rows, dtype=np.int16)
    empty = np.zeros(num_rows, dtype=np.int8)
    alive = np.ones(num_rows, dtype=bool)  # usable negatives: the leading run of non-empty ones
    for column in columns:
        filled = np.concatenate([np.asarray(pc.fill_null(pc.greater(pc.binary_length(c), 0), False))
                                 for c in chunks(column)])  # (rows,) a non-empty text
        if column in ("query", "passage"):
            empty[(empty == 0) & ~filled] = EMPTY_COLUMNS.index(column)
        else:
            alive &= filled
            n += alive
    return schema.names, n, empty


EMPTY_COLUMNS = (None, "query", "passage")  # the codes of _scan's `empty`
# every row number this project prints or writes (errors, skipped rows, data_report.json)
ROWS_FROM_0 = "rows count from 0, as pyarrow's slice and pandas' iloc"


def _text_columns(names: list[str]) -> list[str]:
    m = 0  # candidates: negative_1 .. negative_m, numbered without gaps
    while f"negative_{m + 1}" in names:
        m += 1
    return ["query", "passage"] + [f"negative_{i}" for i in range(1, m + 1)]


def _check_file(path: str, k: int, memo_folder: str | None):
    """Check one source; return its text columns, usable negatives per row, first empty text
    column per row (`_scan`) and the sha256 of its bytes. The result is kept in memo_folder per
    data file (path, size, mtime): a restart reads no text."""
    stat = os.stat(path)
    identity = f"{os.path.realpath(path)} {stat.st_size} {stat.st_mtime_ns}"
    key = hashlib.sha256(identity.encode()).hexdigest()
    memo = memo_folder and os.path.join(memo_folder,
                                        f"{os.path.basename(path)}-{key[:16]}.checked3.npz")
    if memo and os.path.exists(memo):
        with np.load(memo) as z:
            names, n, empty = z["names"].tolist(), z["n_candidates"], z["empty"]
            digest = str(z["digest"])
    else:
        names, n, empty = _scan(path)
        with open(path, "rb") as f:  # ~1 GB/s: a small part of the scan's time
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if memo:  # every rank may write it: a temporary name each, then an atomic rename
            os.makedirs(memo_folder, exist_ok=True)
            tmp = f"{memo}.tmp-{socket.gethostname()}-{os.getpid()}"
            with open(tmp, "wb") as f:
                np.savez(f, names=np.array(names), n_candidates=n, empty=empty,
                         digest=np.array(digest))
            os.replace(tmp, memo)
    for i in range(1, k + 1):  # the checks that depend on the task type
        if f"negative_{i}" not in names:
            raise DataError(f"{path}: missing column 'negative_{i}' (found {names}); the layout "
                            f"is query, passage, negative_1 .. negative_n with n >= {k}")
    return _text_columns(names), n, empty, digest


def _skipped_rows(path: str, k: int, n: np.ndarray, empty: np.ndarray, strict: bool,
                  max_bad_fraction: float) -> dict[str, np.ndarray]:
    """The rows that cannot train, by reason. strict: the first one is an error. Otherwise an
    error only if the source keeps no row or loses more than max_bad_fraction of them: that
    many bad rows say the file is broken, not that a few rows are."""
    if strict and empty.any():
        row = int(np.flatnonzero(empty)[0])
        raise DataError(f"{path}, row {row}, column {EMPTY_COLUMNS[empty[row]]!r}: empty or "
                        f"missing text; drop the row or fill it in (or leave out --strict-data); "
                        f"{ROWS_FROM_0}")
    if strict and (n < k).any():
        row = int(np.flatnonzero(n < k)[0])
        raise DataError(f"{path}, row {row}, column 'negative_{n[row] + 1}': this row has "
                        f"{n[row]} hard negatives but its task type needs k = {k}; drop the "
                        f"row or mine more negatives (or leave out --strict-data); {ROWS_FROM_0}")
    skipped = {"empty query": np.flatnonzero(empty == 1),
               "empty passage": np.flatnonzero(empty == 2),
               f"fewer than k = {k} negatives": np.flatnonzero((empty == 0) & (n < k))}
    skipped = {why: rows.astype(np.int32) for why, rows in skipped.items() if len(rows)}
    bad = sum(len(rows) for rows in skipped.values())
    if bad == len(n) or bad > max_bad_fraction * len(n):
        counts = "; ".join(f"{why}: {len(rows)} (rows {_first(rows)})"
                           for why, rows in skipped.items())
        limit = ("none is left" if bad == len(n)
                 else f"more than --max-bad-fraction {max_bad_fraction}")
        raise DataError(f"{path}: {bad} of its {len(n)} rows cannot train ({counts}): {limit}; "
                        f"fix the file or remove it from the data folder; {ROWS_FROM_0}")
    return skipped


def _first(rows: np.ndarray, few: int = 5) -> str:
    return ", ".join(map(str, rows[:few].tolist())) + (", ..." if len(rows) > few else "")


def load_sources(folder: str, seed: int = 0, val_fraction: float = 0.01,
                 memo_folder: str | None = None, task_table: str = TASK_TABLE,
                 strict: bool = False, max_bad_fraction: float = 0.01,
                 k_clustering: int = K_BY_TYPE["clustering"]) -> list[Source]:
    """Check every source file in `folder` (keeping each file's scan in `memo_folder`, if
    given) against the task types of `task_table`. Rows that cannot train are left out of both
    splits (`Source.skipped`; strict: an error). Raises DataError on any problem."""
    if not os.path.isdir(folder):
        raise DataError(f"--data {folder}: no such folder")
    parquet = sorted(glob.glob(os.path.join(folder, "**", "*.parquet"), recursive=True))
    jsonl = sorted(glob.glob(os.path.join(folder, "**", "*.jsonl"), recursive=True))
    if parquet and jsonl:
        raise DataError(f"--data {folder}: mixes .parquet and .jsonl files; keep one layout "
                        f"per folder")
    paths = parquet or jsonl
    if not paths:
        raise DataError(f"--data {folder}: no .parquet or .jsonl files; the layout is one "
                        f"{{source}}.parquet per source (docs/design.md §2)")
    types = read_task_types(folder, task_table)
    sources = []
    for path in paths:
        name = os.path.basename(path).rsplit(".", 1)[0]
        if name not in types:
            raise DataError(f"{path}: source {name!r} is not in {task_table}; add a line "
                            f"'{name},<retrieval|clustering|classification>' to "
                            f"{os.path.join(folder, 'task_types.csv')} (header: dataset,task_type)")
        k = k_clustering if types[name] == "clustering" else K_BY_TYPE[types[name]]
        columns, n_candidates, empty, digest = _check_file(path, k, memo_folder)
        skipped = _skipped_rows(path, k, n_candidates, empty, strict, max_bad_fraction)
        rows = np.random.default_rng([seed,
                                      len(sources)]).permutation(len(n_candidates)).astype(np.int32)
        if skipped:  # the split of the usable rows keeps the order a clean file would have
            rows = rows[(empty == 0)[rows] & (n_candidates >= k)[rows]]
        n_val = int(len(rows) * val_fraction)
        sources.append(Source(name, path, types[name], k, columns, n_candidates,
                              np.sort(rows[n_val:]), np.sort(rows[:n_val]), skipped,
                              digest=digest))
    return sources


def data_report(sources: list[Source]) -> dict:
    """Per source: rows, rows that train, and the rows skipped by reason (count, first rows,
    counting from 0); train.py prints it at the start and writes it to OUT/data_report.json."""
    return {s.name: {"file": s.path, "rows": s.num_rows,
                     "usable": s.num_rows - sum(len(r) for r in s.skipped.values()),
                     "skipped": {why: {"count": len(r), "first_rows": r[:10].tolist()}
                                 for why, r in s.skipped.items()}} for s in sources}


def iter_texts(sources: list[Source], columns=("query", "passage")):
    """The texts of these columns, source by source, streamed from the data files (the tiny
    preset trains its tokenizer on them)."""
    for source in sources:
        for column in columns:
            for batch in read_batches(source.path, [column]):
                yield from batch[column].to_pylist()


# ---------------------------------------------------------------------------- the released set
def download_released_data(data_set: str, local_rank: int, marker: str,
                           timeout_s: float = 6 * 3600, poll_s: float = 2.0) -> str:
    """The local folder of a released set (`DATA_SETS`), downloaded once per node: local rank 0
    downloads it with huggingface_hub's snapshot_download (or finds it in the Hugging Face
    cache) and then writes `marker`, a file naming the folder; the node's other ranks wait for
    the marker, up to timeout_s. A download of tens of GB outlasts NCCL's 10-minute watchdog,
    so nobody waits for it in a collective. `marker` must be unique to the node and the launch
    (train.py: the host, the torchrun agent's pid and the restart)."""
    repo = DATA_SETS[data_set][0]
    if local_rank == 0:
        from huggingface_hub import snapshot_download
        path = snapshot_download(repo, repo_type="dataset")
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        with open(marker + ".tmp", "w") as f:
            json.dump({"repo": repo, "path": path}, f)
        os.replace(marker + ".tmp", marker)  # the waiting ranks never read half a marker
        return path
    deadline = time.time() + timeout_s
    while not os.path.exists(marker):
        if time.time() > deadline:
            raise DataError(f"waited {timeout_s / 3600:.1f} h for local rank 0 to download {repo} "
                            f"(no {marker}); check its log, or download it first and pass --data")
        time.sleep(poll_s)
    with open(marker) as f:
        return json.load(f)["path"]


# ---------------------------------------------------------------------------- batches
def make_batch(source: Source, rows: np.ndarray, rng: np.random.Generator) -> Batch:
    """Rows of one source -> a Batch of token ids with k negatives per query sampled from its
    candidates (and the same texts in a teacher's ids, if its tokens are open). Needs
    `source.tokens` (tokens.TokenCache.open)."""
    picks = [rng.choice(int(source.n_candidates[row]), size=source.k, replace=False)
             for row in rows]
    columns = [["query", "passage"] + [f"negative_{j + 1}" for j in p] for p in picks]

    def read(table) -> Batch:  # a tokens.TokenTable
        queries, positives, negatives, cut = [], [], [], []
        for row, cols in zip(rows, columns):
            texts = table.texts(int(row), cols)
            queries.append(texts[0][0])
            positives.append(texts[1][0])
            negatives.append([ids for ids, _ in texts[2:]])
            cut.append(sum(was_cut for _, was_cut in texts))
        return Batch(source.name, source.task_type, queries, positives, negatives, cut)
    batch = read(source.tokens)
    batch.teacher = read(source.teacher_tokens) if source.teacher_tokens else None
    return batch


def source_order(batches: list[int], rng: np.random.Generator, sampling: str) -> np.ndarray:
    """The source of each batch of one epoch, given each source's number of batches.

    remaining: the next source is drawn in proportion to its batches LEFT, which is the same
      as shuffling the multiset of batch labels; every stretch of the epoch mixes the sources
      in about the same proportions.
    official (the official code): the next source is drawn with a FIXED weight, its number of
      batches at the start of the epoch; a source drops out when it is exhausted, so the
      weights renormalise over the rest. Noisier: a source may run dry early or late."""
    if sampling == "remaining":
        return rng.permutation(np.repeat(np.arange(len(batches)), batches))
    weights, left, order = np.array(batches, dtype=float), np.array(batches), []
    for _ in range(sum(batches)):
        p = weights * (left > 0)
        order.append(rng.choice(len(batches), p=p / p.sum()))
        left[order[-1]] -= 1
    return np.array(order, dtype=np.int64)


class BatchStream:
    """The global batches of a run, epoch after epoch; identical on every rank."""

    def __init__(self, sources: list[Source], batch_size: int, seed: int,
                 sampling: str = "official"):
        if sampling not in SAMPLING_RULES:
            raise DataError(f"--source-sampling {sampling}: use one of {', '.join(SAMPLING_RULES)}")
        self.sources, self.batch_size = sources, batch_size
        self.seed, self.sampling = seed, sampling
        # every training row trains every epoch: a partial last batch is filled (below)
        self.source_batches = [-(-len(s.train_rows) // batch_size) for s in sources]
        self.epoch, self.position = 0, 0
        self.plan = self._plan(0)

    def _plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """One epoch: (source id, row ids) per batch."""
        per_source = []
        for sid, (source, n) in enumerate(zip(self.sources, self.source_batches)):
            rows = np.random.default_rng([self.seed, epoch, sid]).permutation(source.train_rows)
            # the last batch wraps around to the start of this epoch's order (accelerate's
            # even batches, as the official loader): a source smaller than one batch repeats rows
            per_source.append(np.resize(rows, n * self.batch_size).reshape(n, self.batch_size))
        order = source_order(self.source_batches, np.random.default_rng([self.seed, epoch]),
                             self.sampling)
        taken = [0] * len(self.sources)
        plan = []
        for sid in order:
            plan.append((int(sid), per_source[sid][taken[sid]]))
            taken[sid] += 1
        return plan

    @property
    def batches_per_epoch(self) -> int:
        return len(self.plan)

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if self.position == len(self.plan):
            self.epoch, self.position = self.epoch + 1, 0
            self.plan = self._plan(self.epoch)
        sid, rows = self.plan[self.position]
        rng = np.random.default_rng([self.seed, self.epoch, self.position, 1])  # negatives
        self.position += 1
        return make_batch(self.sources[sid], rows, rng)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self.plan = self._plan(self.epoch)


class ValidationBatches:
    """The held-out rows, in single-source batches of at most batch_size, each a multiple of
    the world size (a remainder of fewer than `world` rows is left out). Iterating builds one
    batch at a time: the ids of 1% of the released set would take GBs of lists per rank."""

    def __init__(self, sources: list[Source], batch_size: int, world: int, seed: int):
        self.sources, self.seed = sources, seed
        self.plan = []  # (source id, first index in val_rows, row ids)
        for sid, source in enumerate(sources):
            for start in range(0, len(source.val_rows), batch_size):
                rows = source.val_rows[start:start + batch_size]
                if len(rows) >= world:
                    self.plan.append((sid, start, rows[: len(rows) // world * world]))

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self):
        for sid, start, rows in self.plan:
            yield make_batch(self.sources[sid], rows,
                             np.random.default_rng([self.seed, sid, start]))


# ---------------------------------------------------------------------------- instructions
def instruct(instruction: str, text: str) -> str:
    return f"Instruct: {instruction}\nQuery: {text}"


# mteb's F2LLM loader uses this instruction where a task names none; an export stores it as
# the SentenceTransformer "query" prompt when no source of the run carries a retrieval one.
DEFAULT_QUERY_INSTRUCTION = ("Given a web search query, retrieve relevant passages that answer "
                             "the query")
INSTRUCTION = re.compile(r"Instruct: (.*?)\nQuery: ", re.S)
# the paper's per-task instructions: mteb's F2LLM loaders' prompts_dict (mteb 2.26.24; v1 the
# F2LLM models', v2 the F2LLM-v2 models'), copied so that training never imports mteb
PAPER_PROMPTS = os.path.join(HERE, "reference", "f2llm_mteb_prompts.json")
# the run's task types as mteb names them: mteb's sentence-transformers loader gives every
# text of a task the prompt named by its type when the task's name has none
MTEB_TASK_TYPES = {"clustering": "Clustering", "classification": "Classification"}


def source_instruction(source: Source) -> str | None:
    """The instruction a source's queries carry (`Instruct: {i}\nQuery: `), the most common
    one among its first 64 rows; None if they carry none."""
    queries = next(read_batches(source.path, ["query"], 64))["query"].to_pylist()
    found = [m.group(1) for q in queries if q and (m := INSTRUCTION.match(q))]
    return max(found, key=found.count) if found else None


def export_prompts(sources: list[Source] = (), data_set: str = "v1") -> dict:
    """The SentenceTransformer prompts an export stores, named as mteb's sentence-transformers
    loader looks them up (task name, then task type, then query/document), so `encode_query`,
    `encode_document` and mteb give a text the instruction training gave it:
    - "query": `Instruct: {i}\nQuery: `, i the instruction of the run's first retrieval source
      (file name order: the tiny preset's is the headline one); "document": nothing;
    - "Clustering", "Classification": the instruction of the run's first source of that type;
    - on the released set (every source named in data_set's table), whose queries carry an
      instruction per source: the paper's, per mteb task, on every text of the task but a
      document, as mteb's F2LLM loader gives them.
    No sources (an untrained model): the web-search query instruction only."""
    prompts = {"query": instruct(DEFAULT_QUERY_INSTRUCTION, ""), "document": ""}
    released = read_task_types(None, DATA_SETS[data_set][1])
    if sources and all(s.name in released for s in sources):
        with open(PAPER_PROMPTS) as f:
            for task, instruction in json.load(f)[data_set].items():
                prompts[task], prompts[f"{task}-document"] = instruct(instruction, ""), ""
        return prompts
    for source in reversed(sources):  # the first source of each type has the last word
        instruction = source_instruction(source)
        key = "query" if source.task_type == "retrieval" else MTEB_TASK_TYPES[source.task_type]
        if instruction:
            prompts[key] = instruct(instruction, "")
    return prompts
