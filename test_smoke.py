"""The smoke test: every script once, end to end, as a user runs it, on a tiny dataset written in
CIFAR-10's on-disk format (CPU only, no download). The other tests are in tests/, one file per job.

    python -m pytest test_smoke.py     # this alone: about a minute on 2 cores
    python -m pytest -m "not slow"     # all but the kill, torchrun and longest training tests
    python -m pytest                   # everything (what CI runs)
"""
import json
import os
import shutil
import subprocess
import sys

import torch
from PIL import Image

from helpers import write_cifar_folder

HERE = os.path.dirname(os.path.abspath(__file__))


def run(script, *argv, cwd=HERE):
    """`python SCRIPT ARGV` in `cwd`; returns its stdout, after checking it succeeded."""
    done = subprocess.run([sys.executable, os.path.join(HERE, script), *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_every_script_once_end_to_end(tmp_path):
    data, out = write_cifar_folder(str(tmp_path / "data")), tmp_path / "run"
    # One DataLoader worker: the process that users' runs have, which the in-process tests mostly skip.
    printed = run("train.py", "--data-dir", data, "--out-dir", str(out), "--device", "cpu", "--epochs", "2",
                  "--batch-size", "32", "--train-subset", "64", "--workers", "1", "--no-download")
    assert "done: final test accuracy" in printed
    log = json.loads((out / "log.json").read_text())
    assert [record["epoch"] for record in log["epochs"]] == [1, 2] and "confusion_matrix" in log
    for name in ("last.pt", "best.pt"):
        assert torch.load(out / name, weights_only=True)["epoch"] >= 1

    # The README's two commands as written, in the folder the run wrote (as a user's current folder),
    # with the repository's sample images beside it.
    shutil.copytree(os.path.join(HERE, "examples"), out / "examples")
    run("gradcam.py", "--image", "examples/dog.png", "--layer", "layer4", cwd=out)
    run("plot_curves.py", "log.json", cwd=out)
    for picture in ("examples/dog_gradcam.png", "log_curves.png", "log_confusion.png"):
        assert Image.open(out / picture).size[0] > 100

    run("benchmark.py", "--device", "cpu", "--batch-size", "8", "--steps", "1", "--workers", "1",
        "--out-dir", str(tmp_path))
    assert json.loads((tmp_path / "benchmark.json").read_text())["full_loop_images_per_s"] > 0
