"""Score an F2LLM checkpoint on MTEB with the paper's protocol, or on an offline local suite.

    python evaluate.py OUT/final                   # MTEB(eng, v2): 41 tasks, beside the paper
    python evaluate.py codefuse-ai/F2LLM-4B               # a published model, the same way (hub)
    python evaluate.py OUT/final --tasks local --baseline # offline: BBC News + Lee, vs untrained
    python evaluate.py OUT/checkpoints/step_N --tasks STS12   # a checkpoint of a run, as it trains
    torchrun --nproc_per_node 8 evaluate.py OUT/final     # every GPU of the node embeds

Contract:
- The model is loaded by mteb's own F2LLM loader: the loader class and arguments of mteb's
  ModelMeta for codefuse-ai/F2LLM-* (per-task instructions, `Instruct: {i}\\nQuery: ` on queries
  and on every text of symmetric tasks, nothing on retrieval/reranking documents, EOS appended,
  max length 8192, last-token pooling, cosine). `--max-length` changes only the length.
  `--encode packed` (default) runs that loader's own preprocessing and the backbone on packed
  rows (runtime/encoding.py; the same vectors, tested); `--encode loader` its own encode.
- Under torchrun each encode call's texts are split across the ranks and gathered back in
  order; mteb (and its scoring) runs on rank 0 only. Plain `python evaluate.py` is one rank.
- A run's `checkpoints/step_N` is scored directly: the backbone built from the config in its
  meta.json, its weights read from the DCP shards (LoRA merged), the run's tokenizer; written
  once as an export into the results folder (removed when every task is done).
- Resumable: mteb's result file of each finished task stays in the results folder; the same
  command after a kill evaluates only the missing tasks; `--overwrite` recomputes all.
- `--tasks local` runs four mteb tasks built from text that PyPI packages ship (no network):
  BBC headline -> article retrieval on held-out articles, BBC topic clustering and
  classification, Lee document-similarity STS (tiny/local_suite.py).
- Prints per task, per task type and the means over tasks and over types, beside the paper's
  numbers for the checkpoint's size (mteb_eng_v2_scores.csv), and writes scores.json,
  checkpoint.json and mteb's own result files to the results folder. A folder that holds
  results of another checkpoint (or max length) is refused unless --overwrite.
- Bad input (missing checkpoint or tokenizer, unknown task or benchmark) exits with a message
  naming it before any model is loaded.
"""
import argparse
import csv
import gc
import glob
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("checkpoint",
                   help="an export (OUT/final), a run's checkpoint (OUT/checkpoints/step_N) or "
                        "a model mteb knows (codefuse-ai/F2LLM-4B)")
    p.add_argument("--tasks", nargs="+",
                   help="mteb task names, local task names or 'local' (default: the benchmark)")
    p.add_argument("--benchmark", default="MTEB(eng, v2)",
                   help="mteb benchmark name: the tasks without --tasks, and the subsets of its "
                        "tasks that --tasks names (not read when --tasks names local tasks only)")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass")
    p.add_argument("--max-length", type=int, default=8192, help="tokens per text, EOS included")
    p.add_argument("--results", help="results folder (default: results/<checkpoint>)")
    p.add_argument("--overwrite", action="store_true",
                   help="recompute every task (and replace results of another checkpoint); "
                        "without it, tasks already in the results folder are kept")
    p.add_argument("--baseline", action="store_true",
                   help="also score the run's untrained starting point")
    p.add_argument("--dim", type=int, default=0,
                   help="score the first N dimensions only (Matryoshka; 0 = all); named in the "
                        "results")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="weights and compute of a local checkpoint (auto: bf16 + flash "
                        "attention on CUDA, fp32 on CPU)")
    p.add_argument("--encode", choices=["packed", "loader"], default="packed",
                   help="packed: the loader's preprocessing, the backbone on packed rows (the "
                        "same vectors, no padding computed); loader: its own padded encode")
    p.add_argument("--chunk-tokens", type=int, default=16384,
                   help="tokens per packed forward (--encode packed): a memory knob")
    args = p.parse_args(argv)
    if args.dim < 0:
        p.error("--dim must be positive (0 = all dimensions)")
    for flag in ("batch_size", "max_length", "chunk_tokens"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be positive")
    return args


if __name__ == "__main__":  # -h and a misspelt flag answer before mteb and torch load
    parse_args(sys.argv[1:])

gc.disable()  # the imports' ~1M long-lived objects: frozen out of every collection (train.py)
import mteb
import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModel, AutoTokenizer

import data as D
import model as M
from loss import matryoshka_dims
from runtime import checkpoint as C
from runtime.encoding import LoaderEncode, PackedEncode, SplitEncode, serve
from runtime.parallel import print0, wait_for_every_rank
from runtime.progress import Progress, chars_per_token, probe_rate
from tiny.local_suite import LOCAL_TASKS

gc.freeze()
gc.enable()

HERE = os.path.dirname(os.path.abspath(__file__))
PAPER_SCORES = os.path.join(HERE, "reference", "mteb_eng_v2_scores.csv")
PROTOCOL_MODEL = "codefuse-ai/F2LLM-4B"  # the three F2LLM sizes share one loader and arguments
# hidden size -> the paper's size (docs/design.md §2)
SIZE_BY_DIM = {1024: "0.6B", 2048: "1.7B", 2560: "4B"}


# ---------------------------------------------------------------------------- the protocol
def load_f2llm(path: str, name: str, revision: str, dim: int, max_length: int, dtype: str = "auto",
               truncate_dim: int | None = None, encode: str = "loader", chunk_tokens: int = 16384):
    """mteb's own F2LLM loader on a local export, with F2LLM's loader arguments; truncate_dim
    keeps the first N components (sentence-transformers' own truncation; cosine renormalises).
    Its encode cut into units (runtime/encoding.py) that the ranks of torchrun share (this is
    rank 0; the others `serve` model.encoder); encode "packed": through packed rows of
    chunk_tokens tokens, "loader": its own padded batches."""
    meta = mteb.get_model_meta(PROTOCOL_MODEL)
    kwargs = dict(meta.loader_kwargs, max_seq_length=max_length, model_kwargs=model_kwargs(dtype),
                  embed_dim=truncate_dim)  # handed to SentenceTransformer(truncate_dim=)
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else None
    model = meta.loader(path, revision=None, device=device, **kwargs)
    model.encoder = (PackedEncode(model.model, chunk_tokens) if encode == "packed" else
                     LoaderEncode(model.model))
    model.model.encode = EncodeEachTextOnce(SplitEncode(model.encoder))
    # results are filed under this name and revision, never under the published model's
    model.mteb_model_meta = meta.model_copy(update=dict(
        name=name, revision=revision, embed_dim=truncate_dim or dim, max_tokens=max_length,
        loader_kwargs=kwargs,
        n_parameters=None, n_embedding_parameters=None, memory_usage_mb=None, release_date=None,
        reference=None))
    return model


def model_kwargs(dtype: str) -> dict:
    """What the backbone loads with: bf16 and flash attention (when installed) on CUDA by
    default, fp32 and sdpa on a CPU. `dtype` auto | bf16 | fp32."""
    cuda = torch.cuda.is_available()
    bf16 = dtype == "bf16" or (dtype == "auto" and cuda)
    flash = cuda and importlib.util.find_spec("flash_attn") is not None
    return dict(dtype=torch.bfloat16 if bf16 else torch.float32,
                attn_implementation="flash_attention_2" if flash and bf16 else "sdpa")


class EncodeEachTextOnce:
    """SentenceTransformer.encode with repeated texts embedded once: an STS set pairs a few
    documents many times (Lee: 50 documents in 1,225 pairs). Same vectors, less work. Counts
    the texts (and characters) it embedded and the seconds it took, for the texts/s lines."""

    def __init__(self, encode):
        self.encode, self.texts, self.chars, self.seconds = encode, 0, 0, 0.0

    def __call__(self, sentences, **kwargs):
        texts = all(isinstance(s, str) for s in sentences)
        unique = list(dict.fromkeys(sentences)) if texts else sentences
        t0 = time.perf_counter()
        out = self.encode(unique, **kwargs)
        self.texts += len(unique)
        self.chars += sum(len(s) for s in unique) if texts else 0
        self.seconds += time.perf_counter() - t0
        if len(unique) == len(sentences):
            return out
        position = {text: i for i, text in enumerate(unique)}
        return out[[position[s] for s in sentences]]


def run_tasks(model, tasks, cache_dir: str, batch_size: int, overwrite: bool = False,
              progress=None) -> dict:
    """Evaluate task by task. The cache folder is ours alone (tied to one checkpoint by
    claim_results_folder): a task whose result file is there is kept, unless overwrite."""
    cache = mteb.ResultCache(cache_path=cache_dir)
    scores = {}
    for task in tasks:
        drop_cut_result(cache_dir, task.metadata.name)
        result = mteb.evaluate(model, [task], cache=cache, encode_kwargs={"batch_size": batch_size},
                               overwrite_strategy="always" if overwrite else "only-missing",
                               co2_tracker=False, show_progress_bar=False)
        scores.update({r.task_name: 100 * r.get_score() for r in result.task_results})
        if progress:
            progress.task_done(task)
    return scores


def drop_cut_result(cache_dir: str, task_name: str) -> None:
    """mteb writes a task's result file in place: a kill during the write leaves it cut short,
    which mteb cannot read back. Such a file is removed, so that the task is computed again."""
    pattern = os.path.join(glob.escape(cache_dir), "**", f"{task_name}.json")
    for path in glob.glob(pattern, recursive=True):
        try:
            read_json(path)
        except ValueError:
            print0(f"{task_name}: its result file was cut short (the run was killed while "
                   f"writing it), computing it again: {path}")
            os.remove(path)


# ---------------------------------------------------------------------------- inputs
def select_tasks(names: list[str] | None, benchmark: str) -> list:
    """--tasks / --benchmark -> mteb task objects. Tasks of the benchmark keep its subsets. The
    benchmark is read only when a task may come from it: mteb builds every benchmark's task
    objects to find one (about 3 s), which a run of local tasks alone does not pay."""
    names = [n for arg in names or [] for n in arg.split(",") if n]
    names = list(dict.fromkeys(m for n in names
                               for m in (list(LOCAL_TASKS) if n == "local" else [n])))
    if names and all(name in LOCAL_TASKS for name in names):
        return [LOCAL_TASKS[name]() for name in names]
    try:
        bench_tasks = {t.metadata.name: t for t in mteb.get_benchmark(benchmark).tasks}
    except KeyError as e:
        raise SystemExit(f"evaluate.py: error: --benchmark {benchmark!r}: mteb does not know it "
                         f"({e.args[0]}); see `mteb.get_benchmarks()`") from None
    if not names:
        return list(bench_tasks.values())
    tasks = []
    for name in names:
        if name in LOCAL_TASKS:
            tasks.append(LOCAL_TASKS[name]())
        elif name in bench_tasks:
            tasks.append(bench_tasks[name])
        else:
            try:
                tasks.append(mteb.get_task(name))
            except KeyError as e:
                raise SystemExit(f"evaluate.py: error: --tasks: unknown task {name!r}; not one of "
                                 f"'local' {sorted(LOCAL_TASKS)} nor an mteb task "
                                 f"({e.args[0]})") from None
    return tasks


@dataclass
class Checkpoint:
    """What evaluate.py scores: a local export (path set) or a model mteb knows (meta set)."""
    name: str  # results are filed under this model name and revision
    revision: str
    slug: str  # the default results folder's name
    identity: dict  # what the results folder is tied to (checkpoint.json)
    paper: str | None  # the paper's column for this size, if it is one
    path: str | None = None
    dim: int | None = None
    meta: object = None  # mteb ModelMeta of a published model
    run_config: dict | None = None  # a checkpoints/step_N: the run's config (its meta.json)


def resolve_checkpoint(ckpt: str) -> Checkpoint:
    """A local export folder, a run's checkpoints/step_N or a model mteb knows -> what to
    load, its identity, paper size."""
    if os.path.isdir(ckpt) and os.path.exists(os.path.join(ckpt, "meta.json")):
        return resolve_step(ckpt)
    if os.path.isdir(ckpt):
        missing = [f for f in ("config.json", "tokenizer_config.json")
                   if not os.path.exists(os.path.join(ckpt, f))]
        if missing:
            raise SystemExit(f"evaluate.py: error: checkpoint {ckpt} lacks {', '.join(missing)}; "
                             f"pass the export folder that train.py writes (OUT/final), which "
                             f"holds the model, its tokenizer and the sentence-transformers config")
        dim = read_json(os.path.join(ckpt, "config.json")).get("hidden_size")
        digest = files_sha256(ckpt)
        slug = "-".join(os.path.abspath(ckpt).rstrip("/").split("/")[-2:])
        return Checkpoint(name=f"local/{slug}", revision=digest[:12], slug=slug, path=ckpt, dim=dim,
                          identity={"checkpoint": os.path.abspath(ckpt), "sha256": digest},
                          paper=f"F2LLM-{SIZE_BY_DIM[dim]}" if dim in SIZE_BY_DIM else None)
    try:
        meta = mteb.get_model_meta(ckpt)
    except (KeyError, ValueError):
        meta = None
    if meta is None or meta.loader is None:
        raise SystemExit(f"evaluate.py: error: checkpoint {ckpt}: no such folder, and not a model "
                         f"mteb knows; pass OUT/final of a train.py run or e.g. {PROTOCOL_MODEL}")
    short = ckpt.split("/")[-1]
    return Checkpoint(name=ckpt, revision=meta.revision, slug=ckpt.replace("/", "__"), meta=meta,
                      identity={"checkpoint": ckpt, "revision": meta.revision},
                      paper=short if short in paper_columns() else None)


def resolve_step(ckpt: str) -> Checkpoint:
    """A run's checkpoints/step_N -> its identity: the run, the step and the sha256 of its
    meta.json (which lists every shard's size, the data position, the scheduler), cheap to
    hash where the shards (optimizer state included) are not."""
    try:
        meta = C.read_meta(ckpt)
    except C.CheckpointError as e:
        raise SystemExit(f"evaluate.py: error: checkpoint {e}") from None
    cfg = meta.get("config")
    if not isinstance(cfg, dict) or not cfg.get("model"):
        raise SystemExit(f"evaluate.py: error: {os.path.join(ckpt, 'meta.json')} holds no run "
                         f"config (a 'config' with the 'model' it trained), so the backbone "
                         f"cannot be built; evaluate that run's final/ export instead")
    if not os.path.exists(os.path.join(ckpt, "tokenizer_config.json")):
        raise SystemExit(f"evaluate.py: error: checkpoint {ckpt} lacks the run's tokenizer "
                         f"(tokenizer_config.json); train.py saves it with every checkpoint")
    try:
        dim = 64 if cfg["model"] == "tiny" else AutoConfig.from_pretrained(cfg["model"]).hidden_size
    except OSError as e:
        raise SystemExit(f"evaluate.py: error: checkpoint {ckpt}: the config of its backbone "
                         f"{cfg['model']!r} cannot be read ({e}); it needs the Hugging Face hub "
                         f"or its cache once") from None
    with open(os.path.join(ckpt, "meta.json"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    run = os.path.dirname(os.path.dirname(os.path.abspath(ckpt)))
    slug = f"{os.path.basename(run)}-step_{meta['step']}"
    return Checkpoint(name=f"local/{slug}", revision=digest[:12], slug=slug, path=ckpt, dim=dim,
                      identity={"checkpoint": os.path.abspath(ckpt), "run": run,
                                "step": meta["step"], "sha256": digest},
                      paper=f"F2LLM-{SIZE_BY_DIM[dim]}" if dim in SIZE_BY_DIM else None,
                      run_config=cfg)


def export_step(ckpt: Checkpoint, out: str) -> str:
    """checkpoints/step_N -> an export at `out`, as train.py writes final/: the backbone built
    from the run's config, its weights read from the shards (no optimizer state), LoRA
    adapters merged, the run's tokenizer."""
    cfg = ckpt.run_config
    tokenizer = AutoTokenizer.from_pretrained(ckpt.path)
    if cfg["model"] == "tiny":  # train.py builds it from the seed; the weights come next
        backbone = M.tiny_backbone(tokenizer, seed=cfg["seed"])
    else:
        backbone = AutoModel.from_config(AutoConfig.from_pretrained(cfg["model"]))
    if cfg.get("lora_rank"):
        backbone = M.add_lora(backbone, cfg["lora_rank"])
    try:
        C.load_weights(ckpt.path, backbone)
    except C.CheckpointError as e:
        raise SystemExit(f"evaluate.py: error: {e}") from None
    M.save_export(M.unwrap(backbone), tokenizer, out, prompts=D.export_prompts())
    return out


def check_dim(dim: int, ckpt: Checkpoint) -> None:
    """--dim must fit the model; a dimension the run did not train with --mrl gets a warning."""
    if not dim or ckpt.path is None:
        return
    if dim > ckpt.dim:
        raise SystemExit(f"evaluate.py: error: --dim {dim} is larger than the model's dimension "
                         f"{ckpt.dim}")
    config = os.path.join(os.path.dirname(os.path.abspath(ckpt.path)), "config.json")
    mrl = (ckpt.run_config.get("mrl") if ckpt.run_config else
           os.path.exists(config) and read_json(config).get("mrl"))
    trained = matryoshka_dims(ckpt.dim) if mrl else [ckpt.dim]
    if dim not in trained:
        print(f"evaluate.py: warning: --dim {dim} is not a dimension this model was trained for "
              f"({', '.join(map(str, trained))}; train with --mrl for nested dimensions)")


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def files_sha256(folder: str) -> str:
    """One hash over every file of the export (weights, tokenizer, configs)."""
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)):
        if os.path.isfile(path):
            h.update(os.path.relpath(path, folder).encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    h.update(block)
    return h.hexdigest()


def claim_results_folder(folder: str, identity: dict, overwrite: bool, write: bool = True) -> None:
    """Refuse a results folder that holds another checkpoint's results (mteb would otherwise
    mix or re-use them); --overwrite removes only what this script wrote there. write=False
    checks only (the other ranks of torchrun, before rank 0 writes)."""
    marker = os.path.join(folder, "checkpoint.json")
    if os.path.exists(marker):
        previous = read_json(marker)
        if previous != identity and not overwrite:
            raise SystemExit(f"evaluate.py: error: --results {folder} holds results of another "
                             f"checkpoint or max length ({previous}); pass --overwrite to replace "
                             f"them or choose another --results folder")
        if not write:
            return
        if previous != identity:
            for name in ("mteb", "export"):
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
            for name in ("checkpoint.json", "scores.json"):
                if os.path.exists(os.path.join(folder, name)):
                    os.remove(os.path.join(folder, name))
    elif os.path.isdir(folder) and os.listdir(folder):
        raise SystemExit(f"evaluate.py: error: --results {folder} is not empty and holds no "
                         f"checkpoint.json, so it is not an evaluate.py results folder; "
                         f"choose another")
    if not write:
        return
    os.makedirs(folder, exist_ok=True)
    with open(marker, "w") as f:
        json.dump(identity, f, indent=2)


def run_config(ckpt: str) -> dict:
    """The train.py config of the run that made `ckpt` (OUT/config.json beside OUT/final)."""
    path = os.path.join(os.path.dirname(os.path.abspath(ckpt)), "config.json")
    if not os.path.exists(path):
        raise SystemExit(f"evaluate.py: error: --baseline needs the config.json of the train.py "
                         f"run beside {ckpt} ({path} not found)")
    return read_json(path)


def untrained_export(ckpt: str, cfg: dict, out: str, max_length: int) -> str:
    """The run's starting point, exported like OUT/final: the backbone before training."""
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    if cfg.get("model") == "tiny":  # train.py builds it from the seed, as here
        backbone = M.tiny_backbone(tokenizer, seed=cfg["seed"])
    else:
        backbone, tokenizer = M.load_backbone(cfg["model"])
    M.save_export(backbone, tokenizer, out, max_length=max_length,
                  prompts=D.export_prompts())
    return out


# ---------------------------------------------------------------------------- report
def paper_columns() -> list[str]:
    """The models of mteb_eng_v2_scores.csv (F2LLM-0.6B, ... and the other published ones)."""
    with open(PAPER_SCORES, newline="") as f:
        return [c for c in next(csv.reader(f)) if c not in ("task", "type")]


def paper_scores(column: str) -> dict:
    """A column of mteb_eng_v2_scores.csv -> {task: score}."""
    with open(PAPER_SCORES, newline="") as f:
        return {r["task"]: float(r[column]) for r in csv.DictReader(f)}


def summarize(tasks, columns: dict[str, dict]) -> dict:
    """{column: {task: score}} -> per-task rows, per-type means, means over tasks and types."""
    names = [t.metadata.name for t in tasks]
    by_type = {}
    for t in tasks:
        by_type.setdefault(t.metadata.type, []).append(t.metadata.name)
    mean = lambda xs: sum(xs) / len(xs)
    types = {ty: {c: mean([s[n] for n in ns]) for c, s in columns.items()} | {"n": len(ns)}
             for ty, ns in by_type.items()}
    return {"tasks": {t.metadata.name: {"type": t.metadata.type,
                                        **{c: s[t.metadata.name] for c, s in columns.items()}}
                      for t in tasks},
            "types": types,
            "mean_over_tasks": {c: mean([s[n] for n in names]) for c, s in columns.items()},
            "mean_over_types": {c: mean([v[c] for v in types.values()]) for c in columns}}


def print_table(summary: dict, columns: list[str]) -> None:
    head = f"{'task':40s} {'type':20s}" + "".join(f"{c:>18s}" for c in columns)
    print(head + "\n" + "-" * len(head))
    def row(label, kind, vals):
        print(f"{label:40s} {kind:20s}" + "".join(f"{vals[c]:18.2f}" for c in columns))
    for name, v in summary["tasks"].items():
        row(name, v["type"], v)
    print("-" * len(head))
    for ty, v in summary["types"].items():
        row(f"mean {ty} ({v['n']} tasks)", "", v)
    row(f"mean over {len(summary['tasks'])} tasks", "", summary["mean_over_tasks"])
    row(f"mean over {len(summary['types'])} types", "", summary["mean_over_types"])


# ---------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = parse_args(argv)
    # every check a user can fail comes before any model is loaded
    ckpt = resolve_checkpoint(args.checkpoint)
    tasks = select_tasks(args.tasks, args.benchmark)
    # the report names the benchmark where it was read (select_tasks)
    benchmark = None if all(t.metadata.name in LOCAL_TASKS for t in tasks) else args.benchmark
    if args.baseline and ckpt.path is None:
        raise SystemExit("evaluate.py: error: --baseline needs a local checkpoint from a "
                         "train.py run")
    cfg = (ckpt.run_config or run_config(ckpt.path)) if args.baseline else None
    check_dim(args.dim, ckpt)
    dim_tag = f"-dim{args.dim}" if args.dim else ""
    results = args.results or os.path.join("results", ckpt.slug + dim_tag)
    identity = dict(ckpt.identity, max_length=args.max_length,
                    **({"dim": args.dim} if args.dim else {}))
    rank, world = start_ranks()
    if world > 1 and ckpt.path is None:
        raise SystemExit("evaluate.py: error: torchrun evaluates a local checkpoint (an export or "
                         "checkpoints/step_N); run a published model with plain python")
    claim_results_folder(results, identity, args.overwrite, write=False)  # every rank checks
    wait_for_every_rank("evaluate/checked")
    if rank == 0:
        claim_results_folder(results, identity, args.overwrite)
    protocol = PROTOCOL_MODEL if ckpt.path else ckpt.name
    print0(f"evaluate: {args.checkpoint} on {len(tasks)} tasks with mteb {mteb.__version__}'s "
           f"loader for {protocol}, max length {args.max_length}, {args.encode} encoding on "
           f"{world} rank(s); results in {results}")

    cache = os.path.join(results, "mteb")
    path = ckpt.path
    if ckpt.run_config:  # a step of a run: written once as an export that every rank loads
        path = os.path.join(results, "export")
        if rank == 0 and not os.path.isdir(path):  # an export is renamed into place complete
            export_step(ckpt, path)
            print(f"export of {ckpt.path} (for this evaluation, removed at its end): {path}")
        wait_for_every_rank("evaluate/exported")
    if ckpt.path:
        model = load_f2llm(path, ckpt.name + dim_tag, ckpt.revision, ckpt.dim, args.max_length,
                           args.dtype, args.dim or None, args.encode, args.chunk_tokens)
        print0(f"model: {model_kwargs(args.dtype)}")
        if rank > 0:  # the other ranks only embed what rank 0 sends them
            serve(model.encoder)
            dist.destroy_process_group()
            return {}
        tokenizer = model.model.tokenizer
        progress = Progress(tasks, model.model.encode, chars_per_token(tokenizer),
                            probe_rate(model.encoder, tokenizer, args.batch_size), world)
    else:  # a published model: its mteb ModelMeta loads it exactly as for the leaderboard
        default = args.max_length == ckpt.meta.loader_kwargs.get("max_seq_length")
        try:
            model = ckpt.meta.load_model(**({} if default else {"max_seq_length": args.max_length}),
                                         **({"embed_dim": args.dim} if args.dim else {}))
        except OSError as e:
            raise SystemExit(f"evaluate.py: error: {ckpt.name} could not be loaded from the "
                             f"Hugging Face hub or its cache ({e}); it needs network access "
                             f"once") from None
        progress = None
    try:
        columns = {"score": run_tasks(model, tasks, cache, args.batch_size, args.overwrite,
                                      progress)}
    finally:
        if world > 1:  # the other ranks return from serve, also when mteb failed here
            model.model.encode.encode.finish()
            dist.destroy_process_group()
    encoded = model.model.encode if ckpt.path else None  # load_f2llm's EncodeEachTextOnce
    if encoded and encoded.seconds:
        print(f"encoded {encoded.texts:,} texts in {encoded.seconds:.1f} s: "
              f"{encoded.texts / encoded.seconds:,.0f} texts/s on {world} rank(s)")
    if args.baseline:  # on rank 0 alone
        with tempfile.TemporaryDirectory() as tmp:
            path = untrained_export(ckpt.path, cfg, os.path.join(tmp, "untrained"), args.max_length)
            model = load_f2llm(path, ckpt.name + "-untrained" + dim_tag, "untrained", ckpt.dim,
                               args.max_length, args.dtype, args.dim or None, args.encode,
                               args.chunk_tokens)
            columns["untrained"] = run_tasks(model, tasks, cache, args.batch_size, args.overwrite)
    if ckpt.run_config:  # every task is done: the step's export is no longer needed
        shutil.rmtree(os.path.join(results, "export"), ignore_errors=True)
    # the paper's column for this size; all F2LLM sizes, for reference, when it is no paper size
    papers = [ckpt.paper] if ckpt.paper else [c for c in paper_columns() if c.startswith("F2LLM")]
    for col in papers:
        if all(t.metadata.name in paper_scores(col) for t in tasks):
            columns[f"paper {col}"] = paper_scores(col)
    summary = summarize(tasks, columns)
    print_table(summary, list(columns))
    report = dict(checkpoint=args.checkpoint, identity=identity, benchmark=benchmark,
                  dim=args.dim or ckpt.dim,
                  protocol=dict(loader_of=protocol, mteb=mteb.__version__,
                                max_length=args.max_length),
                  **summary)
    with open(os.path.join(results, "scores.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"scores written to {os.path.join(results, 'scores.json')}")
    return report


def start_ranks() -> tuple[int, int]:
    """torchrun: a gloo process group (texts and embeddings travel between hosts' memories,
    and its timeout outlasts what the other ranks wait while rank 0 scores or downloads a
    task, where NCCL's watchdog would stop them after 10 minutes), each rank on its own GPU.
    Plain python: (0, 1), no process group."""
    if "RANK" not in os.environ:
        return 0, 1
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(hours=12))
    return dist.get_rank(), dist.get_world_size()


if __name__ == "__main__":
    main(sys.argv[1:])
