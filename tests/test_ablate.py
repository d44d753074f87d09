"""tools/ablate.py: the README's ablation table is the runner's table of
reference/tiny_ablations.csv; the 2-standard-error rule; bad variants fail before anything runs;
a 2-variant x 1-seed grid of a few steps runs (2 at a time), writes its CSV and table, and a
second invocation reruns nothing."""
import json
import os

import pytest
from conftest import ROOT

from tools import ablate


def test_the_readme_table_is_the_runners_table_of_the_reference_csv():
    """`python -m tools.ablate --table reference/tiny_ablations.csv` prints, line for line, the
    README's table (means, sample stds, differences bold or bracketed, mean train seconds)."""
    got = ablate.table(ablate.read_csv(os.path.join(ROOT, "reference", "tiny_ablations.csv")))
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert got.count("\n") == 6 and got in readme


def test_a_difference_is_bold_only_beyond_two_standard_errors():
    """base 0, 2 (mean 1, variance 2); 4, 6: d = 4 > 2 sqrt(2/2 + 2/2) = 2.83, bold; 2, 4:
    d = 2, in brackets; one seed has no standard error: in brackets however far."""
    rows = [dict(run=run, seed=str(i), score=str(v)) for run, values in
            [("base", (0, 2)), ("far", (4, 6)), ("near", (2, 4)), ("one seed", (40,))]
            for i, v in enumerate(values)]
    lines = ablate.table(rows).splitlines()
    assert lines[0] == "| seeds 0-1 | n | score |"
    assert lines[2:] == ["| base | 2 | 1.00 ± 1.41 |", "| far | 2 | 5.00 ± 1.41 **+4.0** |",
                         "| near | 2 | 3.00 ± 1.41 (+2.0) |", "| one seed | 1 | 40.00 (+39.0) |"]


def test_bad_variants_fail_before_anything_runs(tmp_path):
    with pytest.raises(SystemExit, match="write NAME=FLAGS"):
        ablate.main(["--out", str(tmp_path), "--variant", "=--no-in-batch"])
    with pytest.raises(SystemExit, match="variant 'typo' .--no-inbatch.: train.py refuses"):
        ablate.main(["--out", str(tmp_path), "--variant", "a=", "--variant", "typo=--no-inbatch"])
    with pytest.raises(SystemExit, match="--seed is the runner's"):
        ablate.main(["--out", str(tmp_path), "--variant", "a=--seed 3"])
    assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_a_grid_runs_once_then_a_second_invocation_reruns_nothing(tmp_path, small_demo_dir,
                                                                  capsys):
    """2 variants x 1 seed of 2 steps, 2 at a time, scored on Lee STS: a CSV row per run with
    the score evaluate.py wrote, each run trained with its own flags, the table; run again,
    nothing runs and no file changes; the same name with other flags is refused."""
    out = tmp_path / "grid"
    argv = ["--out", str(out), "--seeds", "0", "--jobs", "2", "--tasks", "LeeSTS",
            "--variant", "the preset=", "--variant", "T 0.1=--temperature 0.1", "--",
            "--data", small_demo_dir, "--token-cache", small_demo_dir + "_tokens", "--steps", "2",
            "--batch-size", "8", "--max-length", "32", "--eval-every", "0", "--save-every", "0"]
    rows = ablate.main(argv)
    assert [(r["run"], r["seed"], r["flags"]) for r in rows] == [
        ("the preset", 0, ""), ("T 0.1", 0, "--temperature 0.1")]
    for r, temperature in zip(rows, (0.05, 0.1)):
        run = out / "runs" / ablate.slug(r["run"]) / "seed_0"
        config = json.loads((run / "train" / "config.json").read_text())
        assert (config["temperature"], config["steps"], config["seed"]) == (temperature, 2, 0)
        scores = json.loads((run / "eval" / "scores.json").read_text())["tasks"]
        assert r["Lee STS"] == round(scores["LeeSTS"]["score"], 2) and r["train_s"] > 0
    assert ablate.read_csv(out / "ablations.csv")[1]["Lee STS"] == str(rows[1]["Lee STS"])
    assert (out / "ablations.md").read_text().startswith(ablate.table(
        ablate.read_csv(out / "ablations.csv")))

    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert ablate.main(argv) == rows
    assert "2 done, 0 to run" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()
            and p.suffix not in (".csv", ".md")} == {p: t for p, t in files.items()
                                                     if p.suffix not in (".csv", ".md")}
    with pytest.raises(SystemExit, match="holds variant 'T 0.1' run with flags"):
        ablate.main([a if a != "T 0.1=--temperature 0.1" else "T 0.1=--temperature 0.2"
                     for a in argv])
