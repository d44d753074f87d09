"""F2LLM's token cache: each checked source (data.py's `Source`) tokenized once, memory-mapped by
every process.

Contract:
- `TokenCache(folder, tokenizer, max_length)` keeps one Arrow file per source,
  `{source}-{key}.arrow`, keyed by CONTENT: the data file's bytes (sha256), the tokenizer's
  ids-deciding parts (`tokenizer_fingerprint`) and max_length, never a path or a time: a cache
  made for other data, another tokenizer or another length is never read, and one made for the
  same bytes elsewhere (the tiny sample of another run, a teacher whose tokenizer equals the
  student's) is. `build` writes the files that are missing or unusable, each by
  ONE process of all that share the folder on any number of nodes (an O_EXCL `{file}.lock`,
  stale locks broken safely), its row ranges tokenized on a pool of worker processes
  (`TokenizerWorkers`), under a temporary name renamed when complete. `open` (every process)
  memory-maps them into `source.tokens` as `TokenTable`s: ranks share the pages, nothing is
  re-tokenized.
- `TokenTable.texts(row, columns)`: a row's ids, each ending with EOS, and whether each was cut
  to max_length (what data.py's batches read).
- `load_tokenized(folder, tokenizer, max_length, cache_folder)`: check, build and open in one
  process (tests, scripts); train.py spreads the build over the ranks of a node.
This file reads data.py's sources; data.py does not import it (its batches only call
`source.tokens.texts`). Importing this file does nothing.
"""
import collections
import glob
import hashlib
import json
import multiprocessing
import os
import socket
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pyarrow as pa

from data import DataError, Source, load_sources, read_batches
from runtime.cache import file_digest, take_lock

CACHE_FORMAT = 1  # bump when the layout of a cache file changes


# The parts of a fast tokenizer's tokenizer.json that decide its ids. Not the files
# save_pretrained writes: an export's tokenizer_config.json differs from its student's in
# fields that change no id, and a teacher exported from the student must reuse its tokens.
ID_PARTS = ("model", "normalizer", "pre_tokenizer", "post_processor", "added_tokens")


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides the ids: a fast tokenizer's model (vocab, merges), normalizer,
    pre-tokenizer, post-processor and added tokens, whether it splits special tokens, and the
    EOS id; two tokenizers with one fingerprint give the same ids, whatever their class or
    their config files. A tokenizer without that backend: of every file save_pretrained writes."""
    h = hashlib.sha256(f"eos={tokenizer.eos_token_id}".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        parts = {k: spec.get(k) for k in ID_PARTS}
        parts["split_special_tokens"] = bool(getattr(tokenizer, "split_special_tokens", False))
        h.update(json.dumps(parts, sort_keys=True).encode())
        return h.hexdigest()
    h.update(type(tokenizer).__name__.encode())
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
    data file's bytes, the tokenizer (`tokenizer_fingerprint`) and max_length, so
    a change of any gives another file name: a cache made for other data, another tokenizer
    or another length is never read. A file is written under a temporary name and renamed
    when complete, so a build killed halfway leaves no file of that name and is redone."""

    def __init__(self, folder: str, tokenizer, max_length: int, rows_per_batch: int = 1024,
                 stale_after_s: float = 600.0, poll_s: float = 1.0):
        self.folder, self.tokenizer, self.max_length = folder, tokenizer, max_length
        self.rows_per_batch = rows_per_batch  # rows tokenized at a time: the builder's memory
        self.stale_after_s = stale_after_s  # a lock untouched this long: its builder is gone
        self.poll_s = poll_s  # how often waiting processes look at the files
        self.tokenizer_id = tokenizer_fingerprint(tokenizer)

    def key(self, source: Source) -> dict:
        # what the ids depend on, not where the data lies: a copy of the file, or the same
        # demo sample written for another run, finds these tokens
        return dict(format=CACHE_FORMAT, data=source.digest or file_digest(source.path),
                    tokenizer=self.tokenizer_id,
                    eos_id=self.tokenizer.eos_token_id, max_length=self.max_length)

    def path(self, source: Source) -> str:
        digest = hashlib.sha256(json.dumps(self.key(source), sort_keys=True).encode()).hexdigest()
        return os.path.join(self.folder, f"{source.name}-{digest[:16]}.arrow")

    def problem(self, source: Source) -> str | None:
        """Why the cache file of `source` cannot be used as it is; None if it can."""
        path = self.path(source)
        if not os.path.exists(path):
            return "no cache file yet"
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

    def build(self, sources: list[Source], log=print, workers: int = 0,
              progress_every: float = 30.0) -> None:
        """Tokenize every source whose cache file is missing or unusable; return when every
        file is usable. Each file is built by ONE process of all that share the folder, on any
        number of nodes: it holds `{file}.lock`, created with O_EXCL (`_lock`). A process
        builds the files nobody holds, then waits for the others. The row ranges of a file are
        tokenized by `workers` processes (0 = one per core; 1 = in this process), written in
        order by this one. A line at least every `progress_every` s: sources, rows, tokens/s."""
        todo = [s for s in sources if self.problem(s) is not None]
        if not todo:
            return
        os.makedirs(self.folder, exist_ok=True)
        workers = workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                              else os.cpu_count())
        progress = BuildProgress(todo, log, progress_every)
        pool = None  # started by the first file this process builds
        try:
            while todo:
                for source in list(todo):
                    if self._lock(source):
                        try:
                            if self.problem(source) is not None:
                                if pool is None:
                                    pool = _tokenizer_pool(workers, self.tokenizer,
                                                           self.max_length)
                                self._build(source, pool, progress)
                        finally:
                            os.unlink(self.path(source) + ".lock")
                    if self.problem(source) is None:
                        todo.remove(source)
                        progress.finished(source)
                if todo:  # the rest are being built elsewhere
                    progress.waiting(todo)
                    time.sleep(self.poll_s)
        finally:
            if pool is not None:
                pool.shutdown()

    def _lock(self, source: Source) -> bool:
        """Take `{file}.lock` (runtime/cache.py's `take_lock`: O_EXCL, stale locks broken by
        one process: a dead pid of this host, or untouched for `stale_after_s`)."""
        return take_lock(self.path(source) + ".lock", self.stale_after_s)

    def _build(self, source: Source, pool, progress: "BuildProgress") -> None:
        """Write the file under a temporary name, then give it its name. The lock's holder is
        the only writer, and the name is free (an unusable file of that name, which nobody can
        have mapped since `open` refuses it, is deleted first): nothing is ever replaced."""
        why, path, t0 = self.problem(source), self.path(source), time.time()
        for old in glob.glob(glob.escape(path) + ".tmp-*"):  # a dead builder's
            os.unlink(old)
        tmp, n_tokens = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}", 0
        schema = pa.schema([(c, pa.list_(pa.int32())) for c in source.columns],  # int32: 151k vocab
                           metadata={"f2llm_key": json.dumps(self.key(source))})
        # ranges of at most rows_per_batch rows, and at least 16 of them per file, so a pool of
        # workers overlaps on small files too (a file of 710 rows was one range: no speedup);
        # the size depends on the file only, so the bytes do not depend on the worker count
        rows = min(self.rows_per_batch, max(64, -(-source.num_rows // 16)))
        batches = read_batches(source.path, source.columns, rows)
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for arrays in pool(batches):
                tokens = sum(len(a.values) for a in arrays)
                writer.write_batch(pa.record_batch(arrays, schema=schema))
                os.utime(path + ".lock")  # alive: the lock is not stale
                n_tokens += tokens
                progress.add(source, len(arrays[0]), tokens)
        if os.path.exists(path):
            os.unlink(path)
        os.rename(tmp, path)
        log = progress.log
        log(f"  tokenized {source.name} ({why}): {source.num_rows:,} rows, {n_tokens:,} tokens in "
            f"{time.time() - t0:.0f} s, {os.path.getsize(path) / 1e6:,.0f} MB: {path}")

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


def tokenize_rows(tokenizer, max_length: int, batch: pa.RecordBatch) -> list[pa.ListArray]:
    """A row range's texts -> one list<int32> array per column, each text's first max_length
    ids. Each distinct text is tokenized once: a document is often the hard negative of many
    queries."""
    ids_of = {}  # text -> its first max_length ids, (n,) int32
    arrays = []
    for column in batch.schema.names:
        texts = [t or "" for t in batch[column].to_pylist()]
        new = list(dict.fromkeys(t for t in texts if t not in ids_of))
        if new:
            ids = tokenizer(new, add_special_tokens=False, verbose=False,
                            return_attention_mask=False)["input_ids"]
            ids_of.update((t, np.array(x[:max_length], dtype=np.int32)) for t, x in zip(new, ids))
        lists = [ids_of[t] for t in texts]
        offsets = np.cumsum([0] + [len(x) for x in lists], dtype=np.int32)
        arrays.append(pa.ListArray.from_arrays(offsets, np.concatenate(lists)))
    return arrays


def _tokenizer_pool(workers: int, tokenizer, max_length: int):
    """-> a function from row ranges to their arrays, in order: in this process (workers=1) or
    on worker processes."""
    if workers == 1:
        pool = lambda batches: (tokenize_rows(tokenizer, max_length, b)
                                for b in batches)
        pool.shutdown = lambda: None
        return pool
    return TokenizerWorkers(workers, tokenizer, max_length)


_WORKER = {}  # set once in each worker process by _worker_start: its tokenizer and max_length


def _worker_start(tokenizer, max_length):
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: no thread pool on top
    _WORKER.update(tokenizer=tokenizer, max_length=max_length)


def _worker_tokenize(batch: pa.RecordBatch) -> list[pa.ListArray]:
    return tokenize_rows(_WORKER["tokenizer"], _WORKER["max_length"], batch)


class TokenizerWorkers:
    """Row ranges tokenized by worker processes, the results handed back in order. All the
    per-text work (Python strings, the dedup, the id arrays) runs in the workers, not only the
    tokenizer's batch encode; the builder reads parquet and writes Arrow. At most workers + 2
    ranges are in flight, so the builder's memory does not grow with the file."""

    def __init__(self, workers: int, tokenizer, max_length: int):
        # fork: the workers inherit the tokenizer instead of re-importing everything
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        self.executor = ProcessPoolExecutor(workers, context, initializer=_worker_start,
                                            initargs=(tokenizer, max_length))
        self.window = workers + 2

    def __call__(self, batches):
        pending = collections.deque()
        for batch in batches:
            pending.append(self.executor.submit(_worker_tokenize, batch))
            if len(pending) >= self.window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def shutdown(self):
        self.executor.shutdown(cancel_futures=True)


class BuildProgress:
    """The builder's line, at least every `every` seconds: sources done, rows this process
    tokenized of those it may still have to, tokens/s, ETA (an upper bound while other nodes
    build some of the files)."""

    def __init__(self, sources: list[Source], log, every: float):
        self.log, self.every, self.sources = log, every, len(sources)
        self.rows_total, self.mine = sum(s.num_rows for s in sources), set()
        self.done = self.rows = self.tokens = 0
        self.t0 = self.last = time.time()

    def add(self, source: Source, rows: int, tokens: int) -> None:
        self.mine.add(source.name)
        self.rows, self.tokens = self.rows + rows, self.tokens + tokens
        now = time.time()
        if now - self.last >= self.every:
            self.last, rate = now, self.rows / (now - self.t0)
            self.log(f"  tokenizing {source.name}: {self.done}/{self.sources} sources, "
                     f"{self.rows:,}/{self.rows_total:,} rows, "
                     f"{self.tokens / (now - self.t0) / 1e6:.2f}M tokens/s, "
                     f"ETA {(self.rows_total - self.rows) / rate / 60:.1f} min")

    def finished(self, source: Source) -> None:
        self.done += 1
        if source.name not in self.mine:  # built by another process
            self.rows_total -= source.num_rows

    def waiting(self, todo: list[Source]) -> None:
        if time.time() - self.last >= self.every:
            self.last = time.time()
            self.log(f"  waiting for {len(todo)} token cache files that other processes build: "
                     f"{', '.join(s.name for s in todo[:5])}{' ...' if len(todo) > 5 else ''}")


def load_tokenized(folder: str, tokenizer, max_length: int, cache_folder: str, seed: int = 0,
                   val_fraction: float = 0.01) -> list[Source]:
    """Check, tokenize (once) and memory-map in one process; train.py spreads these over ranks."""
    sources = load_sources(folder, seed, val_fraction, cache_folder)
    cache = TokenCache(cache_folder, tokenizer, max_length)
    cache.build(sources, log=lambda *a: None, workers=1)
    cache.open(sources)
    return sources
