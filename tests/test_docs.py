"""The commands that README.md, docs/ and the scripts' docstrings show: each parses with its script's own
parser, so none goes stale."""
import glob
import os
import shlex

import pytest

import benchmark
import gradcam
import plot_curves
import train

from helpers import HERE

PARSERS = {"train.py": train.parse_args, "gradcam.py": lambda argv: gradcam.build_parser().parse_args(argv),
           "plot_curves.py": lambda argv: plot_curves.build_parser().parse_args(argv),
           "benchmark.py": lambda argv: benchmark.build_parser().parse_args(argv)}


def shown_commands():
    """(page, script, its arguments) of every command in the pages' code blocks."""
    pages = [os.path.join(HERE, "README.md"), *sorted(glob.glob(os.path.join(HERE, "docs", "*.md")))]
    for page in pages:
        in_code, pending = False, ""
        for line in open(page).read().splitlines():
            if line.startswith("```"):
                in_code = not in_code
                continue
            if not in_code:
                continue
            line, pending = pending + line, ""
            if line.endswith("\\"):  # continued on the next line
                pending = line[:-1] + " "
                continue
            if not any(name in line for name in PARSERS):  # output shown, Python, other commands
                continue
            words = shlex.split(line, comments=True)
            script = next((i for i, word in enumerate(words) if word in PARSERS), None)
            if script is not None:
                yield os.path.relpath(page, HERE), words[script], words[script + 1:]


def docstring_commands():
    for module in (train, gradcam, plot_curves, benchmark):
        for line in module.__doc__.splitlines():
            words = shlex.split(line, comments=True) if line.strip().startswith(("python ", "torchrun ")) else []
            script = next((i for i, word in enumerate(words) if word in PARSERS), None)
            if script is not None:
                yield f"{module.__name__}.py's docstring", words[script], words[script + 1:]


COMMANDS = [*shown_commands(), *docstring_commands()]


def test_the_pages_show_the_four_commands():
    shown = {(script, " ".join(argv)) for _, script, argv in COMMANDS}
    assert {("train.py", "--epochs 50"), ("gradcam.py", "--image examples/dog.png --layer layer4"),
            ("plot_curves.py", "log.json")} <= shown


@pytest.mark.parametrize("page, script, argv", COMMANDS, ids=[f"{p}: {s} {' '.join(a)}" for p, s, a in COMMANDS])
def test_every_command_shown_parses(page, script, argv):
    PARSERS[script](argv)  # a flag renamed or removed raises UsageError here
