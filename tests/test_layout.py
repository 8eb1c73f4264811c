"""The project's layout, read from its import statements with `ast`: thin commands at the root over
one library.

- Commands: pspnet.py, evaluate.py, train.py, export.py, weight_converter.py (and demo.py when
  there is one). The library: the package pspnet_keras/ and the other modules at the root
  (layers_builder.py, utils.py).
- No import circle among the project's modules; imports inside functions count as much as those at
  the top of a module.
- The library imports no command, and no command imports another.
- bench/ and tests/ import a command only to test or time that command: tests/test_<command>.py
  its own, and the few others listed in EXTRA_COMMAND_USES with the reason.
"""

import ast
import graphlib
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
COMMANDS = frozenset({"pspnet", "evaluate", "train", "export", "weight_converter", "demo"})
PACKAGE = "pspnet_keras"
# Users of commands outside tests/test_<command>.py, each testing or timing that command.
EXTRA_COMMAND_USES = {
    "tests/helpers.py": {"pspnet"},  # run_main: pspnet.main in the test process, for the tests of pspnet.py
    "tests/test_user_model.py": {"pspnet"},  # user models through pspnet.py
    "tests/test_ray.py": {"pspnet", "evaluate"},  # --ray of both commands
    "tests/test_download.py": {"pspnet"},  # pspnet.py's download of missing weights
    "tests/test_train.py": {"train", "evaluate"},  # the trained weights run in evaluate.py
    "tests/test_export.py": {"export"},
    "bench/benchmark.py": {"pspnet"},  # times the CLI's work per image
    "bench/cpu_threads.py": {"pspnet"},  # times the CLI's work per image
    "bench/startup.py": {"pspnet"},  # times `import pspnet`, the command's first stage
    "bench/export_bench.py": {"export"},
}


def module_files(root):
    """{module name: path} of the project's modules under `root`: the root's .py files, the package's
    (dotted names; a package's __init__.py is the package), and bench/'s and tests/' files."""
    modules = {path.stem: path for path in sorted(root.glob("*.py"))}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((root / "bench").glob("*.py")):
        modules["bench" if path.stem == "__init__" else f"bench.{path.stem}"] = path
    for path in sorted((root / "tests").glob("*.py")):
        modules[f"tests/{path.stem}"] = path  # imported by pytest under their bare names, never by the project
    return modules


def kind(name):
    """'command', 'library', 'bench' or 'tests' of a module name of module_files."""
    if name in COMMANDS:
        return "command"
    if name == "bench" or name.startswith("bench."):
        return "bench"
    if name.startswith("tests/"):
        return "tests"
    return "library"


def imported_modules(path, name, modules):
    """The project modules (keys of `modules`) that the import statements of `path`, module `name`,
    import, at any depth of the file. `import a.b` imports a.b; `from a import b` the submodule a.b
    when there is one, else a; relative imports are resolved against the module's package. (A
    package's __init__ runs first in either case; that is not counted as an import of it.)"""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()

    def add(dotted):
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        if dotted:
            found.add(dotted)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source)
    found.discard(name)
    return found


def import_graph(root):
    """({module: set of the project modules it imports}, {module: path})."""
    modules = module_files(root)
    return {name: imported_modules(path, name, modules) for name, path in modules.items()}, modules


def circle(graph):
    """An import circle of `graph`, as its modules with the first repeated at the end, or None
    (graphlib's CycleError)."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as error:
        return error.args[1]
    return None


def allowed_commands(relative_path):
    """The commands a bench/ or tests/ file may import: its own command (tests/test_<command>.py and
    tests/test_hostile_<command>.py) and EXTRA_COMMAND_USES's."""
    allowed = set(EXTRA_COMMAND_USES.get(relative_path, ()))
    tested = Path(relative_path).stem.removeprefix("test_").removeprefix("hostile_")
    if relative_path.startswith("tests/test_") and tested in COMMANDS:
        allowed.add(tested)
    return allowed


def layout_problems(root):
    """Every breach of the layout under `root`, one line each (empty when none)."""
    graph, modules = import_graph(root)
    problems = []
    project = {name: targets for name, targets in graph.items() if kind(name) in ("command", "library")}
    found = circle(project)
    if found:
        problems.append(f"import circle: {' -> '.join(found)}")
    for name, targets in sorted(graph.items()):
        relative = modules[name].relative_to(root).as_posix()
        for target in sorted(targets):
            if kind(target) != "command":
                continue
            if kind(name) == "library":
                problems.append(f"library module {relative} imports the command {target}")
            elif kind(name) == "command":
                problems.append(f"command {relative} imports the command {target}")
            elif target not in allowed_commands(relative):
                problems.append(f"{relative} imports the command {target}, which it does not test")
    return problems


def test_commands_and_library_keep_their_layout():
    assert layout_problems(PROJECT_ROOT) == []


def test_the_layout_has_its_commands_and_library():
    graph, modules = import_graph(PROJECT_ROOT)
    assert {"pspnet", "evaluate", "train", "export", "weight_converter"} <= set(modules)
    assert {"layers_builder", "utils", "pspnet_keras.cli", "pspnet_keras.models"} <= set(modules)
    # The reading of imports sees what the commands use, at the top and inside functions.
    assert "pspnet_keras.cli" in graph["pspnet"]
    assert "utils" in graph["layers_builder"] or "pspnet_keras.models" in graph["layers_builder"]


def circle_members(problems):
    """The modules of the import circle that `problems` reports."""
    (line,) = [line for line in problems if line.startswith("import circle: ")]
    members = line.removeprefix("import circle: ").split(" -> ")
    assert members[0] == members[-1]
    return set(members)


def write_tree(root, files):
    """Writes {relative path: source} under `root`."""
    for relative, source in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)


def test_checker_reports_circles_and_imports_of_commands(tmp_path):
    write_tree(tmp_path, {
        "pspnet.py": "from pspnet_keras import a\n",
        "evaluate.py": "import argparse\n\ndef main():\n    import pspnet\n",
        "utils.py": "import os\n",
        "layers_builder.py": "import utils\n",
        "pspnet_keras/a.py": "from pspnet_keras.b import thing\n",
        "pspnet_keras/b.py": "thing = 1\n\ndef later():\n    from pspnet_keras import a\n",
        "pspnet_keras/c.py": "from . import a\n\ndef run():\n    import export\n",
        "export.py": "",
        "pspnet_keras/sub/__init__.py": "from .inner import x\n",
        "pspnet_keras/sub/inner.py": "from .. import c\nx = 1\n",
        "train.py": "from pspnet_keras.sub import x\n",
        "bench/__init__.py": "",
        "bench/timing.py": "import evaluate\n",
        "bench/benchmark.py": "import pspnet\n",
        "tests/test_evaluate.py": "import evaluate\n",
        "tests/test_other.py": "from weight_converter import main\n",
        "weight_converter.py": "",
    })
    problems = layout_problems(tmp_path)
    assert circle_members(problems) == {"pspnet_keras.a", "pspnet_keras.b"}
    assert "library module pspnet_keras/c.py imports the command export" in problems
    assert "command evaluate.py imports the command pspnet" in problems
    assert "bench/timing.py imports the command evaluate, which it does not test" in problems
    assert "tests/test_other.py imports the command weight_converter, which it does not test" in problems
    # train -> pspnet_keras.sub -> .inner -> pspnet_keras.c -> .a is a chain, not a circle.
    assert "pspnet_keras.sub.inner" in import_graph(tmp_path)[0]["pspnet_keras.sub"]
    assert import_graph(tmp_path)[0]["pspnet_keras.sub.inner"] == {"pspnet_keras.c"}
    assert len(problems) == 5, problems


def test_checker_follows_relative_imports_into_a_circle(tmp_path):
    write_tree(tmp_path, {
        "pspnet_keras/sub/__init__.py": "from .inner import x\n",
        "pspnet_keras/sub/inner.py": "from . import other\nx = 1\n",
        "pspnet_keras/sub/other.py": "def f():\n    from pspnet_keras.sub import inner\n",
    })
    problems = layout_problems(tmp_path)
    assert len(problems) == 1 and circle_members(problems) == {"pspnet_keras.sub.inner", "pspnet_keras.sub.other"}


def test_checker_passes_a_clean_tree(tmp_path):
    write_tree(tmp_path, {
        "pspnet.py": "import utils\nfrom pspnet_keras import models\n",
        "utils.py": "",
        "pspnet_keras/models.py": "import utils\n",
        "tests/test_pspnet.py": "import pspnet\n",
        "bench/benchmark.py": "import pspnet\n",
    })
    assert layout_problems(tmp_path) == []
