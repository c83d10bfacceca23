"""Command-line plumbing that train.py, gradcam.py and plot_curves.py share. Standard library only on
import (picture_format imports matplotlib when called): plot_curves.py must start fast, without torch.

    parser = cli.Parser(description="...")       # argparse; a bad flag is one line and a hint to --help
    parser = cli.Parser(raises=UsageError)        # the same line, raised as UsageError(line) instead
    cli.picture_format("a.pdf", UsageError)       # "pdf", as matplotlib writes it; else UsageError(one line)
    return cli.run_quietly_into_a_closed_pipe(work)   # `script | head -1` ends quietly

Nothing happens on import.
"""
import argparse
import os
import sys


class Parser(argparse.ArgumentParser):
    """argparse, except that a bad command line gets one line, not the whole usage block first. With
    `raises` (an exception class) that line is raised rather than printed: under torchrun a process
    must not leave alone, silent, while its peers wait for it (train.py reads its command line once the
    processes have connected, and every process stops with the line)."""

    def __init__(self, *args, raises=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.raises = raises

    def error(self, message):
        text = f"{message} (see {self.prog} --help)"
        if self.raises is not None:
            raise self.raises(text)
        self.exit(2, f"{self.prog}: error: {text}\n")


def picture_format(path, error):
    """The picture format that the file name's extension names, as matplotlib writes it; otherwise
    raise error(a one-line message) (each script's UsageError)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    supported = FigureCanvasAgg.get_supported_filetypes()
    extension = os.path.splitext(path)[1].lower().lstrip(".")
    if extension not in supported:
        raise error(f"--out {path}: name a picture format by its extension: "
                    f"{', '.join('.' + e for e in sorted(supported))}")
    return extension


def run_quietly_into_a_closed_pipe(work):
    """Call work() and return its exit code; if the reader of stdout went away (`| head -1`), end quietly.

    Scripts write their files before they print, so a closed pipe loses nothing.
    """
    try:
        code = work()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # Python would report the broken pipe again when it flushes stdout at exit: point stdout at nothing.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def note(message):
    print(f"note: {message}", file=sys.stderr)
