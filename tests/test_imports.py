"""The package's import graph (read with ast, nothing imported): no cycles, no library module
importing a command module (`__main__`, or a module that is only a command), and nothing in the
package importing an experiment, a benchmark or a test. Function-local imports count: a cycle
through a lazy import is still a cycle."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "miles_jax"
# Modules that are only commands (their library parts live elsewhere). Modules that are both a
# command and a library (data.prepare, data.synthetic, embed, ...) are imported by module name.
COMMANDS = {"miles_jax.train.__main__", "miles_jax.convert", "miles_jax.evaluate"}
OUTSIDE = ("experiments", "benchmarks", "tests")
# Floors below training: they never import miles_jax.train (e.g. evaluation took
# normalize_frames from train/step.py; it is the model's, models/video.py).
BELOW_TRAIN = ("miles_jax.models", "miles_jax.data", "miles_jax.evaluation", "miles_jax.weights")


def _modules(root=ROOT, package=PACKAGE) -> dict:
  """{dotted module name: file path} of every .py file of the package."""
  out = {}
  for d, _, files in os.walk(os.path.join(root, package)):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(d, f), root)[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(d, f)
  return out


def _imports(name: str, path: str, modules: dict) -> set:
  """Dotted names `name` imports (package modules resolved to the module, others as written)."""
  is_pkg = path.endswith("__init__.py")
  out = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative import
        parts = name.split(".") if is_pkg else name.split(".")[:-1]
        parts = parts[:len(parts) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      for a in node.names:
        sub = f"{base}.{a.name}"
        out.add(sub if sub in modules else base)
  return out


def graph(root=ROOT, package=PACKAGE) -> dict:
  modules = _modules(root, package)
  edges = {}
  for name, path in modules.items():
    deps = _imports(name, path, modules)
    edges[name] = {d for d in deps if d in modules and d != name and d != package}
    edges[name] |= {d for d in deps if d.split(".")[0] in OUTSIDE}
  return edges


def find_cycle(edges: dict):
  """One import cycle as a list of modules, or None."""
  state, stack = {}, []

  def visit(n):
    state[n] = 1
    stack.append(n)
    for m in sorted(edges.get(n, ())):
      if m not in edges:
        continue
      if state.get(m) == 1:
        return stack[stack.index(m):] + [m]
      if not state.get(m):
        found = visit(m)
        if found:
          return found
    stack.pop()
    state[n] = 2
    return None

  for n in sorted(edges):
    if not state.get(n):
      found = visit(n)
      if found:
        return found
  return None


def test_no_import_cycles():
  cycle = find_cycle(graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_library_modules_import_no_command_no_experiment_and_nothing_above():
  bad = []
  for name, deps in graph().items():
    for d in deps:
      if d.split(".")[0] in OUTSIDE:
        bad.append(f"{name} imports {d} (outside the package)")
      elif (d in COMMANDS or d.endswith(".__main__")) and name not in COMMANDS:
        bad.append(f"{name} imports the command module {d}")
      elif name.startswith(BELOW_TRAIN) and d.startswith("miles_jax.train"):
        bad.append(f"{name} imports {d} (upward: training sits above it)")
  assert not bad, "\n".join(bad)


def test_the_checker_finds_what_it_should(tmp_path):
  """The walk sees top-level, function-local and relative imports, and reports a cycle."""
  pkg = tmp_path / "pkg"
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "sub" / "__init__.py").write_text("")
  (pkg / "a.py").write_text("from pkg.sub import b\n")
  (pkg / "sub" / "b.py").write_text("def f():\n  from .. import c\n")
  (pkg / "c.py").write_text("import pkg.a\nimport experiments.x\n")
  edges = graph(str(tmp_path), "pkg")
  assert edges["pkg.a"] == {"pkg.sub.b"} and edges["pkg.sub.b"] == {"pkg.c"}
  assert edges["pkg.c"] == {"pkg.a", "experiments.x"}
  assert find_cycle(edges) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
  (pkg / "c.py").write_text("import numpy\n")
  assert find_cycle(graph(str(tmp_path), "pkg")) is None


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_command_modules_exist(module):
  assert module in _modules(), module
