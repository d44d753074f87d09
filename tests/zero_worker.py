"""One AdamW step under torch's ZeroRedundancyOptimizer on a tiny Qwen3 (gloo, under
torchrun): each rank writes the bytes of the AdamW state it holds (m and v) to OUT.rankN.json;
tests/test_plan.py compares them with the plan's partition (plan.zero_shards)."""
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer
from transformers import AutoModel, Qwen3Config

if __name__ == "__main__":
    config_path, out = sys.argv[1:3]
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    net = AutoModel.from_config(Qwen3Config.from_json_file(config_path))
    optimizer = ZeroRedundancyOptimizer(net.parameters(), torch.optim.AdamW, lr=1e-3)
    net(input_ids=torch.randint(0, 100, (1, 8))).last_hidden_state.sum().backward()
    optimizer.step()
    held = sum(v.numel() * v.element_size() for state in optimizer.optim.state.values()
               for name, v in state.items() if name != "step")
    with open(f"{out}.rank{dist.get_rank()}.json", "w") as f:
        json.dump(held, f)
    dist.barrier()  # no rank tears gloo down while another's last broadcast is in flight
    dist.destroy_process_group()
