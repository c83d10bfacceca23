"""Command-line plumbing that train.py, gradcam.py and plot_curves.py share. Standard library only:
plot_curves.py must start fast, without torch.

    parser = cli.Parser(description="...")       # argparse; a bad flag is one line and a hint to --help
    return cli.run_quietly_into_a_closed_pipe(work)   # `script | head -1` ends quietly

Nothing happens on import.
"""
import argparse
import os
import sys


class Parser(argparse.ArgumentParser):
    """argparse, except that a bad command line gets one line, not the whole usage block first."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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
