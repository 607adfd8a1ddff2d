"""The library's layers point one way: lrmt_fast imports nothing from experiments/ or benchmarks/,
and no two of its modules import each other, directly or through others (module-level imports,
read with ast)."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "lrmt_fast")


def _modules():
    out = {}
    for d, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def _imports(name, path, modules, top_level_only):
    """The modules ``name`` imports (absolute names), at module level only or everywhere."""
    tree = ast.parse(open(path).read())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    pkg = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    found = set()

    def add(mod):
        found.add(mod)

    def walk(ns):
        for n in ns:
            if isinstance(n, ast.Import):
                for a in n.names:
                    add(a.name)
            elif isinstance(n, ast.ImportFrom):
                if n.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - n.level + 1]
                    mod = ".".join(base + ([n.module] if n.module else []))
                else:
                    mod = n.module
                add(mod)
                for a in n.names:               # "from . import x" names a submodule
                    if f"{mod}.{a.name}" in modules:
                        add(f"{mod}.{a.name}")
            elif top_level_only and isinstance(n, (ast.If, ast.Try)):   # guarded imports at module level
                walk(getattr(n, "body", []) + getattr(n, "orelse", []) + sum((h.body for h in getattr(n, "handlers", [])), []))

    walk(nodes)
    return found


def test_library_imports_no_callers():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        for imp in _imports(name, path, modules, top_level_only=False):
            if imp.split(".")[0] in ("experiments", "benchmarks"):
                bad.append((name, imp))
    assert not bad, bad


def test_no_import_cycles_between_library_modules():
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = set()
        for imp in _imports(name, path, modules, top_level_only=True):
            if imp in modules and imp != name and not name.startswith(imp + "."):   # not its own package
                deps.add(imp)
        graph[name] = deps
    # a package's __init__ re-exporting its submodules is not a cycle of the submodules themselves
    for name in list(graph):
        graph[name] = {d for d in graph[name] if not (d in modules and modules[d].endswith("__init__.py")
                                                       and name.startswith(d + "."))}
    seen, stack, cycles = set(), [], []

    def visit(n):
        if n in stack:
            cycles.append(stack[stack.index(n):] + [n])
            return
        if n in seen:
            return
        seen.add(n)
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if modules[d].endswith("__init__.py") and d == "lrmt_fast":
                continue        # the package's public re-exports, imported by nobody inside it
            visit(d)
        stack.pop()

    for n in sorted(graph):
        visit(n)
    assert not cycles, cycles


def test_only_lrmt_fast_is_installed():
    text = open(os.path.join(ROOT, "setup.py")).read()
    assert '"experiments"' not in text and '"benchmarks"' not in text
