"""Every intra-repo link of README.md and docs/*.md resolves: the file exists and, for
`file#anchor` or `#anchor`, a heading of that file has that anchor under GitHub's rule."""
import glob
import os
import re
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r"!?\[[^\]]*\]\(([^()\s]+)\)")  # [text](target) and ![alt](target)


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a file's headings: the text lower-cased, every character but
    letters, digits, spaces, '-' and '_' removed, spaces -> '-'; a repeat gets -1, -2, ..."""
    seen, anchors = Counter(), set()
    for _, line in prose_lines(markdown):
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            anchor = re.sub(r"[^\w\- ]", "", heading[1].lower()).replace(" ", "-")
            anchors.add(f"{anchor}-{seen[anchor]}" if seen[anchor] else anchor)
            seen[anchor] += 1
    return anchors


def prose_lines(markdown: str):
    """(line number, line) outside code blocks, fenced or indented."""
    fenced = False
    for number, line in enumerate(markdown.splitlines(), 1):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and not line.startswith(("    ", "\t")):
            yield number, line


def links(markdown: str):
    """(line number, target) of each link, not counting those inside `inline code`."""
    for number, line in prose_lines(markdown):
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            yield number, target


def broken_links(path: str) -> list[str]:
    """'file:line: target (why)' for each intra-repo link of a markdown file that is broken."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    broken = []
    for number, target in links(text):
        if re.match(r"[a-z][a-z+.-]*:", target):  # https:, mailto: ...: not this repo's
            continue
        file, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(resolved):
            broken.append(f"{path}:{number}: {target} (no such file)")
        elif anchor and not resolved.endswith(".md"):
            broken.append(f"{path}:{number}: {target} (an anchor into a file that is not markdown)")
        elif anchor:
            with open(resolved, encoding="utf-8") as f:
                if anchor not in github_anchors(f.read()):
                    broken.append(f"{path}:{number}: {target} (no heading with that anchor)")
    return broken


def test_github_anchor_rule():
    text = ("# F2LLM\n## The demo's negatives\n## `--dim` and `--dtype`\n## Results (v2, 4B)\n"
            "## Results (v2, 4B)\n    # an indented code line, no heading\n## F2LLM\n")
    assert github_anchors(text) == {"f2llm", "the-demos-negatives", "--dim-and---dtype",
                                    "results-v2-4b", "results-v2-4b-1", "f2llm-1"}


def test_the_checker_finds_broken_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("## Real heading\n")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md) [ok](docs/a.md#real-heading) [ok](#top) [web](https://x.y/z)\n"
                    "# Top\n`[code](nowhere.md)` and\n\n    [indented code](nowhere.md)\n"
                    "[gone](docs/b.md) and [no anchor](docs/a.md#the-heading)\n[self](#nope)\n")
    assert broken_links(str(page)) == [
        f"{page}:6: docs/b.md (no such file)",
        f"{page}:6: docs/a.md#the-heading (no heading with that anchor)",
        f"{page}:7: #nope (no heading with that anchor)"]


def test_every_intra_repo_link_in_the_readme_and_docs_resolves():
    docs = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    pages = [os.path.join(ROOT, "README.md"), *docs]
    checked = [t for p in pages for _, t in links(open(p, encoding="utf-8").read())
               if not t.startswith("http")]
    assert len(checked) >= 10  # the check is not vacuous: the README links each page of docs/
    broken = [b for p in pages for b in broken_links(p)]
    assert not broken, "\n".join(os.path.relpath(b, ROOT) for b in broken)
