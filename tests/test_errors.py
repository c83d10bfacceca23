"""Bad input and a new user's first hour: one clear line, exit code 2, nothing created."""
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import augment
import devices
import files
import loop
import plot_curves
import train

from helpers import (HERE, error_lines, fp16_args, interrupt_after_epoch, run_main, save_test_images, tiny_args,
                     write_cifar_folder)


@pytest.mark.parametrize("extra, message", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--device", "tpu"], "unknown --device"),
    (["--resume", "/nonexistent/last.pt"], "not found"),
    (["--probe", "-1"], "--probe must not be negative"),
    (["--probe", "101"], "--probe must be at most 100"),
])
def test_bad_arguments_exit_2_with_one_line(data_dir, tmp_path, capsys, extra, message):
    code, err = run_main(train, tiny_args(data_dir, tmp_path, *extra), capsys)
    assert code == 2 and message in err and len(error_lines(err)) == 1, err


def test_cuda_asked_for_but_absent(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also true on a GPU machine
    monkeypatch.setattr(devices, "nvidia_driver_version", lambda: None)
    code, err = run_main(train, tiny_args(data_dir, tmp_path, "--device", "cuda"), capsys)
    assert code == 2 and "no CUDA GPU" in err


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_a_gpu_that_torch_cannot_use_stops_the_run_in_one_line(data_dir, tmp_path, monkeypatch, capsys, device):
    # Colab's 550 driver beside torch's CUDA 13 build: --device auto would quietly train on the CPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "nvidia_driver_version", lambda: "550.54.15")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    code, err = run_main(train, tiny_args(data_dir, tmp_path, "--device", device), capsys)
    assert code == 2 and len(error_lines(err)) == 1, err
    assert "driver 550.54.15" in err and "CUDA 13.0" in err and "580" in err and "--device cpu" in err
    assert not os.listdir(tmp_path)


def test_unwritable_out_dir(data_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, err = run_main(train, tiny_args(data_dir, blocker / "run"), capsys)
    assert code == 2 and "cannot write to output folder" in err


def test_missing_data_without_download(tmp_path, capsys):
    code, err = run_main(train, tiny_args(str(tmp_path / "empty"), tmp_path / "run", "--no-download"), capsys)
    assert code == 2 and "CIFAR-10 not found" in err and len(error_lines(err)) == 1


def test_resume_rejects_corrupt_foreign_and_mismatched_checkpoints(data_dir, trained_run, tmp_path, capsys):
    # Random bytes fail torch.load in different ways (these seeds: UnpicklingError, IndexError,
    # UnicodeDecodeError, KeyError); a truncated checkpoint is a broken zip archive.
    damaged = []
    for seed in (0, 17, 54, 62):
        damaged.append(tmp_path / f"random-{seed}.pt")
        damaged[-1].write_bytes(np.random.default_rng(seed).bytes(1000))
    damaged.append(tmp_path / "truncated.pt")
    damaged[-1].write_bytes((trained_run / "last.pt").read_bytes()[:100_000])
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    other_classes = tmp_path / "cifar100.pt"
    checkpoint = torch.load(trained_run / "last.pt", weights_only=True)
    checkpoint["model_args"], checkpoint["classes"] = {"num_classes": 100}, [f"class {i}" for i in range(100)]
    torch.save(checkpoint, other_classes)
    for path, message in [*((path, "is corrupt") for path in damaged),
                          (foreign, "not a checkpoint written by train.py"),
                          (other_classes, "trained on other classes")]:
        code, err = run_main(train, ["--resume", str(path), "--data-dir", data_dir, "--device", "cpu",
                                     "--workers", "0", "--out-dir", str(tmp_path / "out")], capsys)
        assert code == 2 and message in err and len(error_lines(err)) == 1, err


@pytest.mark.parametrize("precision", ["auto", "fp16"])  # fp16: a grad scaler must not hide a NaN loss
def test_diverging_run_stops_and_keeps_last_good_checkpoint(request, tmp_path, monkeypatch, capsys, precision):
    data_dir = request.getfixturevalue("fp16_data_dir" if precision == "fp16" else "data_dir")
    args = fp16_args if precision == "fp16" else tiny_args
    save = train.Run.save

    def save_then_raise_lr(self, record, confusion):  # epoch 1 trains well, then the lr explodes
        save(self, record, confusion)
        for group in self.trainer.optimizer.param_groups:
            group["lr"] = 1e12
        self.trainer.per_step_schedule = False

    monkeypatch.setattr(train.Run, "save", save_then_raise_lr)
    code, err = run_main(train, args(data_dir, tmp_path), capsys)
    assert code == 1 and "NaN or infinite at epoch 2, step" in err and len(error_lines(err)) == 1, err
    assert "still holds epoch 1" in err
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())
    assert [r["epoch"] for r in json.loads((tmp_path / "log.json").read_text())["epochs"]] == [1]


def test_a_second_run_does_not_replace_the_first(trained_run, data_dir, tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(trained_run, folder)
    before = {name: (folder / name).read_bytes() for name in ("log.json", "last.pt", "best.pt")}
    final = json.loads(before["log.json"])["epochs"][-1]["test_acc"]
    code, err = run_main(train, tiny_args(data_dir, folder), capsys)
    assert code == 2 and len(error_lines(err)) == 1, err
    for words in ("holds another finished run", "2 of 2 epochs", f"{100 * final:.2f}%", "--out-dir", "--overwrite"):
        assert words in err, (words, err)
    assert "--resume" not in err  # a finished run has nothing left to continue
    assert {name: (folder / name).read_bytes() for name in before} == before
    assert train.main(tiny_args(data_dir, folder, "--epochs", "1", "--overwrite")) == 0
    assert [r["epoch"] for r in json.loads((folder / "log.json").read_text())["epochs"]] == [1]


def test_resume_from_another_folder_finds_the_runs_data(data_dir, tmp_path, monkeypatch, capsys):
    data = tmp_path / "my-data"
    shutil.copytree(data_dir, data)
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    interrupt_after_epoch(monkeypatch, 1)
    code, err = run_main(train, tiny_args("my-data", "run"), capsys)  # relative paths, as a user types them
    assert code == 130
    command = err.split("continue with: ")[1].split()
    monkeypatch.undo()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # The printed command, as printed, plus this machine's flags: no --data-dir, no download attempt.
    assert command[:2] == ["python", os.path.abspath(train.__file__)]
    assert train.main([*command[2:], "--device", "cpu", "--workers", "0", "--no-download"]) == 0
    assert not (elsewhere / "data").exists() and not os.listdir(elsewhere)
    assert torch.load(run / "last.pt", weights_only=True)["args"]["data_dir"] == str(data)


def test_resume_into_another_folder_refuses_another_run_and_branches_the_run(data_dir, trained_run, tmp_path,
                                                                             monkeypatch, capsys):
    first = tmp_path / "first"
    interrupt_after_epoch(monkeypatch, 1)
    assert run_main(train, tiny_args(data_dir, first), capsys)[0] == 130
    monkeypatch.undo()
    machine = ["--device", "cpu", "--workers", "0"]
    resume = ["--resume", str(first / "last.pt"), *machine]
    other = tmp_path / "other"
    shutil.copytree(trained_run, other)
    code, err = run_main(train, [*resume, "--out-dir", str(other)], capsys)
    assert code == 2 and "holds another finished run" in err, err
    # Stopped before its first epoch was saved: the branch holds the run as saved, and resumes from there.
    monkeypatch.setattr(loop, "train_one_epoch", lambda *_, **__: (_ for _ in ()).throw(KeyboardInterrupt))
    code, err = run_main(train, [*resume, "--out-dir", str(other), "--overwrite"], capsys)
    monkeypatch.undo()
    assert code == 130 and f"train.py --resume {other / 'last.pt'}" in err, err
    saved = json.loads((first / "log.json").read_text())["epochs"]
    assert json.loads((other / "log.json").read_text())["epochs"] == saved  # not the replaced run's
    for name in ("last.pt", "best.pt"):
        assert torch.load(other / name, weights_only=True)["history"] == saved
    branch = tmp_path / "branch"
    code, err = run_main(train, [*resume, "--out-dir", str(branch)], capsys)
    assert code == 0, err
    log = json.loads((branch / "log.json").read_text())
    best = torch.load(branch / "best.pt", weights_only=True)  # there, whether or not epoch 2 improved
    assert best["epoch"] == log["summary"]["best_checkpoint_epoch"] and [r["epoch"] for r in log["epochs"]] == [1, 2]
    # A finished run branched: nothing to train, and the new folder holds the whole run.
    code, out = run_main(train, ["--resume", str(trained_run / "last.pt"), *machine, "--out-dir", str(tmp_path / "copy")],
                         capsys)
    assert code == 0 and sorted(os.listdir(tmp_path / "copy")) == [".train.lock", "best.pt", "last.pt", "log.json",
                                                                          "probe.npz"]
    copied, original = (json.loads((folder / "log.json").read_text()) for folder in (tmp_path / "copy", trained_run))
    assert copied["epochs"] == original["epochs"] and copied["confusion_matrix"] == original["confusion_matrix"]


def test_resume_repairs_files_that_a_kill_between_writes_left_behind(data_dir, tmp_path, monkeypatch, capsys):
    # Killed after last.pt of the last epoch was written, before best.pt and log.json: the checkpoint is
    # complete, and the resume (with nothing left to train) brings the other two up to date.
    class Killed(Exception):
        pass

    def killed(*_):
        raise Killed

    monkeypatch.setattr(files, "atomic_link", killed)
    with pytest.raises(Killed):
        train.main(tiny_args(data_dir, tmp_path, "--epochs", "1"))
    monkeypatch.undo()
    assert (tmp_path / "last.pt").exists() and not (tmp_path / "best.pt").exists() and not (tmp_path / "log.json").exists()
    code, err = run_main(train, ["--resume", str(tmp_path / "last.pt"), "--device", "cpu", "--workers", "0"], capsys)
    assert code == 0, err
    assert torch.load(tmp_path / "best.pt", weights_only=True)["epoch"] == 1
    log = json.loads((tmp_path / "log.json").read_text())
    assert [r["epoch"] for r in log["epochs"]] == [1] and log["summary"]["epochs_done"] == 1
    assert sum(map(sum, log["confusion_matrix"])) == log["data"]["test_images"] and "per_class_accuracy" in log
    # Killed after last.pt (and best.pt, if epoch 2 improved) of the last epoch, before log.json: the log on disk is an epoch behind.
    write_json = files.write_json

    def killed_at_epoch_2(path, log):
        if len(log["epochs"]) == 2:
            raise Killed
        write_json(path, log)

    monkeypatch.setattr(files, "write_json", killed_at_epoch_2)
    with pytest.raises(Killed):
        train.main(tiny_args(data_dir, tmp_path / "two", "--epochs", "2"))
    monkeypatch.undo()
    assert len(json.loads((tmp_path / "two" / "log.json").read_text())["epochs"]) == 1
    code = run_main(train, ["--resume", str(tmp_path / "two" / "last.pt"), "--device", "cpu", "--workers", "0"])[0]
    out = capsys.readouterr().out
    assert code == 0 and "nothing to do" in out and "resuming at epoch 3/2" not in out, out
    log = json.loads((tmp_path / "two" / "log.json").read_text())
    assert [r["epoch"] for r in log["epochs"]] == [1, 2] and "confusion_matrix" in log


def test_log_says_what_the_accuracies_were_measured_on(trained_run, tmp_path, capsys):
    log = json.loads((trained_run / "log.json").read_text())
    # the tiny dataset
    assert log["data"] == {"official": False, "test_images": 40, "test_subset": False, "planted_shortcut": None}
    assert plot_curves.main([str(trained_run / "log.json"), "--out", str(tmp_path / "c.png")]) == 0
    assert "held-out images, not the official test set" in capsys.readouterr().out


def test_a_batch_larger_than_the_training_images_is_one_line(data_dir):
    # Not a request for terabytes of shared memory. The batch (global under torchrun, and a multiple of the
    # process count) is at most the images, so every process has its share.
    data = augment.load_dataset("cifar10", data_dir, download=False)
    args = train.build_parser().parse_args(["--train-subset", "4", "--batch-size", "100000000"])
    with pytest.raises(train.UsageError, match="--batch-size 100000000 is larger than the 4 training images"):
        augment.split_data(data, args)
    args.batch_size = 4
    assert len(augment.split_data(data, args)[0][0]) == 4


def test_subsets_and_dropped_images_are_said(data_dir, tmp_path, capsys):
    argv = tiny_args(data_dir, tmp_path, "--train-subset", "500", "--batch-size", "64", "--epochs", "1",
                     "--test-subset", "20")
    assert train.main(argv) == 0
    out, err = capsys.readouterr()
    assert "--train-subset 500 asked for, but the dataset has 200 training images" in err
    assert "each epoch trains on 3 batches of 64: 8 of the 200 training images" in err
    assert "200 training images, 20 test images" in out
    assert "s in all (training " in out  # the epoch's whole time and the training time, each named
    log = json.loads((tmp_path / "log.json").read_text())
    assert log["data"]["test_images"] == 20 and log["data"]["test_subset"]
    assert np.array(log["confusion_matrix"]).sum(axis=1).tolist() == [2] * 10  # class-balanced


def test_balanced_subset_is_fixed_and_even():
    labels = np.repeat(np.arange(10), [50, 50, 50, 50, 50, 50, 50, 50, 50, 3])  # one rare class
    chosen = augment.balanced_subset(labels, 100)
    assert np.array_equal(chosen, augment.balanced_subset(labels, 100)) and len(set(chosen)) == 100
    counts = np.bincount(labels[chosen], minlength=10)
    assert counts[9] == 3 and counts[:9].max() - counts[:9].min() <= 1


def test_evaluation_shows_a_progress_bar_at_a_terminal(data_dir, tmp_path, monkeypatch, capsys):
    for stream in (sys.stdout, sys.stderr):  # capsys's
        monkeypatch.setattr(stream, "isatty", lambda: True)
    assert train.main(tiny_args(data_dir, tmp_path, "--epochs", "1")) == 0
    assert "epoch 1 test" in capsys.readouterr().err


def test_a_redirected_run_says_a_line_now_and_then(data_dir, tmp_path, monkeypatch, capsys):
    # Not a terminal: no bar, and an epoch can take 15 minutes on a CPU. A line every minute; here every step.
    train_one_epoch = loop.train_one_epoch
    monkeypatch.setattr(loop, "train_one_epoch", lambda *a, lines_every: train_one_epoch(*a, lines_every=0))
    assert train.main(tiny_args(data_dir, tmp_path, "--epochs", "1")) == 0
    out = capsys.readouterr().out
    assert "epoch 1/1: step 1/2, " in out and "epoch 1/1: step 2/2, " in out and " img/s" in out, out


def test_plot_of_one_epoch_has_markers_and_whole_epochs(trained_run, tmp_path):
    log = json.loads((trained_run / "log.json").read_text())
    log["epochs"] = log["epochs"][:1]
    figure = plot_curves.curves_figure([log], ["one"], [plot_curves.summary(log)])
    for axis in figure.axes:
        assert axis.get_xlim() == (0.5, 1.5) and list(axis.get_xticks()) == [1]
        assert all(line.get_marker() not in (None, "None", "") for line in axis.get_lines())


def test_plot_warns_about_nan(trained_run, tmp_path, capsys):
    log = json.loads((trained_run / "log.json").read_text())
    log["epochs"][-1].update(test_acc=float("nan"), train_loss=float("nan"))
    path = tmp_path / "nan.json"
    path.write_text(json.dumps(log))
    assert plot_curves.main([str(path)]) == 0
    err = capsys.readouterr().err
    assert "NaN" in err and "epoch(s) 2" in err


def test_a_closed_pipe_ends_quietly_with_every_file_written(trained_run, tmp_path):
    log = tmp_path / "log.json"
    shutil.copy(trained_run / "log.json", log)
    image = save_test_images(tmp_path)[0]
    commands = [["plot_curves.py", str(log)],
                ["gradcam.py", "--image", image, "--checkpoint", str(trained_run / "best.pt")]]
    for command in commands:
        process = subprocess.Popen([sys.executable, *command], cwd=HERE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        process.stdout.close()  # `| head -0`: the reader is gone before anything is printed
        err = process.stderr.read()
        assert process.wait() == 0 and "Traceback" not in err and "BrokenPipe" not in err, err
    assert (tmp_path / "log_curves.png").exists() and (tmp_path / "log_confusion.png").exists()
    assert os.path.exists(os.path.splitext(image)[0] + "_gradcam.png")


def test_a_closed_pipe_does_not_stop_training(data_dir, tmp_path):
    # `python train.py ... | head -1`: the reader leaves after the first line; the run goes on to its end.
    process = subprocess.Popen([sys.executable, "train.py", *tiny_args(data_dir, tmp_path)], cwd=HERE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().startswith("training from epoch 1/2")
    process.stdout.close()
    err = process.stderr.read()
    assert process.wait() == 0 and "Traceback" not in err and "BrokenPipe" not in err, err
    assert [r["epoch"] for r in json.loads((tmp_path / "log.json").read_text())["epochs"]] == [1, 2]


def test_inputs_of_the_wrong_kind_are_named(data_dir, trained_run, tmp_path, capsys):
    for argv, message in ((["--resume", str(trained_run)], "is a folder; give the last.pt or best.pt in it"),
                          (["--data-dir", str(trained_run / "log.json")], "is a file, not a folder")):
        code, err = run_main(train, [*tiny_args(data_dir, tmp_path / "run"), *argv], capsys)
        assert code == 2 and message in err and len(error_lines(err)) == 1, err
    # Another dataset written in CIFAR-10's format (Fashion-MNIST, say) trains, with a warning in words.
    other = tmp_path / "other"
    shutil.copytree(data_dir, other)
    with open(other / "cifar-10-batches-py" / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"fashion {i}" for i in range(10)]}, f)
    code, err = run_main(train, tiny_args(str(other), tmp_path / "fashion", "--epochs", "1"), capsys)
    assert code == 0 and "holds other classes than CIFAR-10's (fashion 0, fashion 1" in err, err
    # A resume on other training images than the run's: refused at the start, not a scheduler error mid-epoch.
    smaller = write_cifar_folder(str(tmp_path / "smaller"), train_per_batch=8)  # 40 images: 1 step of 32
    code, err = run_main(train, ["--resume", str(trained_run / "last.pt"), "--data-dir", smaller, "--device", "cpu",
                                 "--workers", "0", "--out-dir", str(tmp_path / "branch")], capsys)
    assert code == 2 and "took 2 steps an epoch, but these training images make 1" in err, err
    assert not (tmp_path / "branch").exists()


def test_first_hour_messages(data_dir, tmp_path, capsys):
    a_file = tmp_path / "afile"
    a_file.write_text("")
    code, err = run_main(train, tiny_args(data_dir, a_file), capsys)
    assert code == 2 and "--out-dir" in err and "is a file" in err, err
    damaged = tmp_path / "damaged"
    shutil.copytree(data_dir, damaged)
    batch = damaged / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(batch.read_bytes()[:500])  # truncated
    out = tmp_path / "never"
    code, err = run_main(train, tiny_args(str(damaged), out), capsys)
    assert code == 2 and "data_batch_1 is damaged or truncated" in err and len(error_lines(err)) == 1, err
    assert not out.exists()  # no folder, no .train.lock: nothing is created before the inputs are checked
    code, err = run_main(train, tiny_args(data_dir, out, "--val-split", "64"), capsys)
    assert code == 2 and "--val-split 64 leaves no training images" in err and not out.exists(), err
    code, err = run_main(train, ["--epochs", "abc"], capsys)
    assert code == 2 and err.strip().splitlines() == [
        "train.py: error: argument --epochs: invalid int value: 'abc' (see train.py --help)"], err
    code, err = run_main(train, ["--no-such-flag"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--help" in err, err
    help_text = train.build_parser().format_help()
    for words in ("examples:", "python train.py --resume last.pt", "--overwrite", "--no-download keep"):
        assert words in help_text, words
