"""The options the invariant harnesses run, in ONE list: a name and its train.py flags. A new
loss variant (a Config field, its function in loss.py) is added to OPTIONS and nothing else:
tests/dist_worker.py steps each one on 2 gloo ranks and in one process
(tests/test_distributed.py: I1) and tests/test_step.py's test_every_option_keeps_I2 steps each
one across token budgets against one padded forward (I2). How each option builds its model
and teacher is here too, so both harnesses build them alike."""
import torch

import model as M
import train

OPTIONS = {
    "recipe": [],
    "mrl": ["--mrl"],
    "lora": ["--lora-rank", "4"],
    "detached": ["--in-batch-gather", "detached"],
    "no-in-batch": ["--no-in-batch"],
    "temperature": ["--temperature", "0.1"],
    # --teacher: another tiny model (seed TEACHER_SEED) in the harnesses, not a loaded folder
    "kd-v2": ["--teacher", "tiny", "--kd-mode", "v2"],
    "kd-unit": ["--teacher", "tiny", "--kd-mode", "unit"],
    "kd-kl": ["--teacher", "tiny", "--kd-mode", "kl"],
}
TEACHER_SEED = 1


def config(option: str) -> train.Config:
    """The option's Config, through train.py's own parser."""
    return train.parse_config(["--size", "tiny", *OPTIONS[option]])


def backbone(tokenizer, cfg: train.Config, attn: str = "sdpa"):
    """The student of one harness step: a fresh tiny model (seed 0); with --lora-rank, its
    adapters, their B made non-zero so that the adapters matter."""
    net = M.tiny_backbone(tokenizer, seed=0, attn=attn)
    if cfg.lora_rank:
        net = M.add_lora(net, cfg.lora_rank)
        torch.manual_seed(1)
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.05)
    return net


def teacher(tokenizer, attn: str = "sdpa"):
    return M.tiny_backbone(tokenizer, seed=TEACHER_SEED, attn=attn)
