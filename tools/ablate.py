"""A tiny-preset ablation in one command: variants x seeds, each trained by train.py and scored
by evaluate.py on the offline suite, then the raw scores (CSV) and the table (mean ± std over
seeds, each variant against the first, the 2-standard-error rule of the README).

    python -m tools.ablate --out out/ablations        # the README's 5 variants x seeds 0-2
    python -m tools.ablate --out out/margin --seeds 0 1 --jobs 2 \\
        --variant "the preset=" --variant "T 0.1=--temperature 0.1" -- --steps 20
    python -m tools.ablate --table reference/tiny_ablations.csv  # the table of a CSV, nothing run

Contract:
- A variant is NAME=FLAGS: a name for its row and train.py flags (shell-quoted, may be
  empty); the first variant is the baseline every other row is compared with. Flags after
  `--` go to every run. Every run's command line is parsed by train.py's own parser before
  anything runs, so an unknown flag or value fails at once, naming it.
- Run (variant, seed) lives in OUT/runs/VARIANT_SLUG/seed_S: `train.py --size tiny --seed S
  FLAGS COMMON --out RUN/train`, then `evaluate.py RUN/train/final --tasks TASKS --results
  RUN/eval`; their output goes to RUN/train.log and RUN/evaluate.log, the wall seconds of the
  training processes and the flags to RUN/ablate.json.
- Resumable: a run whose RUN/eval/scores.json exists is not run again; a training with a
  checkpoint continues (`--resume`); one whose final export exists is only evaluated. A run
  folder made with other flags is refused (choose another --out or variant name).
- `--jobs N` runs N at a time, each with N-th of the cores (OMP_NUM_THREADS, unless set).
- Writes OUT/ablations.csv (run, seed, flags, train_s, a column per task) and OUT/ablations.md
  (`table`). `--table CSV` prints the table of such a CSV, or of one whose time column is
  named train_s_* (reference/tiny_ablations.csv: seconds taken on 1 thread beside another job).
Importing this file does nothing.
"""
import argparse
import csv
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The README's ablation table: the preset and four one-flag changes (docs/tiny.md)
README_VARIANTS = [
    ("the preset (mined negatives, in-batch, T 0.05, 325 steps)", ""),
    ("`--demo-negatives random`", "--demo-negatives random"),
    ("`--no-in-batch`", "--no-in-batch"),
    ("`--steps 162` (half)", "--steps 162"),
    ("`--temperature 0.1`", "--temperature 0.1"),
]
# evaluate.py's local tasks (tiny/local_suite.py) -> the table's column names
COLUMNS = {"BBCHeadlineRetrieval": "retrieval", "BBCTopicClustering": "clustering",
           "BBCTopicClassification": "classification", "LeeSTS": "Lee STS"}
# a time column's name -> its header (the reference CSV's seconds were taken on 1 thread)
TIME_HEADERS = {"train_s": "train s", "train_s_1thread_contended": "train s (1 thread)"}
RULE = ("**Bold**: the difference from the first row exceeds twice its standard error, "
        "sqrt(s1^2/n1 + s2^2/n2); in brackets, within the noise.")


# ---------------------------------------------------------------------------- the table
def _cell(values: list[float]) -> str:
    """'mean ± std' (sample std, n - 1), or the value alone for one seed."""
    mean = statistics.fmean(values)
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:.2f}"


def _difference(values: list[float], base: list[float]) -> str:
    """' **+d**' when |d| > 2 standard errors of the difference of the means, else ' (+d)'.
    With one seed on either side there is no standard error: always in brackets."""
    d = statistics.fmean(values) - statistics.fmean(base)
    if len(values) > 1 and len(base) > 1:
        se = math.sqrt(statistics.variance(values) / len(values)
                       + statistics.variance(base) / len(base))
        if abs(d) > 2 * se:
            return f" **{d:+.1f}**"
    return f" ({d:+.1f})"


def _seeds(seeds: set[int]) -> str:
    s = sorted(seeds)
    if len(s) == 1:
        return f"seed {s[0]}"
    return f"seeds {s[0]}-{s[-1]}" if s == list(range(s[0], s[-1] + 1)) else \
        "seeds " + ", ".join(map(str, s))


def table(rows: list[dict]) -> str:
    """CSV rows (run, seed, [flags,] a train_s* column, a column per task) -> the markdown
    table: a row per run in order of appearance, mean ± std over its seeds, each difference
    from the first run's mean bold or in brackets by the 2-standard-error rule; the time
    column last, its mean in whole seconds."""
    columns = list(rows[0])
    time_column = next((c for c in columns if c.startswith("train_s")), None)
    metrics = [c for c in columns if c not in ("run", "seed", "flags", time_column)]
    runs = {}
    for r in rows:
        runs.setdefault(r["run"], []).append(r)
    header = [_seeds({int(r["seed"]) for r in rows}), "n", *metrics]
    header += [TIME_HEADERS.get(time_column, time_column)] if time_column else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = next(iter(runs.values()))
    for name, group in runs.items():
        cells = [name, str(len(group))]
        for m in metrics:
            values = [float(r[m]) for r in group]
            cells.append(_cell(values) + ("" if group is base else
                                          _difference(values, [float(r[m]) for r in base])))
        if time_column:
            cells.append(f"{statistics.fmean(float(r[time_column]) for r in group):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"run", "seed"} <= set(rows[0]):
        raise SystemExit(f"ablate: error: {path} has no rows with 'run' and 'seed' columns")
    return rows


# ---------------------------------------------------------------------------- the runs
def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-") or "variant"


def parse_variant(text: str) -> tuple[str, str]:
    name, sep, flags = text.partition("=")
    if not sep or not name.strip():
        raise SystemExit(f"ablate: error: --variant {text!r}: write NAME=FLAGS, e.g. "
                         f"'T 0.1=--temperature 0.1' (FLAGS may be empty: 'the preset=')")
    return name.strip(), flags.strip()


def check_runs(variants: list[tuple[str, str]], seeds: list[int], common: list[str]) -> None:
    """Every run's train.py command line through train.py's own parser, before anything runs:
    an unknown flag or a bad value fails here, naming the variant."""
    import train  # the recipe's parser; imported here so that --table needs no torch
    slugs = [slug(name) for name, _ in variants]
    if len(set(slugs)) < len(slugs):
        raise SystemExit(f"ablate: error: variant names {[n for n, _ in variants]} give the "
                         f"same folder name twice ({slugs}); rename one")
    for name, flags in variants:
        for flag in ("--out", "--seed", "--size"):
            if flag in shlex.split(flags) + common:
                raise SystemExit(f"ablate: error: variant {name!r}: {flag} is the runner's "
                                 f"(each run is --size tiny --seed S --out OUT/runs/...)")
        try:
            train.parse_config(["--size", "tiny", "--seed", str(seeds[0]), *shlex.split(flags),
                                *common])
        except SystemExit as e:
            raise SystemExit(f"ablate: error: variant {name!r} ({flags or 'no flags'}): "
                             f"train.py refuses its flags (above)") from e


def _run(command: list[str], log: str, env: dict) -> float:
    """command from the repository root, output to log; -> wall seconds; a failure names
    the log and shows its end."""
    t0 = time.time()
    with open(log, "a") as f:
        code = subprocess.run(command, cwd=ROOT, env=env, stdout=f,
                              stderr=subprocess.STDOUT).returncode
    if code:
        with open(log) as f:
            tail = f.read()[-2000:]
        raise RuntimeError(f"{' '.join(command[1:3])} ... exited with {code}; its log: "
                           f"{log}\n{tail}")
    return time.time() - t0


def run_one(folder: str, name: str, flags: str, seed: int, common: list[str], tasks: list[str],
            env: dict) -> dict:
    """Train (or resume, or skip when exported) and evaluate one run -> its CSV row."""
    os.makedirs(folder, exist_ok=True)
    record_path, train_out = os.path.join(folder, "ablate.json"), os.path.join(folder, "train")
    record = dict(run=name, flags=flags, seed=seed, common=common, train_s=0.0)
    if os.path.exists(record_path):
        with open(record_path) as f:
            record["train_s"] = json.load(f)["train_s"]  # a resumed run: the earlier processes
    with open(record_path, "w") as f:
        json.dump(record, f, indent=1)
    final = os.path.join(train_out, "final")
    if not os.path.isdir(final):
        resume = ["--resume"] if os.path.isdir(os.path.join(train_out, "checkpoints")) and \
            os.listdir(os.path.join(train_out, "checkpoints")) else []
        if not resume and os.path.isdir(train_out):
            shutil.rmtree(train_out)  # stopped before its first checkpoint: start it over
        command = [sys.executable, "train.py", "--size", "tiny", "--seed", str(seed),
                   *shlex.split(flags), *common, "--out", train_out, *resume]
        seconds = _run(command, os.path.join(folder, "train.log"), env)
        record["train_s"] += seconds
        with open(record_path, "w") as f:
            json.dump(record, f, indent=1)
    results = os.path.join(folder, "eval")
    _run([sys.executable, "evaluate.py", final, "--tasks", *tasks, "--results", results,
          "--overwrite"], os.path.join(folder, "evaluate.log"), env)
    return row_of(folder)


def row_of(folder: str) -> dict:
    """A finished run's folder -> its CSV row (scores as evaluate.py wrote them)."""
    with open(os.path.join(folder, "ablate.json")) as f:
        record = json.load(f)
    with open(os.path.join(folder, "eval", "scores.json")) as f:
        scores = json.load(f)["tasks"]
    return dict(run=record["run"], seed=record["seed"], flags=record["flags"],
                train_s=round(record["train_s"], 1),
                **{COLUMNS.get(task, task): round(v["score"], 2) for task, v in scores.items()})


def claim(folder: str, name: str, flags: str, seed: int, common: list[str]) -> None:
    """A run folder made with other flags is refused before anything runs."""
    path = os.path.join(folder, "ablate.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if (old["flags"], old["common"], old["seed"]) != (flags, common, seed):
            raise SystemExit(f"ablate: error: {folder} holds variant {old['run']!r} run with "
                             f"flags {old['flags']!r} + {old['common']} (seed {old['seed']}), "
                             f"not {flags!r} + {common}; choose another --out or variant name")


def run_grid(out: str, variants: list[tuple[str, str]], seeds: list[int], common: list[str],
             tasks: list[str], jobs: int) -> list[dict]:
    """Every (variant, seed) not finished yet, `jobs` at a time -> the CSV rows of the grid,
    written with the table to OUT/ablations.csv and OUT/ablations.md."""
    check_runs(variants, seeds, common)
    grid = [(os.path.join(out, "runs", slug(name), f"seed_{seed}"), name, flags, seed)
            for name, flags in variants for seed in seeds]
    for folder, name, flags, seed in grid:
        claim(folder, name, flags, seed, common)
    done = [g for g in grid if os.path.exists(os.path.join(g[0], "eval", "scores.json"))]
    todo = [g for g in grid if g not in done]
    print(f"ablate: {len(variants)} variants x {len(seeds)} seeds: {len(done)} done, "
          f"{len(todo)} to run, {jobs} at a time; runs in {os.path.join(out, 'runs')}", flush=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    failures = []

    def one(g):
        folder, name, flags, seed = g
        try:
            row = run_one(folder, name, flags, seed, common, tasks, env)
            print(f"ablate: {name} seed {seed}: {row}", flush=True)
        except RuntimeError as e:
            failures.append(f"{name} seed {seed}: {e}")
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, todo))
    rows = [row_of(g[0]) for g in grid if os.path.exists(os.path.join(g[0], "eval", "scores.json"))]
    if rows:
        with open(os.path.join(out, "ablations.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        with open(os.path.join(out, "ablations.md"), "w") as f:
            f.write(table(rows) + "\n\n" + RULE + "\n")
        print(table(rows) + "\n\n" + RULE)
    if failures:
        raise SystemExit("ablate: error: " + "\n".join(failures) +
                         "\nthe finished runs are kept; run the same command again to continue")
    return rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    common = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--out", default="out/ablations", help="folder of the runs, the CSV and table")
    p.add_argument("--variant", action="append", metavar="NAME=FLAGS",
                   help="a row: its name and train.py flags; repeat; the first is the baseline "
                        "(default: the README's five variants)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of each variant")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--tasks", nargs="+", default=["local"],
                   help="evaluate.py --tasks (default: the offline suite's four tasks)")
    p.add_argument("--table", metavar="CSV", help="print the table of this CSV and exit")
    args = p.parse_args(argv)
    if args.table:
        print(table(read_csv(args.table)) + "\n\n" + RULE)
        return
    if args.jobs < 1:
        p.error("--jobs must be positive")
    variants = [parse_variant(v) for v in args.variant] if args.variant else README_VARIANTS
    return run_grid(args.out, variants, args.seeds, common, args.tasks, args.jobs)


if __name__ == "__main__":
    main()
