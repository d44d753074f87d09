"""docs/design.md holds: every "docs/design.md §N" or "IN" cited in code, help, errors and docs
names a section or an invariant it has; the tests it names exist; every file and command the
README and docs name is in the repository; and one step reads in at most 250 lines over 3
files (its §4, counted by tests/step_path.py)."""
import ast
import glob
import os
import re
import subprocess

import step_path

ROOT = step_path.ROOT
DESIGN = os.path.join(ROOT, "docs", "design.md")
CITATION = re.compile(r"docs/design\.md (§\d+|I\d)")


def tracked_text_files() -> list[str]:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    return [os.path.join(ROOT, f) for f in files if f.endswith((".py", ".md", ".txt", ".toml"))]


def design_targets(text: str) -> set[str]:
    """The sections ("§N", from "## N. Title") and invariants ("IN", from "- **IN title.**")."""
    return ({f"§{n}" for n in re.findall(r"^## (\d+)\. ", text, re.M)}
            | set(re.findall(r"^- \*\*(I\d) ", text, re.M)))


def test_every_design_citation_resolves():
    with open(DESIGN, encoding="utf-8") as f:
        targets = design_targets(f.read())
    assert {"§2", "§4", "§8", "I1", "I7"} <= targets
    cited = [(os.path.relpath(path, ROOT), target) for path in tracked_text_files()
             for target in CITATION.findall(open(path, encoding="utf-8").read())]
    assert len(cited) >= 15  # not vacuous: the code cites the design card throughout
    assert not [c for c in cited if c[1] not in targets]
    # the old name of the card, which pointed at no file, is gone everywhere
    assert not [p for p in tracked_text_files() if re.search(r"\bDESIGN (§|I\d)", open(p).read())]


def test_the_tests_the_design_names_exist():
    with open(DESIGN, encoding="utf-8") as f:
        text = f.read()
    pairs, path = [], None  # `::name` belongs to the last `tests/x.py` written before it
    for file, name in re.findall(r"(tests/\w+\.py)|::(\w+)", text):
        path = file or path
        if name:
            pairs.append((path, name))
    assert len(pairs) >= 10
    for path, name in pairs:
        with open(os.path.join(ROOT, path)) as f:
            defined = {n.name for n in ast.walk(ast.parse(f.read())) if isinstance(n, ast.FunctionDef)}
        assert name in defined, f"docs/design.md names {path}::{name}, which does not exist"


def test_every_file_and_command_the_docs_name_is_in_the_repository():
    """`path/x.py`, `x.py ARGS` and `python -m folder.name` in README.md and docs/: each names a
    file of this repository; the official code's files are named as F2LLM/..., its own folder
    (docs/differences.md compares with it line by line)."""
    pages = [os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "docs", "*.md"))]
    missing, named = [], 0
    for page in pages:
        if page.endswith("differences.md"):
            continue
        text = open(page, encoding="utf-8").read()
        files = re.findall(r"`(?:python |torchrun [^`]*?)?([\w./-]+\.py)\b[^`]*`", text)
        modules = re.findall(r"python -m ([a-z_]+\.[a-z_]+)", text)
        for f in files + [m.replace(".", "/") + ".py" for m in modules]:
            named += 1
            if not f.startswith("F2LLM/") and not os.path.exists(os.path.join(ROOT, f)):
                missing.append(f"{os.path.relpath(page, ROOT)}: {f}")
    assert named >= 20 and not missing, missing


def test_one_step_reads_in_at_most_250_lines_over_3_files():
    path = step_path.step_path()
    # the walk reaches the whole step: packing, pooling, both passes, the loss and its gather,
    # the update (so a count that shrinks by losing a piece fails here, not silently)
    assert {("model", "pack"), ("model", "last_token_pool"), ("train", "cached_step"),
            ("train", "embed_chunks"), ("loss", "scores"), ("loss", "_GatherWithGrad"),
            ("train", "optimizer_step"), ("train", "all_means")} <= path.keys()
    lines, files = sum(path.values()), {module for module, _ in path}
    assert files == {"train", "model", "loss"}, files
    assert lines <= 250, sorted(path.items(), key=lambda kv: -kv[1])
