"""Training end to end on the tiny dataset: the files a run writes, learning, exact resume, the schedules."""
import argparse
import json
import os

import numpy as np
import pytest
import torch

import augment
import gradcam
import loop
import resnet
import runfiles
import train

from helpers import CLASSES, error_lines, fp16_args, run_main, save_test_images, tiny_args


def test_training_writes_log_and_checkpoints(trained_run):
    log = json.loads((trained_run / "log.json").read_text())
    assert log["format"] == runfiles.LOG_FORMAT and log["classes"] == CLASSES
    assert log["args"]["epochs"] == 2 and log["environment"]["device"] == "cpu"
    assert [r["epoch"] for r in log["epochs"]] == [1, 2]
    for record in log["epochs"]:
        assert {"epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "test_acc_tta",
                "seconds", "images_per_s"} <= set(record)
        assert 0 <= record["test_acc"] <= 1 and record["images_per_s"] > 0
    summary = log["summary"]
    assert summary["final_test_acc"] == log["epochs"][-1]["test_acc"]
    assert summary["best_test_acc"] == max(r["test_acc"] for r in log["epochs"])
    assert set(log["per_class_accuracy"]) == set(CLASSES)
    confusion = np.array(log["confusion_matrix"])
    assert confusion.shape == (10, 10) and confusion.sum() == 40
    assert np.trace(confusion) / 40 == pytest.approx(summary["final_test_acc"])

    for name in ("last.pt", "best.pt"):
        checkpoint = torch.load(trained_run / name, weights_only=True)
        assert checkpoint["format"] == resnet.CHECKPOINT_FORMAT
        assert {"model", "model_args", "classes", "mean", "std", "optimizer", "scheduler", "scaler", "rng",
                "epoch", "args", "history"} <= set(checkpoint)
        assert checkpoint["classes"] == CLASSES and tuple(checkpoint["mean"]) == augment.CIFAR10_MEAN
        assert not any(k.startswith(("_orig_mod.", "module.")) for k in checkpoint["model"])
        model = resnet.model_from_checkpoint(checkpoint)
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert torch.load(trained_run / "last.pt", weights_only=True)["epoch"] == 2
    assert not [n for n in os.listdir(trained_run) if ".tmp-" in n]


@pytest.mark.slow
def test_training_learns_a_learnable_task(data_dir, tmp_path, capsys):
    argv = tiny_args(data_dir, tmp_path, "--epochs", "4", "--train-subset", "200", "--batch-size", "20")
    assert train.main(argv) == 0
    out, err = capsys.readouterr()
    # Not a terminal: one line per epoch and no progress bars.
    assert [line.split()[1] for line in out.splitlines() if line.startswith("epoch")] == ["1/4", "2/4", "3/4", "4/4"]
    assert "%|" not in err and "step/s" not in err
    log = json.loads((tmp_path / "log.json").read_text())
    assert log["epochs"][-1]["test_acc"] >= 0.5, log["epochs"]  # chance is 0.1
    assert log["epochs"][-1]["train_loss"] < log["epochs"][0]["train_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["auto", "fp16"])  # fp16: the grad scaler's state travels too
def test_resume_continues_and_matches_an_uninterrupted_run(request, tmp_path, monkeypatch, capsys, precision):
    data_dir = request.getfixturevalue("fp16_data_dir" if precision == "fp16" else "data_dir")
    args = fp16_args if precision == "fp16" else tiny_args
    argv = ["--epochs", "3", "--deterministic"]
    straight = tmp_path / "straight"
    assert train.main(args(data_dir, straight, *argv)) == 0

    # Interrupt the second run as Ctrl-C would, right after epoch 2 is saved.
    interrupted = tmp_path / "interrupted"
    save = train.Run.save

    def save_then_interrupt(self, record, confusion):
        save(self, record, confusion)
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train.Run, "save", save_then_interrupt)
    code, err = run_main(train, args(data_dir, interrupted, *argv), capsys)
    assert code == 130 and "--resume" in err
    assert torch.load(interrupted / "last.pt", weights_only=True)["epoch"] == 2
    monkeypatch.undo()

    code, err = run_main(train, ["--resume", str(interrupted / "last.pt"), "--device", "cpu", "--workers", "0",
                                 "--data-dir", data_dir, "--epochs", "9", "--precision", precision], capsys)
    assert code == 0 and "ignoring --epochs 9: --resume continues the recipe" in err
    resumed_log = json.loads((interrupted / "log.json").read_text())
    straight_log = json.loads((straight / "log.json").read_text())
    assert [r["epoch"] for r in resumed_log["epochs"]] == [1, 2, 3]
    for a, b in zip(resumed_log["epochs"], straight_log["epochs"]):
        for key in ("lr", "train_loss", "train_acc", "test_loss", "test_acc"):
            assert a[key] == b[key], (key, a, b)
    resumed = torch.load(interrupted / "last.pt", weights_only=True)
    uninterrupted = torch.load(straight / "last.pt", weights_only=True)
    assert all(torch.equal(resumed["model"][k], uninterrupted["model"][k]) for k in resumed["model"])
    # fp16: scale and count of good steps since the last overflow (a fresh scaler would count from 0)
    assert resumed["scaler"] == uninterrupted["scaler"]


@pytest.mark.slow
def test_compiled_run_saves_plain_checkpoints_and_resumes(data_dir, tmp_path, monkeypatch, capsys):
    from torch._dynamo.utils import counters
    save = train.Run.save

    def save_then_interrupt(self, record, confusion):
        save(self, record, confusion)
        raise KeyboardInterrupt

    monkeypatch.setattr(train.Run, "save", save_then_interrupt)
    torch._dynamo.reset()
    counters.clear()
    # 40 test images at batch 32: a ragged last batch of 8, which would be a third graph.
    assert run_main(train, tiny_args(data_dir, tmp_path, "--compile"), capsys)[0] == 130
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # training and evaluation
    monkeypatch.undo()
    torch._dynamo.reset()
    counters.clear()
    assert train.main(["--resume", str(tmp_path / "last.pt"), "--device", "cpu", "--workers", "0",
                       "--data-dir", data_dir, "--compile"]) == 0
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["args"]["compile"]
    assert list(checkpoint["model"]) == list(resnet.resnet18().state_dict())  # no '_orig_mod.' prefixes
    assert [r["epoch"] for r in json.loads((tmp_path / "log.json").read_text())["epochs"]] == [1, 2]


def test_plateau_schedule_watches_validation_not_test(data_dir, tmp_path):
    argv = tiny_args(data_dir, tmp_path, "--schedule", "plateau", "--lr", "0.01", "--batch-size", "16",
                     "--weight-decay", "0", "--label-smoothing", "0", "--val-split", "16")
    assert train.main(argv) == 0
    log = json.loads((tmp_path / "log.json").read_text())
    assert all("val_acc" in r for r in log["epochs"]) and log["summary"]["best_checkpoint_metric"] == "val_acc"
    assert log["epochs"][0]["lr"] == 0.01


def test_log_records_the_peak_lr_and_an_older_checkpoint_is_refused(data_dir, tmp_path, capsys):
    assert train.main(tiny_args(data_dir, tmp_path, "--epochs", "1")) == 0
    log = json.loads((tmp_path / "log.json").read_text())
    assert log["args"]["lr"] == pytest.approx(0.2 * 32 / 500)  # a number, not "default"
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    checkpoint["format"] = "resnet18-cifar-checkpoint/1"  # an earlier version's: no migration, one line
    torch.save(checkpoint, tmp_path / "old.pt")
    capsys.readouterr()
    code, err = run_main(train, ["--resume", str(tmp_path / "old.pt"), "--device", "cpu", "--workers", "0"], capsys)
    assert code == 2 and "saved by another version of train.py" in err and len(error_lines(err)) == 1, err
    image = save_test_images(tmp_path)[0]  # gradcam.py reads format 1 still: the same model, classes, mean, std
    assert gradcam.main(["--image", image, "--layer", "layer4", "--checkpoint", str(tmp_path / "old.pt"),
                         "--device", "cpu", "--out", str(tmp_path / "old_gradcam.png")]) == 0


def test_a_recipe_in_one_word_and_flags_beside_it(trained_run):
    seed = vars(train.parse_args(["--recipe", "seed", "--lr", "0.02"]))
    expected = dict(loop.RECIPES["seed"], lr=0.02, precision="fp32", channels_last=False, recipe="seed")
    assert {key: seed[key] for key in expected} == expected
    assert (seed["schedule"], seed["val_split"], seed["batch_size"], seed["cutout"]) == ("plateau", 5000, 64, 0)
    airbench = train.parse_args(["--recipe", "airbench"])  # train_resnet18_94.py's hyperparameters
    assert (airbench.batch_size, airbench.lr, airbench.momentum, airbench.nesterov, airbench.weight_decay,
            airbench.label_smoothing, airbench.schedule, airbench.warmup, airbench.pad_crop, airbench.flip,
            airbench.cutout) == (500, 0.2, 0.9, True, 5e-4, 0.0, "linear", 0.2, 4, True, 12)
    default = vars(train.parse_args([]))
    # The default: airbench's settings with a batch that divides among 8 GPUs and PyTorch's cosine shape.
    assert default == dict(vars(airbench), recipe="default", batch_size=512, lr=None, schedule="onecycle")
    assert loop.derived_lr(argparse.Namespace(lr=None, batch_size=512)) == pytest.approx(0.2 * 512 / 500)
    assert json.loads((trained_run / "log.json").read_text())["args"]["recipe"] == "default"


def schedule_lrs(argv, steps):
    """The lr of each step under train.py's parsed command line."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = loop.make_scheduler(optimizer, train.parse_args(argv), steps_per_epoch=steps // 10)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return np.array(lrs)


def test_linear_schedule_is_airbenchs_triangle():
    argv = ["--epochs", "10", "--batch-size", "500", "--lr", "0.2", "--warmup", "0.2"]
    linear = schedule_lrs(argv + ["--schedule", "linear"], steps=800)
    # airbench's ResNet-18 baseline: np.interp over the steps, from 0.2x the peak at step 0 up to the peak at
    # 20% of the steps, then down to 0. OneCycleLR peaks one step earlier: within 1/160 of the peak.
    triangle = 0.2 * np.interp(np.arange(800), [0, 160, 800], [0.2, 1, 0])
    assert np.abs(linear - triangle).max() <= 0.2 / 160 + 1e-9
    assert linear[0] == pytest.approx(0.04) and linear.max() == pytest.approx(0.2) and linear[-1] < 1e-5
    cosine = schedule_lrs(argv + ["--schedule", "onecycle"], steps=800)
    assert cosine[0] == pytest.approx(0.2 / 25) and cosine.max() == pytest.approx(0.2)
    assert np.abs(cosine - triangle).max() > 0.01  # a different shape, not a renamed one


def test_a_warmup_of_one_step_or_less_starts_at_the_peak(capsys):
    # 5 steps at --warmup 0.2 is a warm-up of exactly one step: OneCycleLR divided by zero there.
    for shape in ("onecycle", "linear"):
        for epochs in ("5", "2"):  # one step, and less than one
            args = train.parse_args(["--epochs", epochs, "--lr", "0.2", "--warmup", "0.2", "--schedule", shape])
            optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
            loop.make_scheduler(optimizer, args, steps_per_epoch=1)
            assert optimizer.param_groups[0]["lr"] == pytest.approx(0.2, rel=0.01), (shape, epochs)
            assert "is one step or less: the run starts at the peak lr" in capsys.readouterr().err
    args = train.parse_args(["--epochs", "1", "--warmup", "0.2"])
    loop.make_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), args, steps_per_epoch=1)
    assert "the run's one step is its schedule's last, at nearly 0" in capsys.readouterr().err
    args = train.parse_args(["--epochs", "5", "--warmup", "0.2"])
    loop.make_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), args, steps_per_epoch=2)
    assert capsys.readouterr().err == ""  # two steps of warm-up: climbs as asked, nothing to say
