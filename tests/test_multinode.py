"""Two torchrun "nodes" on this machine sharing one --out (docs/multi-node.md): each token cache
file is built by exactly one process of the job, and the run equals a 1-node 2-process run."""
import collections
import json
import os
import pathlib
import re
import shutil
import subprocess

import pyarrow.parquet as pq
import pytest
from conftest import ENV, ROOT, command, free_port, launch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # four torchrun processes


def _train_args(data, out, *more):
    return ["--size", "tiny", "--data", data, "--out", out, "--steps", "2",
            "--batch-size", "8", "--max-length", "32", "--eval-every", "0", "--save-every", "0",
            *more]


def test_two_nodes_build_each_cache_file_once_and_equal_one_node(tmp_path, small_demo_dir):
    data = str(tmp_path / "data")  # 40 rows per source: small, every source kept
    os.makedirs(data)
    for name in os.listdir(small_demo_dir):
        if name.endswith(".parquet"):
            table = pq.read_table(os.path.join(small_demo_dir, name)).slice(0, 40)
            pq.write_table(table, os.path.join(data, name))
        else:
            shutil.copy(os.path.join(small_demo_dir, name), data)
    two, one = str(tmp_path / "two_nodes"), str(tmp_path / "one_node")
    port = free_port()
    token_cache = ["--token-cache", f"{two}/token_cache"]  # one folder the two nodes share
    nodes = [subprocess.Popen(command("train.py", *_train_args(data, two, *token_cache), nproc=1, torchrun=[
                                  "--nnodes", 2, "--node-rank", rank, "--master-addr",
                                  "127.0.0.1", "--master-port", port]),
                              cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in (0, 1)]
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), logs[0][-3000:] + logs[1][-3000:]
    # the same run on one node, reading the cache the two nodes built (keyed: same ids)
    proc = launch("train.py", *_train_args(data, one, *token_cache), nproc=2)

    # every source tokenized exactly once, by one of the two nodes' builders
    built = collections.Counter(re.findall(r"tokenized (\w+) \(no cache file yet\)", "".join(logs)))
    sources = {f.rsplit(".", 1)[0] for f in os.listdir(data) if f.endswith(".parquet")}
    assert built == {name: 1 for name in sources}, built
    cache = os.listdir(os.path.join(two, "token_cache"))
    assert len([f for f in cache if f.endswith(".arrow")]) == len(sources)
    assert not [f for f in cache if ".lock" in f or ".tmp" in f]
    assert "tokenized" not in proc.stdout  # the 1-node run built nothing: the same tokenizer
    # the same run: the same losses and the same final weights
    losses = [[json.loads(line)["loss"] for line in
               pathlib.Path(out, "metrics.jsonl").read_text().splitlines()] for out in (two, one)]
    assert losses[0] == losses[1] and len(losses[0]) == 2
    weights = [load_file(os.path.join(out, "final", "model.safetensors")) for out in (two, one)]
    assert weights[0].keys() == weights[1].keys()
    assert all((weights[0][k] == weights[1][k]).all() for k in weights[0])
