"""F2LLM training data: checked sources -> token ids cached once -> one global batch per step.

Contract:
- `load_sources(folder)` checks every `{source}.parquet` (or `{source}.jsonl`) of the released
  layout (`query`, `passage`, `negative_1` .. `negative_24`) row range by row range, without
  keeping its texts; the task type comes from `f2llm_v1_datasets.csv` (a `task_types.csv` in
  the folder overrides or extends it). Bad input raises `DataError` naming the file, row and
  column, before any model is loaded. 1% of each source (`val_fraction`) is held out.
- `TokenCache(folder, tokenizer, max_length)` tokenizes each source once into an Arrow file
  keyed by the data file, the tokenizer and max_length (`build`, on one process per node),
  and memory-maps it (`open`, every process): ranks share its pages, nothing is re-tokenized.
- `BatchStream(sources, batch_size, seed, sampling)` yields `Batch`es of token ids, each
  ending with EOS: every batch holds rows of ONE source, every training row is in a batch
  every epoch (the last batch of a source wraps around to the start of its order), and k
  negatives per query are sampled from its candidates. The stream is a pure function of
  (seed, epoch, position), so every rank computes the same global batch and takes its slice
  with `batch.shard(rank, world)`, and `state_dict()` is two integers.
- `instruct` and `export_prompts`: F2LLM's instruction format (the demo sample is demo.py).
- Your own data in this layout: mine.py (hard-negative mining, labelled-text conversions).
Importing this file does nothing.
"""
import csv
import fcntl
import glob
import hashlib
import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
TASK_TABLE = os.path.join(HERE, "reference", "f2llm_v1_datasets.csv")
K_BY_TYPE = {"retrieval": 7, "clustering": 7, "classification": 1}  # hard negatives per query
IN_BATCH_TYPES = {"retrieval"}  # other queries' positives are false negatives elsewhere
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
    tokens: "TokenTable | None" = None  # set by TokenCache.open
    teacher_tokens: "TokenTable | None" = None  # a teacher's own tokenizer's ids (--teacher)

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
def read_task_types(folder: str | None = None) -> dict[str, str]:
    """Source name -> task type: the 62 released sources, then `folder/task_types.csv`."""
    paths = [TASK_TABLE] + ([os.path.join(folder, "task_types.csv")] if folder else [])
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
    """A whole file in memory: for small inputs (mine.py); training streams (`read_batches`)."""
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


def _scan(path: str) -> tuple[list[str], np.ndarray]:
    """The checks that do not depend on the task type, streaming through the file one column
    at a time (the parquet reader then holds one column's pages, not 26). Returns the file's
    column names and the number of usable negatives per row."""
    if path.endswith(".jsonl"):
        table = _read_jsonl(path)  # small files: read whole, once
        schema, num_rows, chunks = table.schema, table.num_rows, lambda column: [table[column]]
    else:
        f = _parquet(path)
        schema, num_rows = f.schema_arrow, f.metadata.num_rows
        chunks = lambda column: (b[column] for b in read_batches(path, [column]))  # noqa: E731
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
    alive = np.ones(num_rows, dtype=bool)  # usable negatives: the leading run of non-empty ones
    for column in columns:
        filled = np.concatenate([np.asarray(pc.fill_null(pc.greater(pc.binary_length(c), 0), False))
                                 for c in chunks(column)])  # (rows,) a non-empty text
        if column in ("query", "passage") and not filled.all():
            raise DataError(f"{path}, row {np.argmin(filled)}, column {column!r}: empty or "
                            f"missing text; drop the row or fill it in")
        if column.startswith("negative_"):
            alive &= filled
            n += alive
    return schema.names, n


def _text_columns(names: list[str]) -> list[str]:
    m = 0  # candidates: negative_1 .. negative_m, numbered without gaps
    while f"negative_{m + 1}" in names:
        m += 1
    return ["query", "passage"] + [f"negative_{i}" for i in range(1, m + 1)]


def _check_file(path: str, k: int, memo_folder: str | None) -> tuple[list[str], np.ndarray]:
    """Check one source; return its text columns and usable negatives per row. The scan's
    result is kept in memo_folder per data file (path, size, mtime): a restart reads no text."""
    stat = os.stat(path)
    identity = f"{os.path.realpath(path)} {stat.st_size} {stat.st_mtime_ns}"
    key = hashlib.sha256(identity.encode()).hexdigest()
    memo = memo_folder and os.path.join(memo_folder,
                                        f"{os.path.basename(path)}-{key[:16]}.checked.npz")
    if memo and os.path.exists(memo):
        with np.load(memo) as z:
            names, n = z["names"].tolist(), z["n_candidates"]
    else:
        names, n = _scan(path)
        if memo:  # every rank may write it: a temporary name each, then an atomic rename
            os.makedirs(memo_folder, exist_ok=True)
            tmp = f"{memo}.tmp-{socket.gethostname()}-{os.getpid()}"
            with open(tmp, "wb") as f:
                np.savez(f, names=np.array(names), n_candidates=n)
            os.replace(tmp, memo)
    for i in range(1, k + 1):  # the checks that depend on the task type
        if f"negative_{i}" not in names:
            raise DataError(f"{path}: missing column 'negative_{i}' (found {names}); the layout "
                            f"is query, passage, negative_1 .. negative_n with n >= {k}")
    if (n < k).any():
        row = int(np.flatnonzero(n < k)[0])
        raise DataError(f"{path}, row {row}, column 'negative_{n[row] + 1}': this row has "
                        f"{n[row]} hard negatives but its task type needs k = {k}; drop the "
                        f"row or mine more negatives")
    return _text_columns(names), n


def load_sources(folder: str, seed: int = 0, val_fraction: float = 0.01,
                 memo_folder: str | None = None,
                 k_clustering: int = K_BY_TYPE["clustering"]) -> list[Source]:
    """Check every source file in `folder` (keeping each file's scan in `memo_folder`, if
    given). Raises DataError on any problem."""
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
                        f"{{source}}.parquet per source (DESIGN §2)")
    types = read_task_types(folder)
    sources = []
    for path in paths:
        name = os.path.basename(path).rsplit(".", 1)[0]
        if name not in types:
            raise DataError(f"{path}: source {name!r} is not in {TASK_TABLE}; add a line "
                            f"'{name},<retrieval|clustering|classification>' to "
                            f"{os.path.join(folder, 'task_types.csv')} (header: dataset,task_type)")
        k = k_clustering if types[name] == "clustering" else K_BY_TYPE[types[name]]
        columns, n_candidates = _check_file(path, k, memo_folder)
        rows = np.random.default_rng([seed,
                                      len(sources)]).permutation(len(n_candidates)).astype(np.int32)
        n_val = int(len(rows) * val_fraction)
        sources.append(Source(name, path, types[name], k, columns, n_candidates,
                              np.sort(rows[n_val:]), np.sort(rows[:n_val])))
    return sources


def iter_texts(sources: list[Source], columns=("query", "passage")):
    """The texts of these columns, source by source, streamed from the data files (the tiny
    preset trains its tokenizer on them)."""
    for source in sources:
        for column in columns:
            for batch in read_batches(source.path, [column]):
                yield from batch[column].to_pylist()


# ---------------------------------------------------------------------------- token cache
CACHE_FORMAT = 1  # bump when the layout of a cache file changes


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what save_pretrained writes (vocab, merges, normalizer, special tokens) and
    of the EOS id: two tokenizers with one fingerprint give the same ids."""
    h = hashlib.sha256(f"{type(tokenizer).__name__} eos={tokenizer.eos_token_id}".encode())
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()


class TokenTable:
    """One source's cached token ids, memory-mapped: its pages live in the page cache, shared
    by every process on the node, not in any process's private memory."""

    def __init__(self, path: str, max_length: int, eos_id: int):
        self.reader = pa.ipc.open_file(pa.memory_map(path))
        self.max_length, self.eos_id = max_length, eos_id
        # record batch i holds rows starts[i] .. starts[i + 1] - 1; batches are read on demand
        # (holding all of them costs ~1 KB of private memory per batch and column)
        self.starts = np.cumsum([0] + [self.reader.get_batch(i).num_rows
                                       for i in range(self.reader.num_record_batches)])
        self.num_rows = int(self.starts[-1])

    def texts(self, row: int, columns: list[str]) -> list[tuple[list[int], bool]]:
        """-> per column (ids ending with EOS, whether the text was cut). The cache stores up
        to max_length tokens, one more than fits before the EOS: a text of max_length stored
        tokens was cut to max_length - 1 (the rule of model.tokenize)."""
        i = int(np.searchsorted(self.starts, row, side="right")) - 1
        batch = self.reader.get_batch(i)
        out = []
        for column in columns:
            ids = batch.column(column)[row - int(self.starts[i])].as_py()
            out.append((ids[: self.max_length - 1] + [self.eos_id], len(ids) == self.max_length))
        return out


class TokenCache:
    """Token ids of every source, tokenized once into `folder`, then memory-mapped.

    One Arrow IPC file per source, `{source}-{key}.arrow`: a list<int32> column per text
    column, one row per data row, each text's first max_length token ids. The key hashes the
    data file (path, size, mtime), the tokenizer (`tokenizer_fingerprint`) and max_length, so
    a change of any gives another file name: a cache made for other data, another tokenizer
    or another length is never read. A file is written under a temporary name and renamed
    when complete, so a build killed halfway leaves no file of that name and is redone."""

    def __init__(self, folder: str, tokenizer, max_length: int, rows_per_batch: int = 1024):
        self.folder, self.tokenizer, self.max_length = folder, tokenizer, max_length
        self.rows_per_batch = rows_per_batch  # rows tokenized at a time: the builder's memory
        self.tokenizer_id = tokenizer_fingerprint(tokenizer)

    def key(self, source: Source) -> dict:
        stat = os.stat(source.path)
        return dict(format=CACHE_FORMAT, file=os.path.realpath(source.path), size=stat.st_size,
                    mtime_ns=stat.st_mtime_ns, tokenizer=self.tokenizer_id,
                    eos_id=self.tokenizer.eos_token_id, max_length=self.max_length)

    def path(self, source: Source) -> str:
        digest = hashlib.sha256(json.dumps(self.key(source), sort_keys=True).encode()).hexdigest()
        return os.path.join(self.folder, f"{source.name}-{digest[:16]}.arrow")

    def problem(self, source: Source) -> str | None:
        """Why the cache file of `source` cannot be used as it is; None if it can."""
        path = self.path(source)
        if not os.path.exists(path):
            return "not built"
        try:
            reader = pa.ipc.open_file(pa.memory_map(path))
            key = json.loads(reader.schema.metadata[b"f2llm_key"])
            rows = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
        except (pa.ArrowInvalid, OSError, KeyError, TypeError, ValueError) as e:
            return f"unreadable ({e})"
        if key != self.key(source):
            return f"made for {key}, not for {self.key(source)}"
        if rows != source.num_rows or reader.schema.names != source.columns:
            return (f"holds {rows} rows of {reader.schema.names}, the data file "
                    f"{source.num_rows} of {source.columns}")
        return None

    def build(self, sources: list[Source], log=print) -> None:
        """Tokenize every source whose cache file is missing or unusable. Builders on one host
        take turns (a lock that a crash releases); on a folder shared by several nodes, each
        node writes its own temporary file and the last rename wins (the files are equal)."""
        os.makedirs(self.folder, exist_ok=True)
        host = socket.gethostname()
        with open(os.path.join(self.folder, f".lock-{host}"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for source in sources:
                self._build(source, f"{self.path(source)}.tmp-{host}", log)

    def _build(self, source: Source, tmp: str, log) -> None:
        why = self.problem(source)
        if why is None:
            return
        path, t0, n_tokens = self.path(source), time.time(), 0
        schema = pa.schema([(c, pa.list_(pa.int32())) for c in source.columns],  # int32: 151k vocab
                           metadata={"f2llm_key": json.dumps(self.key(source))})
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for batch in read_batches(source.path, source.columns, self.rows_per_batch):
                arrays = self._tokenize(batch, source.columns)
                n_tokens += sum(len(a.values) for a in arrays)
                writer.write_batch(pa.record_batch(arrays, schema=schema))
        os.replace(tmp, path)
        log(f"  tokenized {source.name} ({why}): {source.num_rows:,} rows, {n_tokens:,} tokens in "
            f"{time.time() - t0:.0f} s, {os.path.getsize(path) / 1e6:,.0f} MB: {path}")

    def _tokenize(self, batch: pa.RecordBatch, columns: list[str]) -> list[pa.ListArray]:
        """A row range's texts -> one list<int32> array per column. Each distinct text is
        tokenized once: a document is often the hard negative of many queries."""
        ids_of = {}  # text -> its first max_length ids, (n,) int32
        arrays = []
        for column in columns:
            texts = [t or "" for t in batch[column].to_pylist()]
            new = list(dict.fromkeys(t for t in texts if t not in ids_of))
            if new:
                ids = self.tokenizer(new, add_special_tokens=False, verbose=False,
                                     return_attention_mask=False)["input_ids"]
                ids_of.update((t, np.array(x[: self.max_length], dtype=np.int32))
                              for t, x in zip(new, ids))
            lists = [ids_of[t] for t in texts]
            offsets = np.cumsum([0] + [len(x) for x in lists], dtype=np.int32)
            arrays.append(pa.ListArray.from_arrays(offsets, np.concatenate(lists)))
        return arrays

    def open(self, sources: list[Source], wait: bool = False, attr: str = "tokens") -> None:
        """Memory-map each source's cache file into `source.tokens` (or `attr`: a teacher's
        tokenizer's ids go to `teacher_tokens`). wait: another process
        (local rank 0) is building the files: poll until they are usable (a build of the
        released set would outlast the timeout of a barrier; torchrun stops every rank if the
        builder fails)."""
        for source in sources:
            while wait and self.problem(source) is not None:
                time.sleep(1)
            why = self.problem(source)
            if why is not None:
                raise DataError(f"token cache {self.path(source)}: {why}; "
                                f"delete it and start again")
            setattr(source, attr, TokenTable(self.path(source), self.max_length,
                                             self.tokenizer.eos_token_id))


def load_tokenized(folder: str, tokenizer, max_length: int, cache_folder: str, seed: int = 0,
                   val_fraction: float = 0.01) -> list[Source]:
    """Check, tokenize (once) and memory-map in one process; train.py spreads these over ranks."""
    sources = load_sources(folder, seed, val_fraction, cache_folder)
    cache = TokenCache(cache_folder, tokenizer, max_length)
    cache.build(sources, log=lambda *a: None)
    cache.open(sources)
    return sources


# ---------------------------------------------------------------------------- batches
def make_batch(source: Source, rows: np.ndarray, rng: np.random.Generator) -> Batch:
    """Rows of one source -> a Batch of token ids with k negatives per query sampled from its
    candidates (and the same texts in a teacher's ids, if its tokens are open). Needs
    `source.tokens` (TokenCache.open)."""
    picks = [rng.choice(int(source.n_candidates[row]), size=source.k, replace=False)
             for row in rows]
    columns = [["query", "passage"] + [f"negative_{j + 1}" for j in p] for p in picks]

    def read(table: TokenTable) -> Batch:
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


# mteb's F2LLM loader uses this instruction where a task names none; the export stores it
# as the SentenceTransformer "query" prompt.
DEFAULT_QUERY_INSTRUCTION = ("Given a web search query, retrieve relevant passages that answer "
                             "the query")


def export_prompts() -> dict:
    """The SentenceTransformer prompts every export stores: queries get the instruction
    template, documents nothing (the F2LLM protocol)."""
    return {"query": instruct(DEFAULT_QUERY_INSTRUCTION, ""), "document": ""}
