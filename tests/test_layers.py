"""The package's structure, read from its imports (every import statement, including those inside functions)."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The repository's folders under their import names: kernels/ installs as streamsynth.kernels (pyproject.toml).
IMPORT_NAMES = {"kernels": "streamsynth.kernels"}


def module_files(package: str) -> dict[str, Path]:
    """Dotted module name → file, for `package` (a dotted name, or a repository folder such as "kernels")."""
    folder, name = package.replace(".", "/"), IMPORT_NAMES.get(package, package)
    files = {}
    for path in (ROOT / folder).rglob("*.py"):
        parts = path.relative_to(ROOT / folder).with_suffix("").parts
        files[".".join([name, *parts]).removesuffix(".__init__")] = path
    return files


def import_graph(package: str, *more: str) -> dict[str, set[str]]:
    """module → the modules of `package` (and of the `more` packages or scripts) it imports, by dotted name."""
    files: dict[str, Path] = {}
    for where in (package, *more):
        files.update({where.removesuffix(".py"): ROOT / where} if where.endswith(".py") else module_files(where))
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in files.items():
        graph[name] |= {t for t in imported_names(name, path, files) if t in files and t != name}
    return graph


def imported_names(name: str, path: Path, files: dict[str, Path] | None = None) -> set[str]:
    """Every absolute dotted name module `name` (at `path`) imports. `from package import x` counts as importing
    package.x where that is a module of `files`, else as importing `package`."""
    files = files or {}
    here = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = here.split(".")[:len(here.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            for alias in node.names:
                names.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in files else module)
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return names


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    return found


def test_the_stream_package_has_no_import_cycle():
    graph = import_graph("streamsynth.stream")
    assert graph["streamsynth.stream.loader"] >= {"streamsynth.stream.dataset"}
    assert cycles(graph) == []


def test_the_stream_and_its_loader_share_one_group_maker_and_name_no_pipeline():
    """The stream is thin over its group maker, which StreamLoader's workers use too; which diffusers pipeline a
    model needs is synth/'s business, never the stream's."""
    graph = import_graph("streamsynth.stream")
    assert "streamsynth.stream.groups" in graph["streamsynth.stream.dataset"]
    assert "streamsynth.stream.groups" in graph["streamsynth.stream.loader"]
    assert "streamsynth.synth.sampler" not in graph["streamsynth.stream.dataset"]
    named = [f"{path.relative_to(ROOT)}: {name}" for path in (ROOT / "streamsynth" / "stream").rglob("*.py")
             for name in re.findall(r"\b\w*Pipeline\b", path.read_text())]
    assert named == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


# The layers, bottom first: nothing imports a module of a higher layer. Modules of one layer may import each other.
BOTTOM = {"streamsynth.seeding", "streamsynth.transforms", "streamsynth.errors", "streamsynth.safeio",
          "streamsynth.imagefiles", "streamsynth.shards", "streamsynth.ranks", "streamsynth.peakmemory",
          "streamsynth.limits"}
# The kernels (streamsynth.kernels) import nothing of streamsynth (below), so they sit at the bottom: the captioner's
# decoding attention and the synthesis fast path both use them.
STAGES = ("captions", "prompts", "synth", "stream", "classifier", "digits")
TOP = "commands, benchmarks and the training loop"
# The top: the package's public names, the CLI, the command modules, the benchmarks and the training loop.
TOP_PACKAGES = ("streamsynth.commands", "streamsynth.benchmarks", "streamsynth.integrations")
TOP_MODULES = ("streamsynth", "streamsynth.__main__", "streamsynth.cli", "streamsynth.train", "train")


def layer(module: str) -> tuple[int, str]:
    """(height, name) of a module's layer; a module that is in no layer fails the test that walks them."""
    if module in BOTTOM:
        return 0, "bottom (seeding, transforms, errors, safeio, ...)"
    if module == "streamsynth.kernels" or module.startswith("streamsynth.kernels."):
        return 0, "bottom (kernels)"
    for height, stage in enumerate(STAGES, start=1):
        if module == f"streamsynth.{stage}" or module.startswith(f"streamsynth.{stage}."):
            return height, stage
    if module in TOP_MODULES or any(module == p or module.startswith(p + ".") for p in TOP_PACKAGES):
        return len(STAGES) + 1, TOP
    return -1, "no layer"


def whole_graph() -> dict[str, set[str]]:
    return import_graph("streamsynth", "kernels", "train.py")


def test_nothing_imports_a_higher_layer():
    graph = whole_graph()
    assert [m for m in graph if layer(m)[0] < 0] == [], "modules in no layer: add them to a layer above"
    upward = [f"{module} ({layer(module)[1]}) imports {target} ({layer(target)[1]})"
              for module, targets in sorted(graph.items()) for target in sorted(targets)
              if layer(target)[0] > layer(module)[0]]
    assert upward == [], "imports of a higher layer:\n" + "\n".join(upward)
    # The layers are what the graph says: the stages build on each other in this order.
    assert "streamsynth.captions.store" in graph["streamsynth.stream.dataset"]
    assert "streamsynth.prompts.templates" in graph["streamsynth.stream.sampling"]
    assert "streamsynth.synth.sampler" in graph["streamsynth.stream.groups"]


def test_the_whole_package_has_no_import_cycle():
    assert cycles(whole_graph()) == []


def test_kernels_import_nothing_of_streamsynth():
    outside = [f"{module} imports {name}" for module, path in module_files("kernels").items()
               for name in sorted(imported_names(module, path))
               if name.split(".")[0] == "streamsynth" and not name.startswith("streamsynth.kernels")]
    assert outside == []


def test_everything_imports_the_kernels_by_their_installed_name():
    """`import kernels` would load a second copy of the kernels (their switches apart) from a checkout, and is
    Hugging Face's package in an installed environment."""
    files = {**module_files("streamsynth"), **module_files("kernels"), "train": ROOT / "train.py"}
    files.update({f"tests.{p.stem}": p for p in (ROOT / "tests").rglob("*.py")})
    wrong = [f"{module} imports {name}" for module, path in files.items()
             for name in sorted(imported_names(module, path)) if name.split(".")[0] == "kernels"]
    assert wrong == []


def test_the_layer_check_finds_an_upward_import():
    assert layer("streamsynth.captions.store")[0] < layer("streamsynth.prompts.templates")[0]
    assert layer("streamsynth.kernels.patch")[0] == 0 < layer("streamsynth.captions.captioners")[0]
    assert layer("streamsynth.stream.loader")[0] < layer("streamsynth.digits.embedded")[0] < layer("train")[0]
    assert layer("streamsynth.safeio")[0] == 0
    assert layer("streamsynth.commands.args")[0] == layer("streamsynth.train")[0]  # argparse only at the top
    assert layer("streamsynth.somewhere_new")[0] == -1
