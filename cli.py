"""What the scripts share at their edges: one-line usage errors, pictures written atomically (and the
heatmap overlay they draw), quiet ends into closed pipes. Standard library only on import (numpy and
matplotlib are imported when a picture is drawn): plot_curves.py must start fast, without torch. Nothing
happens on import.
"""
import argparse
import io
import os
import sys

import files


class UsageError(Exception):
    """Bad input: one line on stderr and exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line raises UsageError(one line) instead of printing the usage block and
    exiting: under torchrun a process must not leave alone while its peers wait for it (train.py reads its
    command line once the processes have connected, and every process stops with the line)."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def class_index(text, classes, flag="--class"):
    """A class name or index (as typed) -> its index; anything else is one line that lists the names."""
    if text in classes:
        return classes.index(text)
    if text.isdecimal() and int(text) < len(classes):
        return int(text)
    raise UsageError(f"{flag}: unknown class {text!r}; use an index 0-{len(classes) - 1} or one of: "
                     f"{', '.join(classes)}")


def picture_format(path):
    """The picture format that the file name's extension names, as matplotlib writes it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    supported = FigureCanvasAgg.get_supported_filetypes()
    extension = os.path.splitext(path)[1].lower().lstrip(".")
    if extension not in supported:
        raise UsageError(f"--out {path}: name a picture format by its extension: "
                         f"{', '.join('.' + e for e in sorted(supported))}")
    return extension


def check_output(flag, path):
    """A file to write, checked before any work: in an existing folder, and not a folder itself."""
    reason = "it is a folder" if os.path.isdir(path) else (
        None if os.path.isdir(os.path.dirname(os.path.abspath(path))) else "its folder does not exist")
    if reason:
        raise UsageError(f"cannot write {flag} {path}: {reason}; name a file in an existing folder")


def new_figure(figsize):
    """A figure outside pyplot: pyplot would keep every figure until closed (main() in a notebook piled
    them up), and choosing its backend here would change a notebook's."""
    from matplotlib.figure import Figure
    return Figure(figsize=figsize)


def write_file(path, data, write=files.atomic_write):
    """Atomically (files.atomic_write, or files.write_json for a value): a reader sees the old file or the
    whole new one, never a part."""
    try:
        write(path, data)
    except OSError as error:
        raise UsageError(f"cannot write {path} ({error.strerror})") from None


def overlay(image, heatmap, alpha=0.5):
    """Blend a [0, 1] heatmap, coloured with the jet colormap, over a uint8 RGB image."""
    import numpy as np
    from matplotlib import colormaps
    colour = colormaps["jet"](np.clip(heatmap, 0, 1))[..., :3]
    return np.clip((1 - alpha) * image / 255.0 + alpha * colour, 0, 1)


def save_figure(figure, path):
    buffer = io.BytesIO()
    figure.savefig(buffer, format=picture_format(path), dpi=100)
    write_file(path, buffer.getvalue())


def say(*lines):
    """print() the lines; if the reader of stdout went away (`| head -1`), the work goes on, its files
    intact, and stdout goes nowhere (Python would report the broken pipe again at exit)."""
    try:
        print(*lines, sep="\n", flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def note(message):
    print(f"note: {message}", file=sys.stderr)


def warn(message):
    print(f"warning: {message}", file=sys.stderr)
