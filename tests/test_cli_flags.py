"""The flags shared by the training scripts and the tools are defined once (cli_flags.py) and parse alike."""

import argparse
import ast
from pathlib import Path

import pytest

import cli_flags
import evaluate
import options
import predict
import visual
from helpers import UserError

REPO = Path(__file__).resolve().parents[1]
SHARED = ("--device", "--amp", "--data_root", "--window", "--flip", "--batch_size", "--num_workers")
REQUIRED = {
    "evaluate": ["--checkpoint", "c.pth"],
    "predict": ["--checkpoint", "c.pth", "--input", "a.png", "--output", "out"],
}
# the shared flags each command takes; --window and --flip are inference-only
TAKES = {
    **{f"train_{mode}": set(SHARED) - {"--window", "--flip"} for mode in options.MODES},
    "evaluate": set(SHARED),
    "predict": set(SHARED),
    "visual": {"--device", "--data_root"},
}
VALUES = {
    "--device": (["cpu"], "cpu"),
    "--amp": (["bf16"], "bf16"),
    "--data_root": (["X"], "X"),
    "--window": (["5", "7"], [5, 7]),
    "--flip": ([], True),
    "--batch_size": (["3"], 3),
    "--num_workers": (["2"], 2),
}


def _parsers() -> dict[str, argparse.ArgumentParser]:
    parsers = {f"train_{mode}": options.get_args_parser(mode) for mode in options.MODES}
    return {
        **parsers,
        "evaluate": evaluate.get_args_parser(),
        "predict": predict.get_args_parser(),
        "visual": visual.get_args_parser(),
    }


def _shared_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {
        a.option_strings[0]: a for a in parser._actions if a.option_strings and a.option_strings[0] in SHARED
    }


@pytest.mark.parametrize("command", sorted(TAKES))
def test_each_command_parses_its_shared_flags(command):
    parser = _parsers()[command]
    assert set(_shared_actions(parser)) == TAKES[command]
    argv = [
        *REQUIRED.get(command, []),
        *(part for flag in sorted(TAKES[command]) for part in (flag, *VALUES[flag][0])),
    ]
    args = vars(parser.parse_args(argv))
    assert {flag: args[flag[2:]] for flag in TAKES[command]} == {
        flag: VALUES[flag][1] for flag in TAKES[command]
    }
    if "--amp" in TAKES[command]:
        with pytest.raises(SystemExit):
            parser.parse_args([*REQUIRED.get(command, []), "--amp", "fp8"])


def test_a_shared_flag_has_one_type_and_choices_everywhere():
    """Defaults and help may differ per command (passed in); what a value may be does not."""
    seen: dict[str, set] = {}
    for parser in _parsers().values():
        for flag, action in _shared_actions(parser).items():
            seen.setdefault(flag, set()).add(
                (type(action), action.type, action.nargs, action.metavar, tuple(action.choices or ()))
            )
    assert set(seen) == set(SHARED)
    assert {flag: len(kinds) for flag, kinds in seen.items()} == dict.fromkeys(SHARED, 1)


def test_the_defaults_each_command_keeps():
    defaults = {
        name: {flag: action.default for flag, action in _shared_actions(parser).items()}
        for name, parser in _parsers().items()
    }
    assert defaults["train_semi"] == {
        "--device": None,
        "--amp": "off",
        "--data_root": None,
        "--batch_size": None,
        "--num_workers": None,
    }
    assert defaults["evaluate"] == {
        "--device": None,
        "--amp": "off",
        "--data_root": None,
        "--window": None,
        "--flip": False,
        "--batch_size": 4,
        "--num_workers": None,
    }
    assert defaults["predict"] == defaults["evaluate"]
    assert defaults["visual"] == {"--device": "cpu", "--data_root": None}


def _flag_definitions(path: Path) -> list[str]:
    """'file:line flag' of each add_argument call in the file that defines a shared flag."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        f"{path.relative_to(REPO)}:{node.lineno} {node.args[0].value}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "add_argument"
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and node.args[0].value in SHARED
    ]


def test_the_shared_flags_are_defined_in_cli_flags_only():
    # bench/ scripts compare several --amp modes in one run: their flags are their own
    skipped = ("tests", "bench", "site-packages")
    sources = [
        p
        for p in REPO.rglob("*.py")
        if not any(part.startswith(".") or part in skipped for part in p.relative_to(REPO).parts)
    ]
    found = [hit for path in sorted(sources) for hit in _flag_definitions(path)]
    assert sorted(hit.split()[1] for hit in found) == sorted(SHARED)  # once each, and the test sees them
    assert [hit for hit in found if not hit.startswith("cli_flags.py:")] == []


@pytest.mark.parametrize(
    "batch_size, num_workers, flag",
    [(0, 0, "--batch_size"), (-1, None, "--batch_size"), (2, -1, "--num_workers")],
)
def test_loader_flag_checks_name_the_flag(batch_size, num_workers, flag):
    with pytest.raises(UserError, match=f"^{flag} must be"):
        cli_flags.check_loader_flags(batch_size, num_workers)
    cli_flags.check_loader_flags(1, None)
