"""The tiny preset's start, first run against second: `python train.py --size tiny` with an empty
shared cache (it writes the demo sample, trains the tokenizer, builds the token cache) against
the same command with another --out once the cache holds them (goal: the second run reaches
its first step in <= 10 s on 2 quiet cores). Each round: a fresh cache, one first run, then
`--warm` second runs, each with its own --out; and the floor, `python -c "import train"`.

    python -m bench.startup [--rounds 1] [--warm 3] [--json startup.json] [--workdir DIR]

A run is timed from launch to the line of its step 1 (printed when the step is done) and
stopped there; kept too: the seconds to its first line (imports, processes and the data's
setup) and to the line `tokens:` (the data, tokenizer, model and tokens ready). `--rounds 0
--cache-dir DIR` times second runs alone on a cache that a first run filled.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed_start(out: str, cache: str) -> dict:
    """One `train.py --size tiny` run, stopped after step 1: seconds to the setup's end and to
    step 1, and the lines that say what it built."""
    cmd = [sys.executable, "train.py", "--size", "tiny", "--steps", "2", "--out", out,
           "--cache-dir", cache]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    result, lines = {}, []
    for line in proc.stdout:
        lines.append(line.rstrip())
        result.setdefault("first_line_s", time.perf_counter() - t0)  # imports and setup done
        if line.startswith("tokens:"):
            result["setup_s"] = time.perf_counter() - t0
        if line.startswith("step 1/"):
            result["first_step_s"] = time.perf_counter() - t0
            break
    proc.terminate()  # the rest of the run is not what is measured
    proc.wait()
    if "first_step_s" not in result:
        raise SystemExit("bench.startup: the run stopped before step 1:\n" + "\n".join(lines[-20:]))
    result["built"] = [x.strip() for x in lines if "built " in x or "tokenized " in x]
    return result


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} s ({min(xs):.1f}-{max(xs):.1f}, n={len(xs)})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1, help="first runs, each on a fresh cache")
    parser.add_argument("--warm", type=int, default=3, help="second runs after each first run")
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument("--cache-dir", default="",
                        help="with --rounds 0: the filled cache the second runs read")
    parser.add_argument("--workdir", default="",
                        help="keep the runs and caches here (default: a temporary folder)")
    args = parser.parse_args(argv)
    load = [os.getloadavg()[0]]
    first, second, imports = [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.workdir or scratch
        for r in range(max(args.rounds, 1)):
            cache = args.cache_dir or os.path.join(tmp, f"cache{r}")
            if args.rounds:
                run = timed_start(os.path.join(tmp, f"r{r}-first"), cache)
                print(f"round {r}: first run {run['first_step_s']:.1f} s to step 1 "
                      f"(setup {run['setup_s']:.1f} s): " + "; ".join(run["built"]))
                first.append(run)
            for w in range(args.warm):
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-c", "import train"], cwd=HERE, check=True)
                imports.append(time.perf_counter() - t0)
                run = timed_start(os.path.join(tmp, f"r{r}-second{w}"), cache)
                assert not run["built"], run["built"]  # a second run builds nothing
                print(f"round {r}: second run {run['first_step_s']:.1f} s to step 1 (first "
                      f"line {run['first_line_s']:.1f} s, setup {run['setup_s']:.1f} s); "
                      f"import train {imports[-1]:.1f} s")
                second.append(run)
            load.append(os.getloadavg()[0])
    summary = {"second_run_to_step_1": spread([x["first_step_s"] for x in second]),
               "second_run_setup": spread([x["setup_s"] for x in second]),
               "second_run_setup_after_first_line": spread(
                   [x["setup_s"] - x["first_line_s"] for x in second]),
               "import_train": spread(imports),
               "load_average_1min": [round(x, 2) for x in load], "cpus": os.cpu_count()}
    if first:
        summary["first_run_to_step_1"] = spread([x["first_step_s"] for x in first])
        summary["first_run_setup"] = spread([x["setup_s"] for x in first])
        summary["ratio_first_over_second_to_step_1"] = round(
            statistics.median(x["first_step_s"] for x in first)
            / statistics.median(x["first_step_s"] for x in second), 2)
    for k, v in summary.items():
        print(f"{k}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "first": first, "second": second}, f, indent=1)


if __name__ == "__main__":
    main()
