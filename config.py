"""What a training run is: the typed recipe (Recipe: the fields that change the math) and how
a run executes it (Config), the presets of each size (docs/design.md §2), and the checks of a config
that argparse cannot make. train.py builds its command line from these fields: each field's
comment is its flag's help, a Literal type its choices. Importing this file does nothing."""
import argparse
import dataclasses
import os
import textwrap
from dataclasses import dataclass
from typing import Literal

from runtime.flags import choices, field_help

# This file imports no torch (nor anything that does): the scripts parse their flags with it
# first, so -h and a misspelt flag answer at once.


# Every field has a default that runs as it is: the tiny preset. PRESETS below hold what each
# real size changes; a flag given on the command line wins over both.
@dataclass
class Recipe:
    """The fields that change the math: resuming with a different value is refused."""
    size: Literal["tiny", "0.6b", "1.7b", "4b"] = "tiny"  # preset of docs/design.md §2 (PRESETS)
    model: str = "tiny"  # HF id or local folder; tiny = a small Qwen3 built from a config
    data: str = ""  # folder of {source}.parquet / .jsonl; "" = released set (tiny: demo sample)
    data_set: Literal["v1", "v2"] = "v1"  # released set: v1 (F2LLM, 62 sources), v2 (502)
    strict_data: bool = False  # a row that cannot train (empty text, < k negatives) is an error
    demo_negatives: Literal["mined", "random"] = "mined"  # tiny's demo sample: the paper's rule
    steps: int = 0  # optimizer steps; 0 = `epochs` passes over the data
    epochs: int = 1  # passes over the data when --steps is 0
    batch_size: int = 32  # GLOBAL queries per step (all ranks)
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-5  # floor of the cosine schedule
    warmup_steps: int = 10  # linear warmup, in optimizer steps
    weight_decay: float = 0.01  # AdamW weight decay
    beta2: float = 0.98  # AdamW betas (0.9, beta2)
    grad_clip: float = 1.0  # clip the global gradient norm to this
    temperature: float = 0.05  # softmax temperature of both losses (loss.TEMPERATURE)
    max_length: int = 128  # tokens per text including EOS
    val_fraction: float = 0.02  # held out per source
    # official: the official code's draw (sources run dry at random times); remaining: by
    # batches left, so every stretch of an epoch stays mixed (data.source_order)
    source_sampling: Literal["official", "remaining"] = "remaining"  # how a batch's source is drawn
    seed: int = 0  # model init, data order, negatives sampled, validation split
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # bf16: autocast, fp32 master weights;
                                                         # auto: bf16 on GPU
    mrl: bool = False  # F2LLM v2's Matryoshka loss over nested dims (loss.matryoshka_dims)
    in_batch: bool = True  # the in-batch term on retrieval data; --no-in-batch: hard negatives only
    in_batch_gather: Literal["autograd", "detached"] = "autograd"  # the recipe's | the official's
    lora_rank: int = 0  # LoRA adapters of this rank on every linear layer; 0 = full finetuning
    teacher: str = ""  # distil from this model (a folder or hub id model.py loads); "" = none
    kd_weight: float = 1.0  # weight of the distillation term in the loss (with --teacher)
    kd_mode: Literal["v2", "unit", "kl"] = "v2"  # v2: F2LLM v2's MSE of raw states; unit: of
                                                 # unit vectors; kl: of scores
    k_clustering: int = 7  # hard negatives per clustering query (F2LLM v1: 7; v2: 9)


@dataclass
class Config(Recipe):
    """The recipe, and how this run executes it: memory, logging, files, planning."""
    out: str = ""  # run folder; "" = out/{size}
    chunk_tokens: int = 0  # real tokens per packed forward: memory only, never the math; 0 =
                           # planned: the preset's where this run's plan fits the card, else
                           # the largest that fits (a CPU run: the preset's)
    chunk_size: int = 0  # also cap the sequences per forward; 0 = no cap
    token_cache: str = ""  # tokenized data (shared by runs of one tokenizer); "" = OUT/token_cache
                           # (--size tiny: the shared cache's tokens/)
    cache_dir: str = ""  # shared cache of tiny's data, tokenizer and tokens, built once per
                         # content; "" = $F2LLM_CACHE, else $XDG_CACHE_HOME/f2llm or ~/.cache/f2llm
    max_bad_fraction: float = 0.01  # a source with more of its rows skipped is an error
    tokenize_workers: int = 0  # processes tokenizing a cache file on each node; 0 = one per core
    eval_every: int = 25  # steps between validation losses; 0 = only at the end
    save_every: int = 50  # steps between resumable checkpoints; 0 = only at the end
    keep_checkpoints: int = 2  # the newest N checkpoints are kept
    max_bad_steps: int = 5  # stop after this many non-finite steps in a row
    shard_optimizer: bool = True  # ZeroRedundancyOptimizer across ranks when world > 1
    collective_timeout: int = 0  # seconds a collective waits for every rank; 0 = torch's (NCCL 600)
    resume: bool = False  # continue from the latest checkpoint in `out` (automatic on restarts)
    dry_run: bool = False  # print the plan of the run and exit, no weights, no download
    json: bool = False  # dry run only: print the plan as one JSON object
    nproc: int = 0  # dry run only: GPUs per node to plan for (0 = this world size)
    nodes: int = 1  # dry run only: nodes to plan for


MATH_FIELDS = [f.name for f in dataclasses.fields(Recipe)]

# The paper's run (docs/design.md §2), shared by the real sizes: 2 epochs of 512 queries per step.
PAPER = dict(epochs=2, batch_size=512, max_length=1024, min_lr=1e-7, warmup_steps=500,
             val_fraction=0.01, source_sampling="official", eval_every=500, save_every=1000)
PRESETS = {
    "tiny": {},  # the defaults above
    "0.6b": dict(PAPER, model="Qwen/Qwen3-0.6B", lr=1e-5),
    "1.7b": dict(PAPER, model="Qwen/Qwen3-1.7B", lr=9e-6),
    "4b": dict(PAPER, model="Qwen/Qwen3-4B", lr=8e-6),
}
# Each size's token budget without --chunk-tokens, where this run's plan fits it: the largest
# multiple of 256 whose memory plan fits 72 GiB of an 80 GB GPU at the paper's 64 queries per
# GPU on 8 GPUs (plan.chunk_tokens_that_fit; a test checks). A run whose plan holds more (a
# teacher, fewer GPUs) takes the largest budget that fits instead (plan.planned_chunk_tokens).
PRESET_CHUNK_TOKENS = {"tiny": 4096, "0.6b": 28416, "1.7b": 14080, "4b": 3840}


def presets_text() -> str:
    """-h's epilog: what each --size changes."""
    paper = textwrap.fill(", ".join(f"{k}={v}" for k, v in PAPER.items()), 88,
                          initial_indent="  ", subsequent_indent="  ")
    return (f"presets (--size): tiny is the defaults above (chunk_tokens="
            f"{PRESET_CHUNK_TOKENS['tiny']} where it fits); 0.6b, 1.7b and 4b run the paper's "
            "recipe,\n" + paper + "\n" + "\n".join(
                f"  {size:5s} " + ", ".join(f"{k}={v}" for k, v in p.items() if k not in PAPER)
                + f", chunk_tokens={PRESET_CHUNK_TOKENS[size]} where it fits"
                for size, p in PRESETS.items() if p))


def kd_mode_flag(text: str) -> str:
    """--kd-mode's type: the mode this flag once had gets its own message."""
    if text == "mse":
        raise argparse.ArgumentTypeError(
            "mse is now two modes: v2 (F2LLM v2's MSE of the raw states) or unit (the squared "
            "distance of the unit vectors: what mse computed, times D)")
    return text


def parse_config(argv=None, description: str | None = None) -> Config:
    """Config's fields as flags: help from each field's comment, a Literal field's values as
    argparse choices (a bad value fails naming the flag and the choices)."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                     epilog=presets_text(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = field_help(Config)
    for f in dataclasses.fields(Config):
        flag, help = "--" + f.name.replace("_", "-"), f"{helps[f.name]} (default: {f.default!r})"
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help)
        else:
            values = choices(f.type)
            kind = kd_mode_flag if f.name == "kd_mode" else str if values else f.type
            parser.add_argument(flag, type=kind, default=None, help=help, choices=values)
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    cfg = Config(**{**PRESETS[args.get("size", Config.size)], **args})
    cfg.out = cfg.out or os.path.join("out", cfg.size)
    return cfg


def check_config(cfg: Config, world: int) -> None:
    """Errors a user can cause that argparse cannot see, before anything is loaded or written."""
    from runtime import checkpoint  # torch: imported once the flags have parsed
    def fail(msg):
        raise SystemExit(f"train.py: error: {msg}")
    if cfg.batch_size % world:
        fail(f"--batch-size {cfg.batch_size} is not divisible by the world size {world}; "
             f"use a multiple of {world}")
    for name in ["batch_size", "lr", "max_length", "keep_checkpoints", "max_bad_steps",
                 "k_clustering"]:
        if getattr(cfg, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    for name, zero in [("chunk_tokens", "planned"), ("chunk_size", "no cap"),
                       ("lora_rank", "full finetuning"), ("tokenize_workers", "one per core"),
                       ("collective_timeout", "torch's")]:
        if getattr(cfg, name) < 0:
            fail(f"--{name.replace('_', '-')} must be >= 0 (0 = {zero}), got {getattr(cfg, name)}")
    if cfg.max_length < 2:
        fail("--max-length must leave room for one token and the EOS")
    if cfg.teacher and not cfg.kd_weight > 0:
        fail(f"--kd-weight must be positive with --teacher, got {cfg.kd_weight}")
    if cfg.data and not os.path.isdir(cfg.data):
        fail(f"--data {cfg.data}: no such folder")
    if cfg.cache_dir and os.path.exists(cfg.cache_dir) and not os.path.isdir(cfg.cache_dir):
        fail(f"--cache-dir {cfg.cache_dir}: a file, not a folder; name a folder (made if missing)")
    if not 0 <= cfg.max_bad_fraction < 1:
        fail(f"--max-bad-fraction must be in [0, 1), got {cfg.max_bad_fraction}")
    if cfg.resume and not checkpoint.latest(cfg.out):
        fail(f"--resume: no checkpoint in {cfg.out}/checkpoints; start without --resume")
