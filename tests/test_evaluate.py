"""evaluate.py: every tool loads the export the same way (I6), the F2LLM instructions reach
the encoder as the paper's protocol says, the local suite runs offline and shows training
helps, results folders are never re-used for another checkpoint, bad input fails early."""
import json
import os
import shutil
import socket

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import AutoModel, AutoTokenizer

import data as D
import model as M
from tiny import demo

pytestmark = pytest.mark.slow  # torchrun / real processes / mteb / sentence-transformers

datasets = evaluate = mteb = None  # imported as the first test here starts: mteb takes seconds


@pytest.fixture(scope="module", autouse=True)
def modules():
    """Collecting this file (the quick loop does too) imports neither mteb nor evaluate.py."""
    global datasets, evaluate, mteb
    import datasets
    import mteb

    import evaluate


# mixed lengths: empty-ish, short, instruction-formatted, and far past the max length below
TEXTS = ["ok", "Shares in the airline fell sharply on Monday.",
         D.instruct("Retrieve semantically similar text.", "The match ended in a draw."),
         "The central bank raised interest rates again. " * 40]
MAX_LENGTH = 48  # small, so that truncation is exercised cheaply; the default is 8192


@pytest.fixture(scope="module")
def export(trained_run):
    return str(trained_run / "final")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from a second thread, and on a shared 2-core machine
    spinning threads made the local suite ten times slower (measured: 8.4 s vs 0.6 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_three_loaders_agree_with_encode(export):
    """I6: AutoModel + AutoTokenizer, SentenceTransformer and mteb's F2LLM loader (with
    F2LLM's own loader arguments) give model.encode's vectors, also for truncated texts."""
    from sentence_transformers import SentenceTransformer
    tokenizer, backbone = AutoTokenizer.from_pretrained(export), AutoModel.from_pretrained(export)
    ref = M.encode(backbone, tokenizer, TEXTS, max_length=MAX_LENGTH)
    # plain transformers: the saved tokenizer appends EOS by itself, and truncation keeps it
    batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=MAX_LENGTH,
                      return_tensors="pt")
    rows, last = torch.arange(len(TEXTS)), batch["attention_mask"].sum(1) - 1  # right padding
    last_ids = batch["input_ids"][rows, last]
    assert last_ids.tolist() == [tokenizer.eos_token_id] * len(TEXTS)
    assert batch["input_ids"].shape[1] == MAX_LENGTH and tokenizer.model_max_length == 8192
    with torch.no_grad():
        hidden = backbone(**batch).last_hidden_state
    plain = F.normalize(hidden[rows, last], dim=-1)
    # sentence-transformers from the export's own config: last-token pooling, normalised
    st = SentenceTransformer(export, device="cpu")
    assert st.max_seq_length == 8192
    assert st.prompts["query"] == D.instruct(demo.DEMO_INSTRUCTIONS["bbc_headline_retrieval"],
                                             "") and st.prompts["document"] == ""
    st.max_seq_length = MAX_LENGTH
    # mteb's loader class for F2LLM, with F2LLM's loader arguments
    meta = mteb.get_model_meta("codefuse-ai/F2LLM-4B")
    wrapper = meta.loader(export, revision=None,
                          **dict(meta.loader_kwargs, max_seq_length=MAX_LENGTH))
    for name, emb in [("AutoModel", plain),
                      ("SentenceTransformer", st.encode(TEXTS, convert_to_tensor=True)),
                      ("mteb F2LLM loader", wrapper.model.encode(TEXTS, convert_to_tensor=True))]:
        cos = F.cosine_similarity(emb.float().cpu(), ref)
        assert (cos > 0.9999).all(), (name, cos)


def _encoder_inputs(wrapper, tokenizer, task, prompt_type, texts):
    """The exact strings the backbone receives from the mteb loader, decoded from its input ids."""
    seen = []

    def hook(module, args):  # args[0]: the features the backbone is run on
        for ids, mask in zip(args[0]["input_ids"], args[0]["attention_mask"]):
            seen.append(tokenizer.decode(ids[mask.bool()]))
    handle = wrapper.model[0].register_forward_pre_hook(hook)  # the Transformer module
    try:
        wrapper.encode(DataLoader(datasets.Dataset.from_dict({"text": texts}), batch_size=8),
                       task_metadata=task.metadata, hf_split="test", hf_subset="default",
                       prompt_type=prompt_type)
    finally:
        handle.remove()
    return sorted(seen)


@pytest.mark.parametrize("task, instruction", [
    ("ArguAna", "Given a claim, find documents that refute the claim."),  # mteb's F2LLM prompts
    ("BBCHeadlineRetrieval", demo.DEMO_INSTRUCTIONS["bbc_headline_retrieval"]),  # local suite
])
def test_retrieval_queries_carry_the_instruction_documents_nothing(export, task, instruction):
    wrapper = evaluate.load_f2llm(export, "local/test", "test", 64, 8192)
    tokenizer = AutoTokenizer.from_pretrained(export)
    task = evaluate.select_tasks([task], "MTEB(eng, v2)")[0]
    texts = ["Fuel prices hit airline profits", "BA made a pre-tax profit of 75m."]
    eos = tokenizer.eos_token
    queries = _encoder_inputs(wrapper, tokenizer, task, mteb.types.PromptType.query, texts)
    assert queries == sorted(f"Instruct: {instruction}\nQuery: {t}{eos}" for t in texts)
    documents = _encoder_inputs(wrapper, tokenizer, task, mteb.types.PromptType.document, texts)
    assert documents == sorted(t + eos for t in texts)


def test_the_exports_prompts_are_the_runs_for_encode_query_and_mteb(export):
    """SentenceTransformer(export).encode_query gives a query the instruction the tiny run
    trained retrieval with, encode_document nothing; mteb's sentence-transformers loader
    gives every text of a clustering task the run's clustering instruction. The paper's
    per-task prompts (reference/f2llm_mteb_prompts.json) are mteb's F2LLM loaders' own."""
    from mteb.models.model_implementations import codefuse_models
    from mteb.models.sentence_transformer_wrapper import SentenceTransformerEncoderWrapper
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(export, device="cpu")
    tokenizer, backbone = AutoTokenizer.from_pretrained(export), AutoModel.from_pretrained(export)
    texts = ["Fuel prices hit airline profits", "BA made a pre-tax profit of 75m."]
    headline = demo.DEMO_INSTRUCTIONS["bbc_headline_retrieval"]
    for got, expected in [(st.encode_query(texts), [D.instruct(headline, t) for t in texts]),
                          (st.encode_document(texts), texts)]:
        ref = M.encode(backbone, tokenizer, expected)
        assert (F.cosine_similarity(torch.as_tensor(got), ref) > 0.9999).all()
    wrapper = SentenceTransformerEncoderWrapper(st)
    task = evaluate.select_tasks(["BBCTopicClustering"], "MTEB(eng, v2)")[0]
    seen = _encoder_inputs(wrapper, tokenizer, task, None, texts)
    topic = demo.DEMO_INSTRUCTIONS["bbc_topic_clustering"]
    assert seen == sorted(f"Instruct: {topic}\nQuery: {t}{tokenizer.eos_token}" for t in texts)
    with open(D.PAPER_PROMPTS) as f:
        assert json.load(f) == {"v1": codefuse_models.prompts_dict,
                                "v2": codefuse_models.f2llmv2_prompts_dict}


def test_bf16_embeddings_match_fp32(export):
    """evaluate.py --dtype bf16 (the default on CUDA) embeds the local suite's texts as fp32
    does: cosine > 0.999 for every text, through mteb's loader, and the weights really are bf16."""
    articles = demo.bbc_articles()
    texts = [a["headline"] for a in articles[::50]] + [a["body"][:400] for a in articles[1::50]]
    emb = {}
    for dtype in ("fp32", "bf16"):
        wrapper = evaluate.load_f2llm(export, f"local/{dtype}", dtype, 64, 8192, dtype)
        expected = torch.bfloat16 if dtype == "bf16" else torch.float32
        assert next(wrapper.model.parameters()).dtype == expected
        emb[dtype] = torch.as_tensor(wrapper.model.encode(texts, batch_size=16,
                                                          convert_to_numpy=True)).float()
    cos = torch.nn.functional.cosine_similarity(emb["bf16"], emb["fp32"], dim=-1)
    assert len(texts) == 90 and cos.min() > 0.999, cos.min()
    assert not torch.equal(emb["bf16"], emb["fp32"])
    auto = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    assert evaluate.model_kwargs("auto")["dtype"] == auto


def test_repeated_texts_are_embedded_once_and_counted_per_model(export):
    """A text repeated within one encode call (an STS set's pairs) is embedded once and gets
    the vector it gets alone; each loaded model counts its own texts, so the texts/s line of
    one evaluation never includes another's."""
    texts = ["Fuel prices hit airline profits", "BA made a pre-tax profit of 75m."]
    first = evaluate.load_f2llm(export, "local/first", "test", 64, 8192)
    second = evaluate.load_f2llm(export, "local/second", "test", 64, 8192)
    repeated = first.model.encode(texts + texts[::-1] + texts[:1], convert_to_numpy=True)
    alone = second.model.encode(texts, convert_to_numpy=True)
    assert repeated.shape == (5, 64)
    assert torch.allclose(torch.as_tensor(repeated), torch.as_tensor(alone)[[0, 1, 1, 0, 0]],
                          atol=1e-6)
    assert (first.model.encode.texts, second.model.encode.texts) == (2, 2)
    assert first.model.encode.seconds > 0 and second.model.encode.seconds > 0


@pytest.mark.parametrize("task", ["STS12", "LeeSTS"])
def test_symmetric_tasks_put_the_instruction_on_every_text(export, task):
    wrapper = evaluate.load_f2llm(export, "local/test", "test", 64, 8192)
    tokenizer = AutoTokenizer.from_pretrained(export)
    task = evaluate.select_tasks([task], "MTEB(eng, v2)")[0]
    texts = ["A man is playing a guitar.", "A man plays the guitar."]
    inputs = _encoder_inputs(wrapper, tokenizer, task, None, texts)  # STS passes no prompt type
    instruction = "Instruct: Retrieve semantically similar text.\nQuery: "
    assert inputs == sorted(f"{instruction}{t}{tokenizer.eos_token}" for t in texts)


@pytest.fixture(scope="module")
def local_run(export, tmp_path_factory):
    """`python evaluate.py OUT/final --tasks local --baseline`, with every socket refused."""
    results = tmp_path_factory.mktemp("eval") / "results"

    def no_network(*args, **kwargs):
        raise OSError("network access during the offline suite")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", no_network)
        report = evaluate.main([export, "--tasks", "local", "--baseline", "--results",
                                str(results)])
    return report, results


def test_local_suite_runs_offline_into_the_named_folder(local_run, export):
    report, results = local_run
    assert set(report["tasks"]) == set(evaluate.LOCAL_TASKS)
    saved = evaluate.read_json(results / "scores.json")
    assert saved["tasks"] == report["tasks"]
    assert saved["identity"]["sha256"] == evaluate.files_sha256(export)
    assert evaluate.read_json(results / "checkpoint.json")["checkpoint"] == os.path.abspath(export)
    # mteb's own result files: one per task for the trained and for the untrained model
    files = [f for _, _,
             fs in os.walk(results / "mteb") for f in fs if f.split(".")[0] in evaluate.LOCAL_TASKS]
    assert len(files) == 2 * len(evaluate.LOCAL_TASKS), files
    for scores in report["tasks"].values():  # mteb's 0-100 scale (a Spearman may be negative)
        floor = -100 if scores["type"] == "STS" else 0
        assert floor <= scores["untrained"] <= 100 and floor <= scores["score"] <= 100
    # no paper numbers here
    assert not any(k.startswith("paper") for k in report["mean_over_tasks"])
    # local tasks alone: the benchmark is not read (mteb builds every benchmark's tasks for it)
    assert saved["benchmark"] is None
    assert [t.metadata.name for t in evaluate.select_tasks(["local"], "MTEB(nope)")] == list(
        evaluate.LOCAL_TASKS)
    with pytest.raises(SystemExit, match="--benchmark 'MTEB.nope.': mteb does not know it"):
        evaluate.select_tasks(["LeeSTS", "STS12"], "MTEB(nope)")


def test_training_lifts_local_retrieval(local_run):
    """The tiny preset trained on BBC headline -> article pairs; on held-out articles its
    nDCG@10 must be far above the untrained starting point's (chance: about 1.5). Over seeds
    0-3 and both kinds of negatives (README) the smallest lift was 3.0x and +4.9 points."""
    retrieval = local_run[0]["tasks"]["BBCHeadlineRetrieval"]
    assert retrieval["score"] > 2 * retrieval["untrained"], retrieval
    assert retrieval["score"] > retrieval["untrained"] + 3, retrieval


def test_results_folder_is_not_reused_for_another_checkpoint(local_run, export, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(local_run[1], results)  # a copy: the other tests read the original
    other = str(tmp_path / "other")
    tokenizer = AutoTokenizer.from_pretrained(export)
    M.save_export(M.tiny_backbone(tokenizer, seed=1), tokenizer, other)
    before = (results / "scores.json").read_text()
    with pytest.raises(SystemExit, match="holds results of another checkpoint"):
        evaluate.main([other, "--tasks", "LeeSTS", "--results", str(results)])
    assert (results / "scores.json").read_text() == before
    # --overwrite replaces them: nothing of the first checkpoint is left to be mistaken for its
    evaluate.main([other, "--tasks", "LeeSTS", "--results", str(results), "--overwrite"])
    assert evaluate.read_json(results / "checkpoint.json")["checkpoint"] == os.path.abspath(other)
    assert list(evaluate.read_json(results / "scores.json")["tasks"]) == ["LeeSTS"]
    left = [f for _, _,
            fs in os.walk(results / "mteb") for f in fs if f.split(".")[0] in evaluate.LOCAL_TASKS]
    assert left == ["LeeSTS.json"]


@pytest.fixture()
def no_tokenizer(export, tmp_path):
    path = tmp_path / "no_tokenizer"
    shutil.copytree(export, path)
    os.remove(path / "tokenizer_config.json")
    return str(path)


@pytest.mark.parametrize("argv, message", [
    (["/nonexistent/ckpt"], "checkpoint /nonexistent/ckpt: no such folder"),
    (["NO_TOKENIZER"], "lacks tokenizer_config.json"),
    (["EXPORT", "--tasks", "STS12", "NoSuchTask"], "--tasks: unknown task 'NoSuchTask'"),
    (["EXPORT", "--benchmark", "MTEB(nope)"], "--benchmark 'MTEB(nope)': mteb does not know it"),
    (["EXPORT", "--batch-sz", "8"], "unrecognized arguments: --batch-sz"),  # no prefix matching
])
def test_bad_input_fails_before_any_model_is_loaded(argv, message, export, no_tokenizer, tmp_path,
                                                    monkeypatch, capsys):
    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(evaluate, "load_f2llm", loaded)
    monkeypatch.setattr(mteb.models.ModelMeta, "load_model", loaded)
    argv = [{"EXPORT": export, "NO_TOKENIZER": no_tokenizer}.get(a, a) for a in argv]
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv + ["--results", str(tmp_path / "results")])
    assert message in str(e.value) + capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_paper_columns_and_means(tmp_path):
    """The checkpoint's size picks the paper's column, and the means over the 41 tasks of
    mteb_eng_v2_scores.csv are the paper's headline numbers."""
    assert evaluate.resolve_checkpoint("codefuse-ai/F2LLM-1.7B").paper == "F2LLM-1.7B"
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 2560}))
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert evaluate.resolve_checkpoint(str(tmp_path)).paper == "F2LLM-4B"
    tasks = evaluate.select_tasks(None, "MTEB(eng, v2)")
    assert len(tasks) == 41
    for column, headline in [("F2LLM-0.6B", 70.03), ("F2LLM-1.7B", 72.01), ("F2LLM-4B", 73.67)]:
        summary = evaluate.summarize(tasks, {"paper": evaluate.paper_scores(column)})
        assert len(summary["tasks"]) == 41 and len(summary["types"]) == 7
        assert summary["mean_over_tasks"]["paper"] == pytest.approx(headline, abs=0.005)


def test_dim_scores_a_prefix_and_refuses_a_dim_too_large(export, tmp_path, capsys):
    """--dim N: the loader's own truncation gives the first N components; larger than the
    model is an error before anything loads; a dim the run did not train (no --mrl) warns."""
    texts = ["Fuel prices hit airline profits", "BA made a pre-tax profit of 75m."]
    full = evaluate.load_f2llm(export, "local/full", "test", 64, 8192)
    cut = evaluate.load_f2llm(export, "local/dim16", "test", 64, 8192, truncate_dim=16)
    a = torch.as_tensor(full.model.encode(texts, convert_to_numpy=True))
    b = torch.as_tensor(cut.model.encode(texts, convert_to_numpy=True))
    assert b.shape == (2, 16) and torch.allclose(b, a[:, :16], atol=1e-6)
    with pytest.raises(SystemExit, match="--dim 128 is larger than the model's dimension 64"):
        evaluate.main([export, "--tasks", "LeeSTS", "--dim", "128", "--results",
                       str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()
    evaluate.check_dim(16, evaluate.resolve_checkpoint(export))
    assert "--dim 16 is not a dimension this model was trained for (64" in capsys.readouterr().out
