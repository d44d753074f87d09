"""The step path, read off the source: the functions and classes that one training step reaches
from the loop's calls (model.packed_chunks, train.cached_step, train.step_loss,
train.optimizer_step), following calls and constructions through the recipe's files. The
count of docs/design.md §4 ("one step in at most ~250 lines over 3 files") and the copy test
both read it, so the text a lecturer copies is the text that is counted."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = ("model", "loss", "train", "data", "config")  # module -> ROOT/{module}.py, in the
# order a copy defines them (train.py's step uses model.py's and loss.py's functions)
LOOP_CALLS = [("model", "packed_chunks"), ("train", "cached_step"), ("train", "step_loss"),
              ("train", "optimizer_step")]
# the options (docs/options.md), read after the recipe: Matryoshka and distillation act on the
# cached reps only (docs/design.md §4); the detached gather is the official code's, an ablation
OPTIONS = {"matryoshka", "matryoshka_dims", "distillation_loss", "candidate_logits",
           "gather_detached"}


def _module(name: str):
    """-> ({top-level name: its node: def, class or constant}, {alias: recipe module or name})."""
    with open(os.path.join(ROOT, f"{name}.py")) as f:
        tree = ast.parse(f.read())
    defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)}
    defs.update({t.id: n for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
                 if isinstance(t, ast.Name)})
    aliases = {}  # local name -> ("module", m) or ("name", m, name), recipe modules only
    for n in tree.body:
        if isinstance(n, ast.Import):
            aliases.update({a.asname or a.name: ("module", a.name) for a in n.names
                            if a.name in RECIPE})
        elif isinstance(n, ast.ImportFrom) and n.module in RECIPE:
            aliases.update({a.asname or a.name: ("name", n.module, a.name) for a in n.names})
    return defs, aliases


def _target(node, defs, aliases, here):
    """A name or module attribute that refers to one of the recipe's top-level definitions."""
    if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
        if node.id in defs:
            return here, node.id
        alias = aliases.get(node.id)
        return alias[1:] if alias and alias[0] == "name" else None
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        alias = aliases.get(node.value.id)
        return (alias[1], node.attr) if alias and alias[0] == "module" else None
    return None


def _annotations(node) -> set[int]:
    """ids of the nodes inside type annotations: a reader follows calls, not annotations."""
    inside = set()
    for sub in ast.walk(node):
        for ann in ([a.annotation for a in ast.walk(sub) if isinstance(a, ast.arg)]
                    + [getattr(sub, "returns", None), getattr(sub, "annotation", None)]):
            if ann is not None:
                inside |= {id(n) for n in ast.walk(ann)}
    return inside


def _first_line(node) -> int:
    return min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])


def step_path(roots=LOOP_CALLS, skip=OPTIONS) -> dict:
    """{(module, name): lines} of every definition that the roots refer to, transitively
    (calls, functions passed as values or defaults: cached_step's embed=model.embed_packed),
    skipping `skip` and type annotations, and names a function assigns itself."""
    modules = {m: _module(m) for m in RECIPE}
    seen, todo = {}, list(roots)
    while todo:
        here, name = todo.pop()
        defs, aliases = modules[here]
        if (here, name) in seen or name in skip or name not in defs:
            continue
        node = defs[name]
        seen[here, name] = node.end_lineno - _first_line(node) + 1
        local = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)
                 and isinstance(n.ctx, ast.Store)}
        skipped = _annotations(node)
        for sub in ast.walk(node):
            if id(sub) in skipped or (isinstance(sub, ast.Name) and sub.id in local):
                continue
            target = _target(sub, defs, aliases, here)
            if target and target != (here, name):
                todo.append(target)
    return seen


def source_of(path: dict) -> str:
    """The definitions' text, file by file in RECIPE's order and in file order within each, as
    a reader would paste them into one notebook cell."""
    modules = {m: _module(m)[0] for m in RECIPE}
    text = []
    for m, name in sorted(path, key=lambda key: (RECIPE.index(key[0]),
                                                  modules[key[0]][key[1]].lineno)):
        node = modules[m][name]
        with open(os.path.join(ROOT, f"{m}.py")) as f:
            text.append("".join(f.readlines()[_first_line(node) - 1:node.end_lineno]))
    return "\n\n".join(text)
