"""The run folder's checkpoints: save, latest, resume, pruning, metrics.jsonl cut back on resume;
the weights alone for evaluate.py (`load_weights`).

    OUT/checkpoints/step_00001000/
        shard-0000{r}-model-0000{i}-of-00008.safetensors   rank r-1's part, in 8 files
        meta.json     step, world, scheduler, data position, config, each shard's size
        tokenizer files

Every rank writes its own part at once with torch.distributed.checkpoint (DCP), in
safetensors: the replicated weights are spread over the ranks by DCP's planner, and the
optimizer state is keyed by parameter NAME (`optim.{name}.exp_avg`), each rank writing the
parameters its ZeroRedundancyOptimizer shard owns. So a checkpoint of N ranks resumes on M:
each new owner reads its parameters' state by name, into tensors allocated first where they
live (no second copy of anything), and reads nothing else. Nothing is unpickled: the tensors
are safetensors, everything else is JSON. A save goes to step_N.tmp/ and is renamed by rank
0 once every rank has written: a crash mid-save leaves the previous checkpoint the latest.
"""
import contextlib
import json
import os
import shutil
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter

from model import modes_from_umask
from runtime.parallel import wait_for_every_rank

FORMAT = "f2llm-dcp-safetensors-1"  # meta.json's "format": what this file reads
ADAMW_STATE = ("step", "exp_avg", "exp_avg_sq")
# files per rank: safetensors serialises a whole file in memory (and DCP stages a file's GPU
# tensors on the host first), so a rank's save holds about 1/FILES of its part at a time
FILES = 8


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: the message names the file and what to do."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


@contextlib.contextmanager
def _one_process_quietly():
    """DCP warns at every call without a process group; one process is a case we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def latest(out: str) -> str | None:
    """The newest complete checkpoint of a run folder (a step_N.tmp is a save that never
    finished), or None."""
    folder = os.path.join(out, "checkpoints")
    if not os.path.isdir(folder):
        return None
    steps = sorted(d for d in os.listdir(folder)
                   if d.startswith("step_") and not d.endswith(".tmp"))
    return os.path.join(folder, steps[-1]) if steps else None


def local_adamw(optimizer):
    """The AdamW that steps this rank's parameters: ZeroRedundancyOptimizer's shard, or the
    optimizer itself (one rank, or --no-shard-optimizer)."""
    return getattr(optimizer, "optim", optimizer)


def owned_parameters(model, optimizer) -> dict[str, torch.nn.Parameter]:
    """name -> parameter, for the parameters whose AdamW state this rank holds."""
    names = {id(p): name for name, p in model.named_parameters()}
    return {names[id(p)]: p for group in local_adamw(optimizer).param_groups
            for p in group["params"]}


def tensors(model, optimizer) -> dict:
    """What this rank writes: the weights (replicated), its shard's AdamW state by parameter
    name, and its RNG states."""
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    adamw = local_adamw(optimizer)
    for name, p in owned_parameters(model, optimizer).items():
        for key in ADAMW_STATE if adamw.state.get(p) else ():  # no state before its first step
            state[f"optim.{name}.{key}"] = adamw.state[p][key]
    rank = _rank()
    state[f"rng.{rank}.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        state[f"rng.{rank}.cuda"] = torch.cuda.get_rng_state()  # the current device's
    return state


def file_of_each_key(model, world: int) -> dict[str, int]:
    """key -> file index 1..FILES: the weights and their AdamW moments, in model order, cut
    into FILES runs of about equal size (a rank writes its keys of each run to its own file).
    The same on every rank (DCP's coordinator hands its copy to all), so it names every key."""
    keys = [(f"{kind}.{name}", w.numel()) for name, w in model.state_dict().items()
            for kind in ("model", "optim_exp_avg", "optim_exp_avg_sq")]
    total, before, index = sum(n for _, n in keys), 0, {}
    for key, numel in keys:
        index[key] = 1 + before * FILES // total
        before += numel
    for name in model.state_dict():  # the AdamW keys' real names; step goes with exp_avg
        index[f"optim.{name}.exp_avg"] = index[f"optim.{name}.step"] = index.pop(
            f"optim_exp_avg.{name}")
        index[f"optim.{name}.exp_avg_sq"] = index.pop(f"optim_exp_avg_sq.{name}")
    index.update({f"rng.{r}.{d}": 1 for r in range(world) for d in ("cpu", "cuda")})
    return index


def save(out: str, step: int, model, optimizer, scheduler, data_state: dict, config: dict,
         tokenizer, keep: int) -> str:
    """Every rank calls this: each writes its part of checkpoints/step_N.tmp, rank 0 adds
    meta.json and the tokenizer and renames it to step_N, then drops all but the newest `keep`.
    -> the checkpoint's folder."""
    rank, world = _rank(), dist.get_world_size() if dist.is_initialized() else 1
    folder = os.path.join(out, "checkpoints")
    final = os.path.join(folder, f"step_{step:08d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save of this step that never finished
        os.makedirs(tmp)
    # store barriers, not collectives, wherever rank 0 works alone on files (the rmtree above,
    # the rename and pruning below: minutes on a slow shared filesystem at 4b)
    wait_for_every_rank(f"checkpoint {step}: folder made")
    # save_distributed: files of their own per rank; DCP's last collective returns once every
    # rank has written (and fsynced) its files
    with _one_process_quietly():
        dcp.save(tensors(model, optimizer), no_dist=not dist.is_initialized(),
                 storage_writer=HuggingFaceStorageWriter(
                     tmp, fqn_to_index_mapping=file_of_each_key(model, world),
                     save_distributed=True))
    wait_for_every_rank(f"checkpoint {step}: every part written")
    if rank == 0:
        shards = {f: os.path.getsize(os.path.join(tmp, f)) for f in sorted(os.listdir(tmp))
                  if f.endswith(".safetensors")}
        meta = dict(format=FORMAT, step=step, world=world, scheduler=scheduler.state_dict(),
                    data=data_state, config=config, shards=shards)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        modes_from_umask(tmp)  # every rank's files, readable as the umask says
        os.replace(tmp, final)
        done = sorted(d for d in os.listdir(folder) if d.startswith("step_"))
        old = [d for d in done if d.endswith(".tmp")] + [d for d in done
                                                         if not d.endswith(".tmp")][:-keep]
        for name in old:
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
    wait_for_every_rank(f"checkpoint {step}: renamed and pruned")
    return final


def read_meta(path: str) -> dict:
    """meta.json of a checkpoint, after checking that every shard it lists is there, whole."""
    what_to_do = (f"delete {path} to resume from the checkpoint before it, or start a new "
                  f"--out without --resume")
    meta_path = os.path.join(path, "meta.json")
    if os.path.exists(os.path.join(path, "state.pt")) and not os.path.exists(meta_path):
        raise CheckpointError(f"{path} holds state.pt, the pickled format of an earlier F2LLM, "
                              f"which is never unpickled here: resume it with the version "
                              f"that wrote it, or {what_to_do}")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{meta_path} is missing: the checkpoint is incomplete; "
                              f"{what_to_do}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path} is truncated or not JSON ({e}); {what_to_do}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: format {meta.get('format')!r}, this F2LLM reads "
                              f"{FORMAT!r}; {what_to_do}")
    for name, size in meta["shards"].items():
        file = os.path.join(path, name)
        if not os.path.exists(file):
            raise CheckpointError(f"{file} is missing; {what_to_do}")
        if os.path.getsize(file) != size:
            raise CheckpointError(f"{file} is truncated ({os.path.getsize(file):,} of {size:,} "
                                  f"bytes); {what_to_do}")
    return meta


def check_config(path: str, saved: dict, config: dict, math_fields: dict) -> None:
    """The fields that change the math (name -> default, for checkpoints older than a field)
    must match the run being resumed."""
    diff = {k: (saved.get(k, default), config[k]) for k, default in math_fields.items()
            if saved.get(k, default) != config[k]}
    if diff:
        raise CheckpointError(f"{path} was saved with another config: " + ", ".join(
            f"{k} was {a!r}, now {b!r}" for k, (a, b) in diff.items()))


def restore(path: str, model, optimizer, scheduler, config: dict, math_fields: dict) -> dict:
    """Load checkpoint `path` in place: the weights into the model's own tensors, each owned
    parameter's AdamW state into tensors allocated beside it first, this rank's RNG; the
    scheduler from JSON. Any world size: state is found by parameter name. -> meta.json
    (step, data position, ...). Raises CheckpointError before loading anything if a file is
    missing or truncated, or the checkpoint is of another config or model."""
    meta = read_meta(path)
    check_config(path, meta["config"], config, math_fields)
    saved = HuggingFaceStorageReader(path).read_metadata().state_dict_metadata  # headers only
    rank = _rank()
    source = rank if rank < meta["world"] else 0  # a rank the saved world lacked: rank 0's RNG
    state = {f"model.{k}": v for k, v in model.state_dict().items()}  # views of the weights
    state["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and f"rng.{source}.cuda" in saved:
        state["rng.cuda"] = torch.cuda.get_rng_state()
    adamw, moments = local_adamw(optimizer), {}
    for name, p in owned_parameters(model, optimizer).items():
        if f"optim.{name}.exp_avg" not in saved:
            continue  # it had no state yet when saved (never stepped)
        group = next(g for g in adamw.param_groups if any(q is p for q in g["params"]))
        on_device = group.get("capturable") or group.get("fused")  # else AdamW keeps step on CPU
        step_md = saved[f"optim.{name}.step"]
        moments[p] = dict(step=torch.empty(step_md.size, dtype=step_md.properties.dtype,
                                           device=p.device if on_device else "cpu"),
                          exp_avg=torch.empty_like(p, memory_format=torch.preserve_format),
                          exp_avg_sq=torch.empty_like(p, memory_format=torch.preserve_format))
        state.update({f"optim.{name}.{k}": v for k, v in moments[p].items()})
    rng = f"rng.{source}."  # -> "rng.": this rank's key, whatever rank it came from
    checkpoint_keys = {"rng." + k[len(rng):] if k.startswith(rng) else k: k for k in saved}
    for key, tensor in state.items():
        if key not in checkpoint_keys:
            raise CheckpointError(f"{path} holds no {key}: it was written for another model or "
                                  f"--lora-rank; resume with the run's own flags or start anew")
        md = saved[checkpoint_keys[key]]
        if tuple(md.size) != tuple(tensor.shape):  # a dtype may differ (bf16 frozen weights
            # on GPU from a CPU run): the copy casts
            raise CheckpointError(f"{path}: {key} is {list(md.size)}, this model's is "
                                  f"{list(tensor.shape)}: another model; resume with the run's "
                                  f"own flags or start anew")
    # DCP reads what is asked, by the checkpoint's key names, into these very tensors
    with _one_process_quietly():
        dcp.load({checkpoint_keys[k]: v for k, v in state.items()},
                 no_dist=not dist.is_initialized(), storage_reader=HuggingFaceStorageReader(path))
    for p, s in moments.items():
        adamw.state[p] = s
    scheduler.load_state_dict(meta["scheduler"])
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr  # ZeroRedundancyOptimizer hands its groups' lr to its shard each step
    torch.set_rng_state(state["rng.cpu"])
    if "rng.cuda" in state:
        torch.cuda.set_rng_state(state["rng.cuda"])
    return meta


def load_weights(path: str, model) -> dict:
    """Only the weights of checkpoint `path`, into `model`'s own tensors (evaluate.py scores a
    step; the optimizer state is never read). Each process reads the whole model by itself, no
    collective. -> meta.json. Raises CheckpointError if a file is missing or truncated, or the
    checkpoint holds another model."""
    meta = read_meta(path)
    saved = HuggingFaceStorageReader(path).read_metadata().state_dict_metadata  # headers only
    state = {f"model.{k}": v for k, v in model.state_dict().items()}  # views of the weights
    for key, tensor in state.items():
        if key not in saved or tuple(saved[key].size) != tuple(tensor.shape):
            raise CheckpointError(f"{path}: {key} is missing or of another shape: the checkpoint "
                                  f"is of another model than its meta.json's config builds")
    with _one_process_quietly():
        dcp.load(state, no_dist=True, storage_reader=HuggingFaceStorageReader(path))
    return meta


def open_metrics(out: str, step: int, rank: int, resume: bool) -> str:
    """metrics.jsonl, cut back to the resumed step (rank 0 writes it)."""
    path = os.path.join(out, "metrics.jsonl")
    if rank == 0:
        keep = []
        if resume and os.path.exists(path):
            with open(path) as f:
                keep = [line for line in f if json.loads(line)["step"] <= step]
        with open(path, "w") as f:
            f.writelines(keep)
    return path
