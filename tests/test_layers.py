"""The package's layering, read from the imports themselves (every `import` statement, inside
functions included): a module may import its own layer or lower ones, never a higher one, and no
set of modules may import each other in a cycle. The order is written once, here."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "nanoforge"

# lowest first; each entry: layer name -> module prefixes (relative to nanoforge) it holds
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("version", "errors", "typed_json", "defaults")),  # no nanoforge imports but each other
    ("ir", ("ir",)),  # the IR: torch-free, knows no kernel, model or pass
    ("facts", ("facts", "kv_contract")),  # typed results passes produce and every later layer reads
    # parallel sits under kernels, models and passes because it is their shared vocabulary (shard specs,
    # rank groups, the collectives ctx.comm offers) and needs nothing but the IR and the facts
    ("parallel", ("parallel",)),
    ("kernels", ("kernels",)),
    ("codegen", ("codegen",)),
    ("models", ("models",)),  # checkpoints, tracing, binding params to tensors
    ("passes", ("passes",)),
    ("check", ("check",)),  # numeric checks and simulated ranks; the compiler hooks them into the pass manager
    ("plan", ("plan", "compiler")),
    ("runtime", ("runtime",)),
    ("api", ("llm",)),  # LLM: plan or checkpoint -> engine
    ("serving", ("serving",)),
    ("tools", ("tools",)),
    ("cli", ("cli",)),
    ("package", ("",)),  # nanoforge/__init__.py: the lazy LLM / SamplingParams re-exports
]


def _modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _layer(mod: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".") or p == "") and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"nanoforge.{mod} is in no layer of tests/test_layers.py: add it"
    return rank


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """nanoforge module -> the nanoforge modules it imports (a package counts as its __init__)."""
    edges: dict[str, set[str]] = {}
    for mod, f in mods.items():
        is_pkg = f.name == "__init__.py"
        here = mod.split(".") if mod else []
        found: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here if is_pkg else here[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    if not (node.module or "").startswith("nanoforge"):
                        continue
                    prefix = node.module[len("nanoforge"):].lstrip(".")
                names = [f"{prefix}.{a.name}".strip(".") if f"{prefix}.{a.name}".strip(".") in mods else prefix
                         for a in node.names]
                names = ["nanoforge" + ("." + n if n else "") for n in names]
            else:
                continue
            for name in names:
                if name != "nanoforge" and not name.startswith("nanoforge."):
                    continue
                target = name[len("nanoforge"):].lstrip(".")
                while target not in mods and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in mods and target != mod:
                    found.add(target)
        edges[mod] = found
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_runs_up_the_layers():
    edges = _imports(_modules())
    name = lambda m: f"nanoforge.{m}".rstrip(".")  # noqa: E731
    up = [f"{name(m)} ({LAYERS[_layer(m)][0]}) imports {name(t)} ({LAYERS[_layer(t)][0]})"
          for m, ts in sorted(edges.items()) for t in sorted(ts) if _layer(t) > _layer(m)]
    assert not up, "imports against the layer order:\n" + "\n".join(up)


def test_no_import_cycles():
    cycles = _cycles(_imports(_modules()))
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_imports_inside_functions_and_relative_ones(tmp_path):
    """The scan is what the two tests above rely on: it must see lazy and relative imports."""
    edges = _imports(_modules())
    assert "kernels.context" in edges["runtime.model_runner"]  # a module-level relative import
    assert any(t.startswith("ir") for t in edges["plan"])
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _is_triton_jit(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """A Triton kernel takes its pointers, strides and sizes positionally: the language has no other way."""
    return any("jit" in ast.unparse(d) for d in fn.decorator_list)


def _positional_params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    args = fn.args.posonlyargs + fn.args.args
    return len([a for a in args if a.arg not in ("self", "cls")])


def test_no_function_takes_more_than_seven_positional_parameters():
    """Settings travel as dataclasses (RunnerConfig, EngineConfig, pass Options), not as long
    argument lists whose order a caller must remember."""
    long = [f"{f.relative_to(ROOT.parent)}:{node.lineno} {node.name} ({_positional_params(node)})"
            for f in sorted(ROOT.rglob("*.py")) for node in ast.walk(ast.parse(f.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _positional_params(node) > 7
            and not _is_triton_jit(node)]
    assert not long, "functions with more than 7 positional parameters:\n" + "\n".join(long)


def test_plan_facts_are_read_through_their_types():
    """Facts travel in module.meta as JSON; only facts.py indexes it (the IR's parser and printer
    copy it whole): everyone else reads typed facts (facts.read, Plan.kv_contract, ...)."""
    allowed = {"facts.py", "ir/parser.py", "ir/printer.py"}
    hits = [f"{f.relative_to(ROOT)}:{i}: {line.strip()}" for f in sorted(ROOT.rglob("*.py"))
            if str(f.relative_to(ROOT)) not in allowed
            for i, line in enumerate(f.read_text().splitlines(), 1) if "meta[" in line or "meta.get(" in line]
    assert not hits, "module.meta indexed outside facts.py:\n" + "\n".join(hits)
