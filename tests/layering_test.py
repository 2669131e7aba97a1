"""The layering of rlhf_jax (../shared/STYLE.md "The house"): imports point down only, stages never import one
another, no module imports itself through others, and an import inside a function says why on its line.

Every module's imports are read with `ast`, without importing anything. A deliberate upward import, a stage
importing a stage, a cycle and an unexplained lazy import are planted in a throwaway package to show that each
check fails when it should.
"""

import ast
import os
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The layer of every module, by the longest matching dotted prefix. A module that matches none is an error,
# so a new module has to be placed in a layer on purpose.
LAYERS = {
    # L0 infrastructure, no model code
    "rlhf_jax.errors": 0, "rlhf_jax.sharding": 0, "rlhf_jax.optim": 0, "rlhf_jax.checkpoint": 0,
    "rlhf_jax.metrics": 0, "rlhf_jax.tokenizers": 0, "rlhf_jax.data": 0, "rlhf_jax.tasks": 0,
    "rlhf_jax.preemption": 0,
    # L1 the Transformer, its heads and presets; the config blocks built from them
    "rlhf_jax.models": 1, "rlhf_jax.configs": 1,
    # L2 losses and sampling: functions of arrays
    "rlhf_jax.losses": 2, "rlhf_jax.sampling": 2,
    # L3 evaluations, the supervised loop, the RL rollout and update, the stages' helpers
    "rlhf_jax.evals": 3, "rlhf_jax.training": 3, "rlhf_jax.rl": 3, "rlhf_jax.runtime": 3, "rlhf_jax.feedback": 3,
    # L4 stages
    "rlhf_jax.stages": 4,
    # L5 the registry, seed sweeps, the chat loop
    "rlhf_jax.pipeline": 5, "rlhf_jax.sweep": 5, "rlhf_jax.chat": 5,
    # the package itself (its __init__ imports nothing)
    "rlhf_jax": 0,
}
STAGES_PACKAGE = "rlhf_jax.stages"
LAZY_MARK = "# lazy:"


def module_files(root: str, package: str) -> dict[str, str]:
  """{dotted module name: path} of every .py file of `package` under `root`."""
  out = {}
  for dirpath, _, files in os.walk(os.path.join(root, *package.split("."))):
    for name in files:
      if name.endswith(".py"):
        rel = os.path.relpath(os.path.join(dirpath, name), root)[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, name)
  return out


def layer_of(module: str, layers: dict[str, int]) -> int | None:
  """The layer of the longest prefix of `module` in `layers`; a top-level package's entry matches itself only."""
  best = None
  for prefix, layer in layers.items():
    if module == prefix or ("." in prefix and module.startswith(prefix + ".")):
      if best is None or len(prefix) > len(best[0]):
        best = (prefix, layer)
  return None if best is None else best[1]


def imports_of(path: str, module: str, known: set[str], package: str):
  """(imported project module, line, at module level, source line) for every import of `path`."""
  source = open(path).read()
  lines = source.splitlines()
  tree = ast.parse(source)
  is_pkg = path.endswith("__init__.py")
  top_level = {id(node) for node in tree.body}
  out = []
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative import
        parts = module.split(".")[:len(module.split(".")) - node.level + (1 if is_pkg else 0)]
        base = ".".join(parts + ([base] if base else []))
      # `from pkg import sub` imports the submodule pkg.sub when there is one.
      names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    else:
      continue
    for name in names:
      if name == package or name.startswith(package + "."):
        # the module itself or, for `import a.b.c`, the longest known prefix
        while name not in known and "." in name:
          name = name.rsplit(".", 1)[0]
      out.append((name, node.lineno, id(node) in top_level, lines[node.lineno - 1]))
  return out


def violations(root: str, package: str, layers: dict[str, int], *, stages: str,
               extra_files: dict[str, str] | None = None) -> list[str]:
  """Every breach of the layering rules in `package` (and in `extra_files`, {name: path} of scripts such as
  run.py, checked for unexplained lazy imports only)."""
  files = module_files(root, package)
  known = set(files)
  problems, graph = [], {}
  for module, path in sorted(files.items()):
    mine = layer_of(module, layers)
    if mine is None:
      problems.append(f"{module}: in no layer (add it to LAYERS)")
      continue
    graph[module] = set()
    for name, line, top, text in imports_of(path, module, known, package):
      if not top and LAZY_MARK not in text:
        problems.append(f"{module}:{line}: import inside a function without a '{LAZY_MARK} <reason>' comment")
      if name not in known:
        continue
      graph[module].add(name)
      theirs = layer_of(name, layers)
      if theirs is not None and theirs > mine:
        problems.append(f"{module}:{line}: upward import of {name} (layer {theirs}) from layer {mine}")
      in_stages = lambda m: m.startswith(stages + ".")  # noqa: E731
      if in_stages(module) and in_stages(name) and name != module:
        problems.append(f"{module}:{line}: a stage imports another stage ({name})")
  for name, path in (extra_files or {}).items():
    for _, line, top, text in imports_of(path, name, known, package):
      if not top and LAZY_MARK not in text:
        problems.append(f"{name}:{line}: import inside a function without a '{LAZY_MARK} <reason>' comment")
  problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
  return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One cycle per strongly connected component of more than one module (or a module importing itself)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []
  counter = [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1 or v in graph.get(v, ()):
        out.append(sorted(comp) + [sorted(comp)[0]])

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_rlhf_jax_imports_point_down_only():
  scripts = {name: os.path.join(ROOT, f"{name}.py") for name in ("run", "chat")
             if os.path.exists(os.path.join(ROOT, f"{name}.py"))}
  assert violations(ROOT, "rlhf_jax", LAYERS, stages=STAGES_PACKAGE, extra_files=scripts) == []


def test_every_stage_in_the_registry_is_a_module_of_the_stages_package():
  # The registry (L5) is the only place stages meet; each entry is one module with check and run.
  src = open(os.path.join(ROOT, "rlhf_jax", "pipeline.py")).read()
  tree = ast.parse(src)
  registry = next(n for n in tree.body if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", "") == "STAGES")
  modules = {call.args[0].id for call in registry.value.values}
  for name in modules:
    path = os.path.join(ROOT, "rlhf_jax", "stages", f"{name}.py")
    assert os.path.exists(path), name
    defs = {n.name for n in ast.parse(open(path).read()).body if isinstance(n, ast.FunctionDef)}
    assert {"check", "run"} <= defs, (name, defs)


def _package(tmp_path, files: dict[str, str]) -> str:
  for rel, text in files.items():
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
  return str(tmp_path)


_TOY_LAYERS = {"toy": 0, "toy.low": 0, "toy.mid": 1, "toy.stages": 2}  # toy.stages.* are layer 2
_TOY = {"toy/__init__.py": "", "toy/low.py": "import os\n", "toy/mid.py": "from toy import low\n",
        "toy/stages/__init__.py": "", "toy/stages/a.py": "from toy import mid\n",
        "toy/stages/b.py": "from toy import low\n"}


def test_a_clean_package_passes(tmp_path):
  assert violations(_package(tmp_path, _TOY), "toy", _TOY_LAYERS, stages="toy.stages") == []


@pytest.mark.parametrize("change, expected", [
    ({"toy/low.py": "from toy import mid\n"}, "toy.low:1: upward import of toy.mid (layer 1) from layer 0"),
    ({"toy/stages/b.py": "from toy.stages import a\n"}, "toy.stages.b:1: a stage imports another stage"),
    ({"toy/low.py": "def f():\n  from toy import mid\n"}, "import inside a function without a '# lazy:"),
    ({"toy/new.py": "x = 1\n"}, "toy.new: in no layer"),
    ({"toy/mid.py": "from toy import low\n", "toy/low.py": "import toy.mid  # lazy: not at top, still a cycle\n"},
     "upward import of toy.mid"),
])
def test_a_planted_breach_is_reported(tmp_path, change, expected):
  root = _package(tmp_path, {**_TOY, **change})
  found = violations(root, "toy", _TOY_LAYERS, stages="toy.stages")
  assert any(expected in p for p in found), found


def test_a_cycle_within_one_layer_is_reported(tmp_path):
  root = _package(tmp_path, {**_TOY, "toy/low.py": "from toy import low2\n", "toy/low2.py": "from toy import low\n"})
  found = violations(root, "toy", {**_TOY_LAYERS, "toy.low2": 0}, stages="toy.stages")
  assert "import cycle: toy.low -> toy.low2 -> toy.low" in found, found


def test_a_lazy_import_with_its_reason_is_allowed(tmp_path):
  root = _package(tmp_path, {**_TOY, "toy/low.py": "def f():\n  import json  # lazy: only the report needs it\n"})
  assert violations(root, "toy", _TOY_LAYERS, stages="toy.stages") == []
