"""The package's import structure: no cycles, layers point one way."""

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "oim_jax")

# Function-local imports are for what a run may not need and costs to load.
LOCAL_IMPORTS_ALLOWED = {
    "matplotlib", "matplotlib.patches", "matplotlib.pyplot",  # Agg first
    "torch",  # optional: only to read .pth weights
    "oim_jax.data.tfds_builders",  # tensorflow_datasets takes seconds
    "av",  # optional: PyAV, only to read videos
    "faiss",  # optional: approximate search
}


def _modules():
  out = {}
  for dirpath, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(dirpath, name)
        rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
  return out


MODULES = _modules()


def _imported(node, module):
  """Names of modules an Import/ImportFrom node loads (ours resolved)."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names]
  base = node.module or ""
  if node.level:
    parts = module.split(".")
    is_package = MODULES[module].endswith("__init__.py")
    parts = parts[:len(parts) - node.level + (1 if is_package else 0)]
    base = ".".join(parts + ([base] if base else []))
  names = []
  for alias in node.names:
    sub = f"{base}.{alias.name}"
    names.append(sub if sub in MODULES else base)
  return names


def _imports(module):
  """(top-level imports, function-local imports) of one module."""
  tree = ast.parse(open(MODULES[module]).read())
  top, local = [], []
  for node in tree.body:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      top += _imported(node, module)
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      for inner in ast.walk(node):
        if isinstance(inner, (ast.Import, ast.ImportFrom)):
          local += _imported(inner, module)
  return top, local


def _graph():
  graph = {}
  for module in MODULES:
    top, _ = _imports(module)
    deps = set()
    for name in top:
      # `import oim_jax.a.b` also runs oim_jax/__init__ and oim_jax/a/__init__,
      # except the importer's own packages, which are already loading.
      while name:
        if (name in MODULES and name != module
            and not module.startswith(name + ".")):
          deps.add(name)
        name = name.rpartition(".")[0]
    graph[module] = deps
  return graph


def test_no_import_cycles():
  graph = _graph()
  state, cycles = {}, []

  def visit(node, stack):
    state[node] = "open"
    for dep in sorted(graph[node]):
      if state.get(dep) == "open":
        cycles.append(stack[stack.index(dep):] + [dep])
      elif dep not in state:
        visit(dep, stack + [dep])
    state[node] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])
  assert not cycles, cycles


def _reaches(module, graph):
  seen, todo = set(), [module]
  while todo:
    for dep in graph[todo.pop()]:
      if dep not in seen:
        seen.add(dep)
        todo.append(dep)
  return seen


def test_layers_point_one_way():
  graph = _graph()
  outer = ("oim_jax.train_lib", "oim_jax.eval_lib", "oim_jax.search_lib",
           "oim_jax.evaluation", "oim_jax.cli", "oim_jax.launch")
  for module in MODULES:
    deps = _reaches(module, graph)
    if module.startswith("oim_jax.ops"):
      assert all(d.startswith(("oim_jax.ops", "oim_jax.pids")) or d == "oim_jax"
                 for d in deps), (module, deps)
    if module.startswith("oim_jax.models"):
      assert not any(d.startswith(("oim_jax.data",) + outer) for d in deps), (
          module, deps)
    if module.startswith("oim_jax.data"):
      assert not any(d.startswith(("oim_jax.models",) + outer)
                     for d in deps), (module, deps)
  assert not any(d.startswith("oim_jax.models")
                 for d in _reaches("oim_jax.config_defaults", graph))


def test_function_local_imports_only_for_optional_or_slow_modules():
  bad = []
  for module in MODULES:
    _, local = _imports(module)
    bad += [(module, name) for name in local
            if name not in LOCAL_IMPORTS_ALLOWED]
  assert not bad, bad


def test_every_module_imports_in_a_fresh_interpreter():
  names = sorted(m for m in MODULES if not m.endswith("__main__"))
  code = "import importlib\n" + "".join(
      f"importlib.import_module({m!r})\n" for m in names)
  subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                 timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
