"""Your own training data in the released layout (docs/design.md §2), for `train.py --data`.

    python -m tools.mine mine --pairs PAIRS --model MODEL --out FOLDER        # + 24 hard negatives
    python -m tools.mine classification --labelled TEXTS --instruction I --out FOLDER
    python -m tools.mine clustering --labelled TEXTS --instruction I --out FOLDER
    python -m tools.mine demo --model MODEL     # rebuilds reference/bbc_demo_negatives.csv (tiny's)

Contract:
- `select_negatives` is the paper's margin rule as a pure function on retrieved scores:
  candidates from the top range_max (100) that are not a positive, skip the best range_min
  (5), keep score < max_score (0.8) and score < 0.95 x the positive's score, keep
  num_negatives (24), drop queries with fewer and say which rule dropped them. Ranks are
  skipped first, then filtered (sentence-transformers' mine_hard_negatives filters first,
  which is not the paper's rule; its chunked top-k search, semantic_search, is used).
- `mine_negatives` embeds with model.py (last-token pooling: a checkpoint this project
  wrote or an HF id), or with SentenceTransformer for an ST folder that pools another way
  (`load_encoder`); documents in blocks, queries in chunks; exact copies of a positive are
  the same document, so never a negative. `mine_demo` is the same search on the BBC sample.
- `classification_rows` / `clustering_rows` turn labelled texts into the other task types.
Output is written to a temporary name and renamed; the source is added to task_types.csv.
Importing this file does nothing.
"""
import argparse
import csv
import dataclasses
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data import ROWS_FROM_0, DataError, instruct, read_table
from runtime.flags import field_help
from tiny.demo import DEMO_NEGATIVES, bbc_articles


@dataclass(frozen=True)
class MiningRule:
    """The paper's rule (docs/design.md §2), named as in sentence-transformers'
    mine_hard_negatives and applied in this order. Each field's comment is its flag's help
    (`field_help`)."""
    range_max: int = 100  # candidates: the best N documents that are not a positive of the query
    range_min: int = 5  # skip the best N candidates, likely unlabelled positives
    max_score: float | None = 0.8  # keep candidates with cosine score < this
    relative_margin: float | None = 0.05  # keep candidates with score < pos - |pos| x this, i.e.
                                          # < 0.95 x the positive's score at the default 0.05
    num_negatives: int = 24  # keep the best N left; a query left with fewer is dropped (not
                             # written), counted under the first rule that left it short


# why a query was dropped: the first rule after which fewer than num_negatives were left
DROP_REASONS = {1: "too few candidates in ranks range_min..range_max", 2: "max_score",
                3: "relative_margin"}


def select_negatives(scores: np.ndarray, excluded: np.ndarray, positive_scores: np.ndarray,
                     rule: MiningRule) -> tuple[np.ndarray, np.ndarray]:
    """scores (n, c): each query's retrieved candidates, best first; excluded (n, c): its
    positives (exact copies included) and padding; positive_scores (n,). Returns picks
    (n, num_negatives): candidate columns, best first, -1 in dropped rows; reasons (n,):
    0 kept, else a key of DROP_REASONS. Ranks are skipped first, then filtered (the paper's
    order)."""
    rank = np.cumsum(~excluded, axis=1) - 1  # (n, c) rank among the non-positives
    ok = ~excluded & (rank >= rule.range_min) & (rank < rule.range_max)
    counts = [ok.sum(1)]
    if rule.max_score is not None:
        ok &= scores < rule.max_score
    counts.append(ok.sum(1))
    if rule.relative_margin is not None:  # |pos|: sign-safe, as in sentence-transformers (#3819)
        pos = positive_scores[:, None]
        ok &= scores < pos - np.abs(pos) * rule.relative_margin
    counts.append(ok.sum(1))
    short = np.stack(counts, 1) < rule.num_negatives  # (n, 3)
    reasons = np.where(short.any(1), short.argmax(1) + 1, 0)
    picks = np.argsort(~ok, axis=1, kind="stable")[:, :rule.num_negatives]  # first kept columns
    return np.where(reasons[:, None] == 0, picks, -1), reasons


def load_encoder(model, batch_size: int = 32, max_length: int = 1024):
    """-> embed(texts) -> (n, D) fp32 unit vectors on the CPU. model: (backbone, tokenizer), or
    a folder / HF id run through model.py (last-token pooling, EOS appended: our exports,
    Qwen3-Embedding). A SentenceTransformer folder that pools another way (all-MiniLM-L6-v2:
    mean) is run by SentenceTransformer, so its own pooling applies; texts are cut at the
    smaller of max_length and its own max_seq_length."""
    import torch

    import model as M
    from runtime import attention as A
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(model, str) and _sentence_transformer_pooling_other_than_last_token(model):
        from sentence_transformers import SentenceTransformer
        st = SentenceTransformer(model, device=str(device))
        st.max_seq_length = min(max_length, st.max_seq_length or max_length)
        return lambda texts: st.encode(texts, batch_size=batch_size, convert_to_tensor=True,
                                       normalize_embeddings=True).float().cpu()
    if isinstance(model, str):
        model = M.load_backbone(model, A.attention_implementation(device),
                                torch.bfloat16 if device.type == "cuda" else torch.float32)
    backbone, tokenizer = model[0].to(device).eval(), model[1]
    return lambda texts: M.encode(backbone, tokenizer, texts, batch_size, max_length)


def _sentence_transformer_pooling_other_than_last_token(folder) -> bool:
    """True for a SentenceTransformer folder (modules.json) whose Pooling is not last-token."""
    try:
        with open(os.path.join(folder, "modules.json")) as f:
            modules = json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        return False
    for module in modules:
        if module["type"].endswith("Pooling"):
            with open(os.path.join(folder, module["path"], "config.json")) as f:
                config = json.load(f)
            last_token = config.get("pooling_mode") == "lasttoken"
            return not (last_token or config.get("pooling_mode_lasttoken"))
    return True


def mine_ids(queries: list[str], passages: list[str], embed, corpus=(),
             rule: MiningRule = MiningRule(),
             chunk: int = 1024, progress: bool = True) -> tuple[list[str], Iterator]:
    """The search behind `mine_negatives` and `mine_demo`. Returns docs (the positives and the
    corpus, exact copies once) and a generator of, per chunk of queries, (start, negatives
    (b, num_negatives) indices into docs or -1, reasons (b,)). All positives of a query (it may
    have several pairs) are excluded for it. Memory: the document embeddings, plus one chunk
    of queries at a time."""
    docs = list(dict.fromkeys(list(passages) + list(corpus)))
    return docs, _search(queries, passages, docs, embed, rule, chunk, progress)


def _search(queries, passages, docs, embed, rule, chunk, progress):
    import torch
    from sentence_transformers.util import semantic_search  # top-k in query x corpus chunks
    from tqdm import tqdm
    doc_id = {d: i for i, d in enumerate(docs)}
    positive_ids = {}
    for q, p in zip(queries, passages):
        positive_ids.setdefault(q, set()).add(doc_id[p])
    with tqdm(total=len(docs), desc="embedding documents", disable=not progress) as bar:
        doc_reps, block = [], 2048  # (n_docs, D) in blocks, so the bar moves
        for lo in range(0, len(docs), block):
            doc_reps.append(embed(docs[lo:lo + block]))
            bar.update(len(doc_reps[-1]))
    doc_reps = torch.cat(doc_reps)
    k = min(rule.range_max + max(map(len, positive_ids.values())), len(docs))
    for lo in tqdm(range(0, len(queries), chunk), desc="mining", disable=not progress):
        qs, ps = queries[lo:lo + chunk], passages[lo:lo + chunk]
        query_reps = embed(qs)  # (b, D)
        hits = semantic_search(query_reps, doc_reps, query_chunk_size=256, top_k=k)
        ids = np.full((len(qs), k), -1)  # (b, k); a corpus smaller than k leaves padding
        scores = np.full((len(qs), k), -np.inf, dtype=np.float32)
        for i, h in enumerate(hits):
            ids[i, :len(h)], scores[i,
                                    :len(h)] = [x["corpus_id"] for x in h], [x["score"] for x in h]
        excluded = np.array([np.isin(row, list(positive_ids[q]))
                             for row, q in zip(ids, qs)]) | (ids < 0)
        pos_scores = (query_reps * doc_reps[[doc_id[p] for p in ps]]).sum(-1).numpy()  # (b,)
        picks, why = select_negatives(scores, excluded, pos_scores, rule)
        yield lo, np.where(picks >= 0, np.take_along_axis(ids, np.maximum(picks, 0), 1), -1), why


def mine_negatives(queries: list[str], passages: list[str], model, path: str, corpus=(),
                   rule: MiningRule = MiningRule(), batch_size: int = 32, max_length: int = 1024,
                   chunk: int = 1024, progress: bool = True) -> dict:
    """(query, positive) pairs -> `path`, parquet in the released layout; returns the report.
    model: see `load_encoder`. Queries are embedded as given (with their instruction),
    documents (positives + corpus) without. Rows are written per chunk of queries."""
    t0, reasons, tmp, writer = time.time(), [], path + ".tmp", None
    docs, search = mine_ids(queries, passages, load_encoder(model, batch_size, max_length), corpus,
                            rule, chunk, progress)
    try:
        for lo, negatives, why in search:
            reasons.append(why)
            rows = [{"query": queries[lo + i], "passage": passages[lo + i],
                     **{f"negative_{j + 1}": docs[d] for j, d in enumerate(negatives[i])}}
                    for i in np.flatnonzero(why == 0)]
            if rows:
                table = pa.Table.from_pylist(rows)
                writer = writer or pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
        if writer is None:
            dropped = _report(reasons, len(docs), t0)["dropped"]
            raise DataError(f"no query kept {rule.num_negatives} negatives (dropped: "
                            f"{_dropped(dropped, skip_zero=True)}), {path} not written; "
                            f"loosen --max-score / --relative-margin or add a --corpus")
        writer.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return _report(reasons, len(docs), t0)


def classification_rows(texts: list[str], labels: list[str], instruction: str,
                        seed: int = 0) -> list[dict]:
    """Text -> its label; the negative is the other label (a random other one if more than two)."""
    names = sorted(set(labels))
    if len(names) < 2:
        raise DataError(f"classification needs at least two labels, found {names}")
    rng = np.random.default_rng(seed)
    return [{"query": instruct(instruction, t), "passage": y,
             "negative_1": str(rng.choice([n for n in names if n != y]))}
            for t, y in zip(texts, labels)]


def clustering_rows(texts: list[str], labels: list[str], instruction: str, seed: int = 0,
                    num_negatives: int = 24) -> tuple[list[dict], int]:
    """Text -> a random other text of its label; negatives: num_negatives random texts of other
    labels. Returns (rows, texts skipped because their label has no other text)."""
    rng, n = np.random.default_rng(seed), len(texts)
    order = np.argsort(np.array(labels), kind="stable")  # each label is one block [lo, hi) of it
    block = {}
    for pos, i in enumerate(order):
        block[labels[i]] = (block.get(labels[i], (pos,))[0], pos + 1)
    rows, skipped = [], 0
    for i, (text, y) in enumerate(zip(texts, labels)):
        lo, hi = block[y]
        if hi - lo < 2:
            skipped += 1
            continue
        if n - (hi - lo) < num_negatives:
            raise DataError(f"label {y!r}: {n - (hi - lo)} texts of other labels, {num_negatives} "
                            f"needed; lower --num-negatives")
        j = order[lo + rng.integers(hi - lo - 1)]  # uniform over the block without i
        j = order[hi - 1] if j == i else j
        other = rng.choice(n - (hi - lo), num_negatives, replace=False)
        other = order[other + (other >= lo) * (hi - lo)]  # positions outside the block
        rows.append({"query": instruct(instruction, text), "passage": texts[j],
                     **{f"negative_{k + 1}": texts[o] for k, o in enumerate(other)}})
    return rows, skipped


def mine_demo(model, path: str, rule: MiningRule = MiningRule(), batch_size: int = 32,
              max_length: int = 256, progress: bool = True) -> dict:
    """The tiny preset's retrieval negatives: BBC training headlines (as queries, without an
    instruction: the shipped file was mined with all-MiniLM-L6-v2, which takes none) -> their
    articles, mined over all training articles. Writes `path` (CSV: article id, then the ids
    of its negatives, best first; dropped headlines have no row), which demo.write_demo_sample
    turns into text. Returns the report."""
    t0 = time.time()
    arts = [a for a in bbc_articles() if not a["heldout"]]
    docs, search = mine_ids([a["headline"] for a in arts], [a["body"] for a in arts],
                            load_encoder(model, batch_size, max_length), (), rule,
                            progress=progress)
    article_of = {}
    for a in arts:  # a body found twice in BBC News is one document: the first article's id
        article_of.setdefault(a["body"], a["id"])
    reasons, tmp = [], path + ".tmp"
    try:
        with open(tmp, "w", newline="") as f:
            out = csv.writer(f, lineterminator="\n")
            out.writerow(["article"] + [f"negative_{j + 1}" for j in range(rule.num_negatives)])
            for lo, negatives, why in search:
                reasons.append(why)
                out.writerows([arts[lo + i]["id"]] + [article_of[docs[d]] for d in negatives[i]]
                              for i in np.flatnonzero(why == 0))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return _report(reasons, len(docs), t0)


def _report(reasons: list[np.ndarray], documents: int, t0: float) -> dict:
    """What a mining run prints: pairs, documents, kept, dropped by rule, seconds."""
    reasons = np.concatenate(reasons)
    return {"pairs": len(reasons), "documents": documents, "kept": int((reasons == 0).sum()),
            "dropped": {DROP_REASONS[r]: int((reasons == r).sum()) for r in DROP_REASONS},
            "seconds": time.time() - t0}


def _dropped(dropped: dict, skip_zero: bool = False) -> str:
    """'26 relative_margin, ...': a report's drop counts in words."""
    return ", ".join(f"{n:,} {why}" for why, n in dropped.items() if n or not skip_zero)


def read_columns(path: str, columns: list[str], flag: str) -> dict[str, list[str]]:
    """Text columns of a .jsonl or .parquet file; a missing file, column or text is a DataError."""
    if not os.path.isfile(path):
        raise DataError(f"{flag} {path}: no such file")
    table, out = read_table(path), {}
    if table.num_rows == 0:
        raise DataError(f"{flag} {path}: the file has no rows")
    for column in columns:
        if column not in table.column_names:
            raise DataError(f"{flag} {path}: missing column {column!r} (found "
                            f"{table.column_names}); {flag} needs columns {columns}")
        out[column] = [None if v is None else str(v) for v in table[column].to_pylist()]
        bad = next((r for r, v in enumerate(out[column]) if v is None or not v.strip()), None)
        if bad is not None:
            raise DataError(f"{flag} {path}, row {bad}, column {column!r}: empty or missing text; "
                            f"drop the row or fill it in; {ROWS_FROM_0}")
    return out


def register_source(folder: str, name: str, task_type: str) -> None:
    """Add or update `name` in folder/task_types.csv (written to a temporary name, then renamed)."""
    path, types = os.path.join(folder, "task_types.csv"), {}
    if os.path.exists(path):
        with open(path, newline="") as f:
            types = {r["dataset"]: r["task_type"] for r in csv.DictReader(f)}
    with open(path + ".tmp", "w") as f:
        f.write("dataset,task_type\n" + "".join(f"{n},{t}\n"
                                                for n, t in {**types, name: task_type}.items()))
    os.replace(path + ".tmp", path)


def float_or_none(text: str) -> float | None:
    """A threshold flag's value: a number, or 'none' to turn the threshold off."""
    return None if text.lower() == "none" else float(text)


def add_encoder_flags(parser, max_length: int) -> None:
    """The flags of a command that embeds: the model, MiningRule's fields, batch and length."""
    parser.add_argument("--model", required=True, help="a folder this project wrote, a "
                        "SentenceTransformer folder, or an HF id (see load_encoder)")
    helps = field_help(MiningRule)
    for f in dataclasses.fields(MiningRule):  # --range-max 100 ... (a comment may name its default)
        text = helps[f.name] + ("" if f"default {f.default}" in helps[f.name]
                                else f" (default {f.default})")
        if f.type is not int:
            text += "; 'none': off"
        parser.add_argument("--" + f.name.replace("_", "-"), default=f.default, help=text,
                            type=int if f.type is int else float_or_none)
    parser.add_argument("--batch-size", type=int, default=32,
                        help="texts per forward when embedding")
    parser.add_argument("--max-length", type=int, default=max_length,
                        help="tokens per text when embedding")


def add_output_flags(parser) -> None:
    """The flags of a command that writes a source: its data folder and name."""
    parser.add_argument("--out", required=True, help="data folder: NAME.parquet and task_types.csv")
    parser.add_argument("--name", help="source name (default: the input file's name)")


def main(argv=None):
    """`python -m tools.mine {mine,demo,classification,clustering} ...` (-h for the flags)."""
    parser = argparse.ArgumentParser(prog="python -m tools.mine",
                                     description="Build a source in the released layout.")
    commands = parser.add_subparsers(dest="command", required=True)

    mine = commands.add_parser("mine",
                               help="(query, passage) pairs -> + hard negatives (retrieval)",
                               description="Adds hard negatives to (query, passage) pairs with "
                               "the paper's rule: of the top 100 documents, skip the best 5, keep "
                               "score < 0.8 and < 0.95 x the positive's, keep the best 24; a query "
                               "left with fewer than 24 is dropped.")
    mine.add_argument("--pairs", required=True, help=".jsonl or .parquet, columns query, passage")
    mine.add_argument("--corpus", help="extra candidate documents: .jsonl or .parquet, column text")
    mine.add_argument("--instruction", help="wrap each query as 'Instruct: ...\\nQuery: ...'")
    add_encoder_flags(mine, max_length=1024)
    add_output_flags(mine)

    demo = commands.add_parser("demo", help="the tiny preset's retrieval negatives "
                                            "(reference/bbc_demo_negatives.csv)")
    add_encoder_flags(demo, max_length=256)
    demo.add_argument("--out", default=DEMO_NEGATIVES, help="the CSV to write")

    classification = commands.add_parser("classification",
                                         help="labelled texts -> classification rows")
    classification.add_argument("--labelled", required=True,
                                help=".jsonl or .parquet, columns text, label")
    classification.add_argument("--instruction", required=True)
    classification.add_argument("--seed", type=int, default=0)
    add_output_flags(classification)

    clustering = commands.add_parser("clustering", help="labelled texts -> clustering rows")
    clustering.add_argument("--labelled", required=True,
                            help=".jsonl or .parquet, columns text, label")
    clustering.add_argument("--instruction", required=True)
    clustering.add_argument("--seed", type=int, default=0)
    clustering.add_argument("--num-negatives", type=int, default=24, help="negatives per text")
    add_output_flags(clustering)

    args = parser.parse_args(argv)
    if args.command in ("mine", "demo"):
        rule = MiningRule(**{f.name: getattr(args, f.name) for f in dataclasses.fields(MiningRule)})
    if args.command == "demo":
        r = mine_demo(args.model, args.out, rule, args.batch_size, args.max_length)
        print(f"kept {r['kept']:,} of {r['pairs']:,} headlines in {r['seconds']:.0f} s; dropped: "
              f"{_dropped(r['dropped'])}; wrote {args.out}")
        return
    source = args.pairs if args.command == "mine" else args.labelled
    name = args.name or os.path.basename(source).rsplit(".", 1)[0]
    path, task_type = os.path.join(args.out, f"{name}.parquet"), args.command
    try:
        if args.command == "mine":
            pairs = read_columns(args.pairs, ["query", "passage"], "--pairs")
            corpus = read_columns(args.corpus, ["text"], "--corpus")["text"] if args.corpus else []
            queries = [instruct(args.instruction,
                                q) if args.instruction else q for q in pairs["query"]]
            os.makedirs(args.out, exist_ok=True)
            r = mine_negatives(queries, pairs["passage"], args.model, path, corpus, rule,
                               args.batch_size, args.max_length)
            print(f"kept {r['kept']:,} of {r['pairs']:,} pairs ({r['documents']:,} documents) in "
                  f"{r['seconds']:.0f} s, {r['pairs'] / r['seconds']:.1f} pairs/s; dropped: "
                  f"{_dropped(r['dropped'])}")
            task_type = "retrieval"
        else:
            texts, labels = read_columns(args.labelled, ["text", "label"], "--labelled").values()
            rows, skipped = (classification_rows(texts, labels, args.instruction, args.seed), 0) \
                if args.command == "classification" else \
                clustering_rows(texts, labels, args.instruction, args.seed, args.num_negatives)
            os.makedirs(args.out, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows), path + ".tmp")
            os.replace(path + ".tmp", path)
            alone = f"; {skipped} skipped (alone in their label)" if skipped else ""
            print(f"{len(rows):,} rows{alone}")
        register_source(args.out, name, task_type)
    except DataError as e:
        raise SystemExit(f"tools/mine.py {args.command}: error: {e}") from None
    print(f"wrote {path} ({task_type}); train with: python train.py --data {args.out}")


if __name__ == "__main__":
    main()
