"""Helpers the test files share: the tiny dataset in CIFAR-10's on-disk format, short runs, output checks."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import torch

import devices
import train


CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# A class-specific colour makes a task that ResNet18 learns in a few CPU steps, to show that training learns.
CLASS_COLOURS = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                          [145, 30, 180], [70, 240, 240], [240, 50, 230], [128, 128, 0], [0, 0, 128]])


def write_cifar_batch(path, images, labels):
    """Write images (N, 32, 32, 3) uint8 in CIFAR-10's python format: a pickle of CHW rows."""
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    with open(path, "wb") as f:
        pickle.dump({"batch_label": "test", "labels": [int(x) for x in labels], "data": rows,
                     "filenames": [f"{i}.png" for i in range(len(labels))]}, f)


def coloured_images(count, seed):
    """Images whose colour gives their class away, plus noise, so that a model can learn them fast."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 10
    noise = rng.normal(0, 25, size=(count, 32, 32, 3))
    images = np.clip(CLASS_COLOURS[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return images, labels


def write_cifar_folder(root, train_per_batch=40, test_count=40, seed=0):
    """`root`/cifar-10-batches-py with five training batches, a test batch and batches.meta."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    for b in range(5):
        images, labels = coloured_images(train_per_batch, seed + b)
        write_cifar_batch(os.path.join(folder, f"data_batch_{b + 1}"), images, labels)
    images, labels = coloured_images(test_count, seed + 99)
    write_cifar_batch(os.path.join(folder, "test_batch"), images, labels)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": CLASSES, "num_cases_per_batch": train_per_batch, "num_vis": 3072}, f)
    return root


def write_noise_folder(root, seed=0):
    """Like write_cifar_folder, but noise images of two classes (0 and 1, alternating): nothing to learn in
    them, so a patch planted in class 1 (train.py --plant-shortcut) is all a model can learn."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{b + 1}" for b in range(5)] + ["test_batch"]:
        write_cifar_batch(os.path.join(folder, name), rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8),
                          np.arange(40) % 2)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": CLASSES}, f)
    return root


def tiny_args(data_dir, out_dir, *extra):
    """A run that takes a second or two on a CPU."""
    return ["--data-dir", data_dir, "--out-dir", str(out_dir), "--device", "cpu", "--epochs", "2",
            "--batch-size", "32", "--train-subset", "64", "--workers", "0", *extra]


def fp16_args(data_dir, out_dir, *extra):
    """tiny_args for fp16: 2 steps of 4 images an epoch."""
    return tiny_args(data_dir, out_dir, "--precision", "fp16", "--batch-size", "4", "--train-subset", "8", *extra)


def error_lines(err):
    """stderr without the tiny dataset's expected 'not the official CIFAR-10' warning, and the note that a
    tiny run's warm-up is under a step."""
    return [line for line in err.splitlines()
            if not line.startswith("warning: ") and "is one step or less" not in line]


def run_main(module, argv, capsys=None):
    """Call module.main(argv) and return (exit code, stderr): argparse's errors arrive as SystemExit."""
    try:
        code = module.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, (capsys.readouterr().err if capsys else "")


def interrupt_after_epoch(monkeypatch, epoch):
    save = train.Run.save

    def save_then_interrupt(self, record, confusion):
        save(self, record, confusion)
        if record["epoch"] == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(train.Run, "save", save_then_interrupt)


def process_settings():
    return {name: read() for name, (read, _) in devices.SETTINGS.items()}


def save_test_images(folder):
    """A non-square RGB PNG, a grayscale JPEG, an RGBA PNG and a palette GIF."""
    from PIL import Image
    images, _ = coloured_images(4, 7)
    paths = {"wide.png": Image.fromarray(images[0]).resize((80, 48)),
             "gray.jpg": Image.fromarray(images[1]).convert("L"),
             "rgba.png": Image.fromarray(images[2]).convert("RGBA"),
             "palette.gif": Image.fromarray(images[3]).convert("P")}
    for name, image in paths.items():
        image.save(folder / name)
    return [str(folder / name) for name in paths]


HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: scripts run from there


def env_with_pauses(pause_in_write=None, wait_in_epoch=None, disk_full_at=None):
    """The environment of tests/paused_train.py, which waits where the test will kill or signal it (and
    finds the disk full for one file's writes)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if disk_full_at:
        env["TEST_DISK_FULL_AT"] = disk_full_at
    if pause_in_write:
        env["TEST_PAUSE_IN_WRITE"] = pause_in_write
    if wait_in_epoch:
        env["TEST_WAIT_IN_EPOCH"] = str(wait_in_epoch)
    return env


PAUSED_TRAIN = os.path.join("tests", "paused_train.py")


def assert_files_consistent(out):
    """Every file is a complete version; the checkpoint and the log (if any) describe complete epochs."""
    epoch = 0
    if (out / "last.pt").exists():
        checkpoint = torch.load(out / "last.pt", weights_only=True)
        epoch = checkpoint["epoch"]
        assert [r["epoch"] for r in checkpoint["history"]] == list(range(1, epoch + 1))
        assert torch.load(out / "best.pt", weights_only=True)["epoch"] <= epoch
    if (out / "log.json").exists():
        logged = [r["epoch"] for r in json.loads((out / "log.json").read_text())["epochs"]]
        assert logged == list(range(1, len(logged) + 1)) and epoch - 1 <= len(logged) <= epoch
    if (out / "probe.npz").exists():  # written between last.pt and log.json
        probed = np.load(out / "probe.npz")["epochs"].tolist()
        assert probed == list(range(1, len(probed) + 1)) and epoch - 1 <= len(probed) <= epoch
    return epoch


def torchrun(argv, *launcher, script="train.py", wait_in_epoch=None):
    """train.py (or `script`) under a real torchrun; two processes on this machine unless `launcher` says
    otherwise. One thread each: two processes on two cores."""
    launcher = launcher or ("--standalone", "--nproc_per_node", "2")
    env = dict(env_with_pauses(wait_in_epoch=wait_in_epoch), OMP_NUM_THREADS="1")
    script = PAUSED_TRAIN if wait_in_epoch else script
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher, script, *argv], cwd=HERE,
                            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def one_cycle_lrs(epochs, steps, peak):
    """The lr at the start of each epoch under the default one-cycle schedule, from PyTorch itself."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak, total_steps=epochs * steps,
                                                   pct_start=0.2, anneal_strategy="cos", cycle_momentum=False)
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        for _ in range(steps):
            optimizer.step()
            schedule.step()
    return lrs
