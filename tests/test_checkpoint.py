"""runtime/checkpoint.py in one process: a resume loads in place and unpickles nothing, pruning keeps
the newest --keep-checkpoints, and a checkpoint that is incomplete, truncated, of the old
pickled format or of another model is refused with a message naming the file."""
import json
import os
import pickle

import pytest
import torch

import model as M
from runtime import checkpoint

MATH = {"lr": 1e-3, "lora_rank": 0}  # math fields and their defaults, as train.py passes them


def setup(tokenizer, seed):
    """A tiny backbone, AdamW and a LambdaLR schedule, as train.setup_optimizer builds them."""
    backbone = M.tiny_backbone(tokenizer, seed=seed)
    optimizer = torch.optim.AdamW(backbone.parameters(), lr=1e-3, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (s + 1))
    return backbone, optimizer, scheduler


def trained(tokenizer, steps=2):
    backbone, optimizer, scheduler = setup(tokenizer, seed=0)
    torch.manual_seed(5)
    for _ in range(steps):
        for p in backbone.parameters():
            p.grad = torch.randn_like(p)
        optimizer.step()
        scheduler.step()
    return backbone, optimizer, scheduler


def save(out, step, backbone, optimizer, scheduler, tokenizer, keep=2):
    return checkpoint.save(str(out), step, backbone, optimizer, scheduler, {"epoch": 0,
                           "position": step}, MATH, tokenizer, keep)


@pytest.fixture()
def saved(tmp_path, tokenizer):
    """A checkpoint of 2 steps; the trained objects; the RNG state at the save."""
    backbone, optimizer, scheduler = trained(tokenizer)
    rng = torch.get_rng_state()
    path = save(tmp_path, 2, backbone, optimizer, scheduler, tokenizer)
    return path, (backbone, optimizer, scheduler), rng


def test_resume_loads_in_place_and_unpickles_nothing(saved, tokenizer, monkeypatch):
    path, (backbone, optimizer, scheduler), rng = saved
    fresh, fresh_optimizer, fresh_scheduler = setup(tokenizer, seed=1)
    pointers = {name: p.data_ptr() for name, p in fresh.named_parameters()}
    for unpickle in [(pickle, "load"), (pickle, "loads"), (torch, "load")]:
        monkeypatch.setattr(*unpickle, lambda *a, **k: pytest.fail("unpickled at resume"))
    torch.manual_seed(123)  # another RNG state, which the resume must replace
    meta = checkpoint.restore(path, fresh, fresh_optimizer, fresh_scheduler, MATH, MATH)
    assert meta["step"] == 2 and meta["data"] == {"epoch": 0, "position": 2}
    assert torch.equal(torch.get_rng_state(), rng)
    trained_params = dict(backbone.named_parameters())
    for name, p in fresh.named_parameters():
        assert p.data_ptr() == pointers[name], name  # into the model's own storage
        assert torch.equal(p, trained_params[name]), name
        want, got = optimizer.state[trained_params[name]], fresh_optimizer.state[p]
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        assert got["exp_avg"].device == p.device and got["step"].dtype == want["step"].dtype
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    assert fresh_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    # and the next step is the one the saved run would take
    for a, b in [(backbone, optimizer), (fresh, fresh_optimizer)]:
        torch.manual_seed(9)
        for p in a.parameters():
            p.grad = torch.randn_like(p)
        b.step()
    for (name, a), b in zip(backbone.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), name


def test_keep_checkpoints_prunes_old_saves_and_unfinished_ones(tmp_path, saved, tokenizer):
    path, (backbone, optimizer, scheduler), _ = saved
    os.makedirs(tmp_path / "checkpoints" / "step_00000003.tmp")  # a save that was killed
    for step in (4, 6):
        save(tmp_path, step, backbone, optimizer, scheduler, tokenizer, keep=2)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000004", "step_00000006"]
    assert checkpoint.latest(str(tmp_path)).endswith("step_00000006")
    save(tmp_path, 8, backbone, optimizer, scheduler, tokenizer, keep=1)
    assert os.listdir(tmp_path / "checkpoints") == ["step_00000008"]


def refusal(path, tokenizer, math=MATH, lora=0):
    backbone, optimizer, scheduler = setup(tokenizer, seed=1)
    if lora:
        backbone = M.add_lora(backbone, lora)
        optimizer = torch.optim.AdamW([p for p in backbone.parameters() if p.requires_grad])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.restore(path, backbone, optimizer, scheduler, math, MATH)
    return str(e.value)


def test_bad_checkpoints_are_refused_naming_the_file(saved, tokenizer):
    path, _, _ = saved
    shard = next(f for f in os.listdir(path) if f.endswith(".safetensors"))
    with open(os.path.join(path, shard), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(path, shard)) // 2)
    message = refusal(path, tokenizer)
    assert f"{path}/{shard} is truncated" in message and f"delete {path}" in message
    os.remove(os.path.join(path, shard))
    assert f"{path}/{shard} is missing" in refusal(path, tokenizer)
    meta = open(os.path.join(path, "meta.json")).read()
    open(os.path.join(path, "meta.json"), "w").write(meta[:len(meta) // 2])
    assert f"{path}/meta.json is truncated or not JSON" in refusal(path, tokenizer)
    os.remove(os.path.join(path, "meta.json"))
    assert f"{path}/meta.json is missing" in refusal(path, tokenizer)
    torch.save({"step": 2}, os.path.join(path, "state.pt"))  # the earlier, pickled format
    assert "holds state.pt, the pickled format of an earlier F2LLM" in refusal(path, tokenizer)


def test_a_checkpoint_of_another_config_or_model_is_refused(saved, tokenizer):
    path, _, _ = saved
    assert "lr was 0.001, now 0.01" in refusal(path, tokenizer, {**MATH, "lr": 0.01})
    from transformers import AutoModel
    config = M.tiny_config(len(tokenizer))
    config.intermediate_size *= 2  # another model under the same flags
    wider = AutoModel.from_config(config)
    optimizer = torch.optim.AdamW(wider.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with pytest.raises(checkpoint.CheckpointError, match="mlp.gate_proj.weight is .* this model"):
        checkpoint.restore(path, wider, optimizer, scheduler, MATH, MATH)
    # the same flags but other tensors (meta.json edited, as by another version): named
    meta = json.load(open(os.path.join(path, "meta.json")))
    meta["config"]["lora_rank"] = 4
    json.dump(meta, open(os.path.join(path, "meta.json"), "w"))
    message = refusal(path, tokenizer, {**MATH, "lora_rank": 4}, lora=4)
    assert f"{path} holds no model." in message and "lora" in message


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755),
                                                        (0o027, 0o640, 0o750)])
def test_export_and_checkpoint_are_readable_as_the_umask_says(tmp_path, tokenizer, umask,
                                                                file_mode, dir_mode):
    """Every file of OUT/final (model.safetensors too: safetensors writes it 0600) and of a
    checkpoint gets the mode the umask gives a plain open(), so a teammate or a serving
    container running as another user reads the model; umask 027 keeps others out."""
    import stat
    backbone, optimizer, scheduler = trained(tokenizer, steps=1)
    old = os.umask(umask)
    try:
        M.save_export(backbone, tokenizer, str(tmp_path / "final"))
        path = save(tmp_path / "run", 1, backbone, optimizer, scheduler, tokenizer)
    finally:
        os.umask(old)
    for folder in (tmp_path / "final", path):
        modes = {os.path.relpath(os.path.join(root, name), folder):
                 stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode)
                 for root, dirs, files in os.walk(folder) for name in files + dirs}
        assert "model.safetensors" in modes or any(n.endswith(".safetensors") for n in modes)
        assert modes == {name: dir_mode if os.path.isdir(os.path.join(folder, name))
                         else file_mode for name in modes}, modes
        assert stat.S_IMODE(os.stat(folder).st_mode) == dir_mode
