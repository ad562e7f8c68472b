"""The layout's rules (docs/layout.md): dependencies one way, no circles, no hidden imports; one module names
a run's files; user errors vs bugs; one random stream per consumer."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import build_data
import helpers
from distributed import seed_all

REPO = Path(__file__).resolve().parents[1]
MODULES = {
    p.stem if p.parent == REPO else f"network.{p.stem}".removesuffix(".__init__"): p
    for p in [*REPO.glob("*.py"), *(REPO / "network").glob("*.py")]
}


def _project_imports(path: Path) -> tuple[set[str], list[str]]:
    """(project modules a file imports, imports made inside a function)."""
    tree = ast.parse(path.read_text())
    top = {m.split(".")[0] for m in MODULES}
    found, hidden = set(), []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found |= {n.split(".")[0] for n in names if n.split(".")[0] in top}
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            hidden += [
                f"{path.name}:{n.lineno}"
                for n in ast.walk(fn)
                if isinstance(n, (ast.Import, ast.ImportFrom))
                and any(
                    (a.name if isinstance(n, ast.Import) else n.module or "").split(".")[0] in top
                    for a in n.names
                )
            ]
    return found - {path.stem}, hidden


def test_no_import_circles_and_none_hidden_in_functions():
    graph, hidden = {}, []
    for name, path in MODULES.items():
        deps, inner = _project_imports(path)
        graph[name.split(".")[0]] = graph.get(name.split(".")[0], set()) | (deps - {name.split(".")[0]})
        hidden += inner
    assert hidden == []

    def reaches(start: str, goal: str, seen: set) -> bool:
        return any(
            d == goal or (d not in seen and not seen.add(d) and reaches(d, goal, seen))
            for d in graph.get(start, ())
        )

    assert [m for m in graph if reaches(m, m, set())] == []


FORBIDDEN_IMPORTS = {
    "helpers": {"build_data", "engine", "network", "module_list", "options"},
    "cli_flags": {"build_data", "engine", "network", "module_list", "options", "layouts"},
    "module_list": {"build_data", "dataset_table", "engine", "network", "transforms", "splits"},
    "network": {"build_data", "dataset_table", "engine", "module_list", "transforms", "splits"},
    "preparation": {"engine", "network", "options", "distributed"},
    "visual": {"engine", "options"},
    "evaluate": {"engine", "options"},
    "study": {"engine", "options", "network"},
    "study_report": {"engine", "options", "network", "study"},
    "run_folder": {"engine", "options", "network", "figures"},
    "build_data": {"engine", "network", "splits", "preparation", "layouts"},
    "dataset_table": {"build_data", "engine", "network", "module_list", "transforms", "splits", "layouts"},
    "layouts": {"engine", "network", "splits", "preparation", "options"},
    "dataset_card": {"build_data", "engine", "network", "module_list", "options"},
}
# One fresh interpreter loads the heavy third-party libraries (never forbidden: the rules are between the
# project's modules) and forks a child per module, which imports it and reports what else of the project came
# with it: each child starts from the same clean state without paying torch's import again.
_IMPORT_PROBE = """
import json, os, sys
import matplotlib.pyplot, numpy, PIL.Image, torch, torchvision, tqdm
found = {}
for module in json.loads(sys.argv[1]):
    read, write = os.pipe()
    if os.fork() == 0:
        os.close(read)
        __import__(module)
        os.write(write, json.dumps(sorted({m.split(".")[0] for m in sys.modules})).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        found[module] = json.loads(pipe.read() or "null")
    os.wait()
print(json.dumps(found))
"""


@pytest.fixture(scope="module")
def imported_by_module() -> tuple[dict[str, list[str] | None], str]:
    """({module: the top-level names in sys.modules after importing it alone (None: its import failed)},
    the probe's stderr, where a failed import's traceback is)."""
    probe = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE, json.dumps(sorted(FORBIDDEN_IMPORTS))],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(probe.stdout), probe.stderr


@pytest.mark.parametrize("module", sorted(FORBIDDEN_IMPORTS))
def test_importing_a_module_does_not_import_what_it_must_not(module, imported_by_module):
    imported = imported_by_module[0][module]
    assert imported is not None, f"importing {module} failed:\n{imported_by_module[1]}"
    assert module in imported  # the probe saw the import
    brought = sorted(FORBIDDEN_IMPORTS[module] & set(imported))
    assert brought == [], f"importing {module} imports {brought}"


# The files of a run (run_folder.py's docstring): no other module spells their names.
RUN_FILES = (
    "config.json",
    "summary.json",
    "last.pth",
    "metrics.csv",
    ".npy",
    "curves.png",
    "visual.png",
    "tensorboard",
)
SPLIT_FOLDER = re.compile(r"(?<![\w.-])split/|/split(?![\w.-])")  # the split/ folder, not the word or a flag


def _run_file_names(path: Path) -> list[str]:
    """'file:line: text' of each string in the file's code (not its docstrings) that names a run's file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    documented = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
    }
    paths = {
        id(side)
        for node in ast.walk(tree)
        if isinstance(node, ast.BinOp)  # `folder / "split"`
        and isinstance(node.op, ast.Div)
        for side in (node.left, node.right)
    }
    return [
        f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in documented
        and (
            any(name in node.value for name in RUN_FILES)
            or SPLIT_FOLDER.search(node.value)
            or (node.value == "split" and id(node) in paths)
        )
    ]


def test_only_the_run_folder_module_names_a_runs_files():
    """The engine writes a run's files and the tools read them through run_folder.py, alone to name them."""
    sources = [
        p
        for p in REPO.rglob("*.py")
        if p.name != "run_folder.py"
        and not any(
            part.startswith(".") or part in ("tests", "site-packages") for part in p.relative_to(REPO).parts
        )
    ]
    assert len(sources) > 20 and REPO / "engine.py" in sources
    assert [hit for path in sorted(sources) for hit in _run_file_names(path)] == []
    assert _run_file_names(REPO / "run_folder.py")  # the test sees the names where they are


def _exit_of(main) -> tuple[int, str]:
    code = f"import helpers\ndef main(argv):\n    {main}\nhelpers.run_cli(main)\n"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    return done.returncode, done.stderr


@pytest.mark.parametrize(
    "raise_line",
    [
        "raise helpers.UserError('--flag 3 is wrong: pass 4')",
        "import build_data; raise build_data.DataError('--flag 3 is wrong: pass 4')",
        "open('/nonexistent-dir/--flag 3 is wrong: pass 4')",
    ],
)
def test_run_cli_turns_user_errors_into_one_line(raise_line):
    code, err = _exit_of(raise_line)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "--flag 3 is wrong" in err


def test_run_cli_keeps_the_traceback_of_a_bug():
    code, err = _exit_of("raise ValueError('a bug in the code')")
    assert code == 1 and "Traceback" in err and "ValueError: a bug in the code" in err


def test_data_errors_are_user_errors():
    assert issubclass(build_data.DataError, helpers.UserError)


def test_stream_seeds_are_distinct_per_stream_and_keys():
    seeds = {
        helpers.stream_seed(s, *k)
        for s in ("init", "steps", "batches")
        for k in [(0,), (0, 0), (0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)]
    }
    assert len(seeds) == 18
    assert helpers.stream_seed("steps", 3, 1) == helpers.stream_seed("steps", 3, 1)


@pytest.mark.parametrize("epoch", [0, 1, 5])
def test_an_epoch_step_stream_does_not_replay_its_labelled_batches(epoch):
    """The global stream seeded for an epoch's steps and that epoch's labelled sampler are independent."""
    sampler = build_data.EpochBatchSampler(num_items=1000, batch_size=4, iters_per_epoch=8, seed=0, rank=0)
    sampler.set_epoch(epoch)
    drawn = torch.tensor([[i for i, _ in batch] for batch in sampler])
    seed_all("steps", 0, epoch, 0)
    assert not torch.equal(torch.randint(1000, (8, 4)), drawn)


def test_model_init_stream_differs_from_the_first_epoch():
    seed_all("init", 0)
    init = torch.rand(16)
    seed_all("steps", 0, 0, 0)
    assert not torch.equal(torch.rand(16), init)


@pytest.mark.parametrize("command", [["format", "--check"], ["check"]])
def test_code_is_ruff_formatted_and_lint_clean(command):
    """The style (ruff.toml: `ruff format` at 110 columns, lint E/F/W/I) holds for every .py file."""
    done = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "--no-cache", "."], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
