"""The layout is the architecture: every module's imports (parsed with ast, lazy ones included) flow one way."""

import ast
import os

import pytest

from tests.support.common import ROOT

PKG = os.path.join(ROOT, "ddpm_dist")
# Every command is a top-level module with build_parser() and main(argv) (`python -m ddpm_dist.<command>`);
# command_line is what they share. Packages are libraries: none has a __main__.
COMMANDS = {"train", "sample", "evaluate", "shards", "viz", "report", "ema", "checkpoints", "export"}
ENTRY_POINTS = {f"ddpm_dist.{c}" for c in COMMANDS} | {"ddpm_dist.command_line"}
# What each part may import from ddpm_dist (besides itself). Entry points may import anything.
ALLOWED = {
    "rng": set(),
    "images": set(),
    "redact": set(),
    "cpu_malloc": set(),
    "goodput": set(),  # pure arithmetic over metrics.jsonl rows: obs (live) and reporting (after the fact) share it
    "diffusion": set(),
    "models": set(),
    "config": {"diffusion", "models", "redact"},
    "data": {"cpu_malloc", "rng", "images", "redact"},
    "obs": {"config", "goodput", "redact"},
    "parallel": {"cpu_malloc", "rng"},
    "drawing": {"images", "diffusion"},
    "artifacts": {"config", "diffusion", "models"},
    "sampling": {
        "artifacts",
        "config",
        "data",
        "diffusion",
        "images",
        "models",
        "obs",
        "parallel",
        "redact",
        "drawing",
    },
    "eval": {"artifacts", "data", "diffusion", "images", "obs", "parallel", "redact", "sampling"},
    "posthoc": {"artifacts", "eval", "models", "obs", "parallel", "redact", "drawing"},  # post-hoc EMA: profiles,
    # snapshots, reconstruction, and the sweep that scores reconstructions (eval) and draws them (drawing)
    "training": {
        "artifacts",
        "config",
        "data",
        "diffusion",
        "posthoc",
        "eval",
        "images",
        "models",
        "obs",
        "parallel",
        "redact",
        "rng",
        "sampling",
        "drawing",
    },
    "reporting": {"artifacts", "goodput", "redact"},  # reads what training and evaluation left behind, as data
}


def module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def modules() -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                out[module_name(os.path.join(d, f))] = os.path.join(d, f)
    return out


def imports(name: str, path: str) -> set[str]:
    """Every ddpm_dist module this file imports, anywhere in it."""
    tree = ast.parse(open(path).read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    known = modules()
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for a in node.names:  # `from . import folder` names a module; `from .x import f`, module x
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in found if m in known and m != name}


def part(name: str) -> str:
    """ddpm_dist.training.loop -> training; ddpm_dist.config -> config."""
    return name.split(".")[1]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return {name: imports(name, path) for name, path in modules().items()}


def test_no_import_cycle(graph):
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt) :] + [nxt]))
            if not state.get(nxt):
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in graph:
        if not state.get(node):
            visit(node, [node])


def test_no_library_module_imports_an_entry_point(graph):
    bad = [
        (m, sorted(deps & ENTRY_POINTS)) for m, deps in graph.items() if m not in ENTRY_POINTS and deps & ENTRY_POINTS
    ]
    assert not bad, bad


def test_parts_import_only_what_sits_below_them(graph):
    """models/ and diffusion/ import nothing of parallel/, training/, obs/, sampling/, eval/ (nothing at all);
    sampling/ and eval/ nothing of training/; and so on for every part, as docs/ARCHITECTURE.md draws it."""
    bad = []
    for m, deps in graph.items():
        if m in ENTRY_POINTS or m == "ddpm_dist":
            continue
        own = part(m)
        for d in deps:
            other = part(d)
            if other != own and other not in ALLOWED[own]:
                bad.append(f"{m} -> {d}")
    assert not bad, bad
    assert "training" not in ALLOWED["sampling"] | ALLOWED["eval"]
    assert not ALLOWED["models"] | ALLOWED["diffusion"]


def test_parts_form_floors(graph):
    """Folder level: no loop between parts (viz <-> sampling was one), so the parts stack into floors and every
    import points down; the table allows no loop either."""
    edges = {
        (part(m), part(d))
        for m, deps in graph.items()
        if m not in ENTRY_POINTS and m != "ddpm_dist"
        for d in deps
        if part(d) != part(m)
    }
    edges |= {(p, q) for p, allowed in ALLOWED.items() for q in allowed}
    floors, left = [], set(ALLOWED)
    while left:
        ground = {p for p in left if not any(a == p and b in left for a, b in edges)}
        assert ground, f"a loop among {sorted(left)}"
        floors.append(sorted(ground))
        left -= ground
    assert floors[0] == ["cpu_malloc", "diffusion", "goodput", "images", "models", "redact", "rng"], floors


def test_the_documented_table_is_this_table():
    """docs/ARCHITECTURE.md's "Who may import whom" says what ALLOWED enforces, row for row."""
    doc = open(os.path.join(ROOT, "docs", "ARCHITECTURE.md")).read().split("## Who may import whom")[1]
    rows = {}
    for line in doc.split("\n## ")[0].splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")] if line.startswith("| `") else None
        if cells and not cells[0].startswith("commands"):
            deps = set() if cells[1] == "nothing of ddpm_dist" else {d.strip(" `") for d in cells[1].split(",")}
            for name in cells[0].split(","):
                rows[name.strip(" `")] = deps
    assert rows == ALLOWED


def test_every_part_is_in_the_table():
    parts = {part(m) for m in modules() if m not in ENTRY_POINTS and m != "ddpm_dist"}
    assert parts == set(ALLOWED), parts ^ set(ALLOWED)


def raw_imports(path: str) -> set[str]:
    tree = ast.parse(open(path).read(), path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_collectives_go_through_parallel_and_sinks_through_the_metrics_processor():
    """torch.distributed itself is used in parallel/ only (checkpoint I/O through DCP excepted), and only the
    metrics processor writes to Prometheus."""
    dist_users, prom_users = [], []
    for name, path in modules().items():
        raw = raw_imports(path)
        if not name.startswith("ddpm_dist.parallel") and any(
            m == "torch.distributed"
            or (m.startswith("torch.distributed.") and not m.startswith("torch.distributed.checkpoint"))
            for m in raw
        ):
            dist_users.append(name)
        if "prometheus_client" in raw and name != "ddpm_dist.obs.prometheus":
            prom_users.append(name)
    graph = {name: imports(name, path) for name, path in modules().items()}
    prom_users += [
        m for m, deps in graph.items() if "ddpm_dist.obs.prometheus" in deps and m != "ddpm_dist.obs.metrics"
    ]
    assert not dist_users and not prom_users, (dist_users, prom_users)


def test_files_stay_small():
    long = {}
    for top in ("ddpm_dist", "launchers", "tests", "bench"):
        for d, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith(".py"):
                    n = sum(1 for _ in open(os.path.join(d, f)))
                    if n > 400:
                        long[os.path.join(d, f)] = n
    assert not long, long


def test_commands_have_one_shape():
    """Each command is ddpm_dist/<command>.py with build_parser() and main(argv); no package is a command."""
    mods = modules()
    assert not [m for m in mods if m.endswith(".__main__")], "a package __main__: commands are top-level modules"
    top = {m.split(".")[1] for m in mods if m.count(".") == 1}
    assert COMMANDS <= top, COMMANDS - top
    for c in COMMANDS:
        tree = ast.parse(open(mods[f"ddpm_dist.{c}"]).read())
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert {"build_parser", "main"} <= defined, (c, defined)
