"""One AdamW step under torch's ZeroRedundancyOptimizer on a tiny Qwen3 (gloo, under
torchrun): each rank writes the bytes of the AdamW state it holds (m and v) to OUT.rankN.json;
tests/test_plan.py compares them with the plan's partition (plan.zero_shards)."""
import gc
import json
import sys

gc.disable()  # as train.py: the imports' objects are frozen out of every collection
import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer
from transformers import AutoModel, Qwen3Config

gc.freeze()
gc.enable()


def adamw_bytes_held(config_path: str) -> int:
    """The bytes of m and v this rank holds after one step. In a function: the optimizer, which
    keeps a reference to the process group, is freed when it returns, so destroying the group
    frees it then, not during the interpreter's shutdown (where gloo's teardown aborted now and
    then: 'terminate called without an active exception')."""
    torch.manual_seed(0)
    net = AutoModel.from_config(Qwen3Config.from_json_file(config_path))
    optimizer = ZeroRedundancyOptimizer(net.parameters(), torch.optim.AdamW, lr=1e-3)
    net(input_ids=torch.randint(0, 100, (1, 8))).last_hidden_state.sum().backward()
    optimizer.step()
    return sum(v.numel() * v.element_size() for state in optimizer.optim.state.values()
               for name, v in state.items() if name != "step")


if __name__ == "__main__":
    config_path, out = sys.argv[1:3]
    dist.init_process_group("gloo")
    held = adamw_bytes_held(config_path)
    with open(f"{out}.rank{dist.get_rank()}.json", "w") as f:
        json.dump(held, f)
    dist.barrier()  # no rank tears gloo down while another's last broadcast is in flight
    dist.destroy_process_group()
