"""Faults: kills inside writes and between steps, signals, a full disk, a hostile checkpoint."""
import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest
import torch

import files
import gradcam
import loop
import resnet
import train

from helpers import (HERE, PAUSED_TRAIN, assert_files_consistent, env_with_pauses, error_lines, run_main,
                     save_test_images, tiny_args)


def start_training(argv, pause_in_write=None, wait_in_epoch=None, disk_full_at=None):
    return subprocess.Popen([sys.executable, PAUSED_TRAIN, *argv], cwd=HERE, text=True,
                            env=env_with_pauses(pause_in_write, wait_in_epoch, disk_full_at),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(condition, process, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        assert process.poll() is None, f"training ended early: {process.communicate()}"
        time.sleep(0.01)
    process.kill()
    raise AssertionError("timed out waiting for the training process")


@pytest.mark.slow
def test_killed_at_any_moment_loses_nothing_and_resumes(data_dir, tmp_path):
    out = tmp_path / "run"
    fresh = tiny_args(data_dir, out, "--epochs", "3")
    resume = ["--resume", str(out / "last.pt"), "--device", "cpu", "--workers", "0", "--data-dir", data_dir]
    # Where each interruption lands: inside a checkpoint write, inside a log write, between steps,
    # by SIGTERM and by Ctrl-C (SIGINT), and inside the last epoch's checkpoint write.
    plan = [("last.pt", signal.SIGKILL), ("log.json", signal.SIGKILL), ("step", signal.SIGKILL),
            ("step", signal.SIGTERM), ("step", signal.SIGINT), ("last.pt", signal.SIGKILL)]
    for where, how in plan:
        epoch_before = assert_files_consistent(out) if out.exists() else 0
        if epoch_before == 3:
            break
        process = start_training(resume if epoch_before else fresh, pause_in_write=None if where == "step" else where,
                                 wait_in_epoch=epoch_before + 1 if where == "step" else None)
        # The process says when it is between two steps, or inside a write of that file (the new version
        # written, not yet in place), and waits there.
        said = "test: between steps" if where == "step" else f"test: inside a write of {where}"
        wait_for(lambda: process.stderr.readline().startswith(said), process)
        process.send_signal(how)
        stdout, stderr = process.communicate(timeout=120)
        if how != signal.SIGKILL:
            assert process.returncode == 130 and f"continue with: python {HERE}/train.py --resume" in stderr, stderr
            assert not [n for n in os.listdir(out) if ".tmp-" in n]  # a graceful stop writes nothing partial
        assert_files_consistent(out)
    # Whatever the kills left, resuming finishes the run, and the log agrees with the checkpoint.
    while assert_files_consistent(out) < 3:
        assert train.main(resume if (out / "last.pt").exists() else fresh) == 0
    log = json.loads((out / "log.json").read_text())
    assert [r["epoch"] for r in log["epochs"]] == [1, 2, 3] and "confusion_matrix" in log
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 3


def test_linking_a_file_to_itself_leaves_no_temp_link(tmp_path):
    # rename() between two links of one file does nothing: the temp link would stay behind. A resume
    # re-links best.pt to last.pt, which it often is already.
    (tmp_path / "last.pt").write_bytes(b"epoch 3")
    for _ in range(2):
        files.atomic_link(tmp_path / "last.pt", tmp_path / "best.pt")
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "last.pt"]
    assert os.path.samefile(tmp_path / "last.pt", tmp_path / "best.pt")


def test_an_unexpected_error_lets_the_write_in_progress_finish(data_dir, tmp_path, monkeypatch):
    # Say the GPU runs out of memory in epoch 2's evaluation while epoch 1's files are being written:
    # the error must not release the folder's lock before those files are complete.
    failed = threading.Event()
    evaluate = loop.evaluate

    def out_of_memory_in_epoch_2(trainer, *args, **kwargs):
        if trainer.scheduler.last_epoch > 2:
            failed.set()
            raise RuntimeError("CUDA out of memory (simulated)")
        return evaluate(trainer, *args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", out_of_memory_in_epoch_2)
    waited = []  # whether each write waited for the failure (not for the timeout)
    atomic_write = files.atomic_write

    def write_after_the_failure(path, data):
        waited.append(failed.wait(timeout=60))
        atomic_write(path, data)
    monkeypatch.setattr(files, "atomic_write", write_after_the_failure)
    with pytest.raises(RuntimeError, match="simulated"):
        train.main(tiny_args(data_dir, tmp_path))
    assert waited and all(waited), waited
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1
    assert [r["epoch"] for r in json.loads((tmp_path / "log.json").read_text())["epochs"]] == [1]


def test_a_stop_after_the_last_step_finishes_the_run(data_dir, tmp_path, monkeypatch, capsys):
    # Ctrl-C during the last epoch's evaluation: no step is left to stop after, so the run finishes,
    # saves, says so, and exits 0; the message printed at the signal said this would happen.
    evaluate = loop.evaluate

    def interrupted_evaluation(trainer, *args, **kwargs):
        if trainer.scheduler.last_epoch == trainer.scheduler.total_steps:  # after the last step
            os.kill(os.getpid(), signal.SIGINT)
        return evaluate(trainer, *args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", interrupted_evaluation)
    assert train.main(tiny_args(data_dir, tmp_path)) == 0
    out, err = capsys.readouterr()
    assert "once the last step is done, the run finishes" in err
    assert "SIGINT came after the last training step: the run is complete" in out
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 2


def test_full_disk_stops_cleanly_and_keeps_previous_files(data_dir, tmp_path, monkeypatch, capsys):
    writes, fsync = [], os.fsync

    def disk_full_on_second_epoch(fd):  # a file's data reach the disk at its fsync, inside atomic_write
        if stat.S_ISREG(os.fstat(fd).st_mode):  # not a folder's
            writes.append(1)
            if len(writes) > 3:  # epoch 1 wrote last.pt, probe.npz and log.json; the next write finds the disk full
                raise OSError(28, "No space left on device")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", disk_full_on_second_epoch)
    code, err = run_main(train, tiny_args(data_dir, tmp_path), capsys)
    assert code == 1 and "the disk is full" in err and len(error_lines(err)) == 1, err
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1
    assert torch.load(tmp_path / "best.pt", weights_only=True)["epoch"] == 1
    assert [r["epoch"] for r in json.loads((tmp_path / "log.json").read_text())["epochs"]] == [1]
    assert assert_files_consistent(tmp_path) == 1  # probe.npz too
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


@pytest.mark.slow
def test_a_stop_that_meets_a_full_disk_ends_the_process(data_dir, tmp_path):
    # SIGTERM in epoch 2, while epoch 1's last.pt found the disk full: the stop waits for that write and
    # meets its error. The loader's worker must end with the run (it ignores SIGTERM), or the process
    # waits for it at exit forever (it did: seen on a development run whose folder was moved away).
    process = start_training(tiny_args(data_dir, tmp_path, "--workers", "1"), wait_in_epoch=2,
                             disk_full_at="last.pt")
    wait_for(lambda: process.stderr.readline().startswith("test: between steps"), process)
    process.send_signal(signal.SIGTERM)
    try:
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()  # a process that hangs at exit (the failure this test is about) does not outlive it
    assert process.returncode == 1 and "could not save epoch 1 (the disk is full)" in stderr, stderr
    assert not (tmp_path / "last.pt").exists() and not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_checkpoint_is_written_while_the_next_epoch_trains(data_dir, tmp_path, monkeypatch):
    # Every file write waits (inside the write) until epoch 2 has started training: a write on the
    # training path would wait in vain. The kill and full-disk tests above show the guarantees hold.
    second_epoch_started = threading.Event()
    train_one_epoch = loop.train_one_epoch

    def note_the_start(trainer, loader, epoch, *args, **kwargs):
        if epoch == 2:
            second_epoch_started.set()
        return train_one_epoch(trainer, loader, epoch, *args, **kwargs)

    overlapped = []
    monkeypatch.setattr(loop, "train_one_epoch", note_the_start)
    atomic_write = files.atomic_write

    def write_once_epoch_2_trains(path, data):
        overlapped.append(second_epoch_started.wait(timeout=30))
        atomic_write(path, data)
    monkeypatch.setattr(files, "atomic_write", write_once_epoch_2_trains)
    assert train.main(tiny_args(data_dir, tmp_path)) == 0
    assert overlapped and all(overlapped), overlapped
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 2


class CodeOnLoad:
    """A pickle that runs a command when loaded, as a malicious checkpoint would."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_checkpoint_is_refused_and_never_runs(data_dir, trained_run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    hostile = tmp_path / "hostile.pt"
    torch.save({"format": resnet.CHECKPOINT_FORMAT, "model": CodeOnLoad(marker)}, hostile)
    code, err = run_main(train, ["--resume", str(hostile), "--data-dir", data_dir, "--device", "cpu",
                                 "--out-dir", str(tmp_path / "out")], capsys)
    assert code == 2 and "refused" in err and len(error_lines(err)) == 1, err
    image = save_test_images(tmp_path)[0]
    code, err = run_main(gradcam, ["--image", image, "--checkpoint", str(hostile)], capsys)
    assert code == 2 and "refused" in err, err
    assert not marker.exists()
    # The payload is real: an unsafe load would have run it.
    torch.load(hostile, weights_only=False)
    assert marker.exists()


def test_second_run_on_the_same_folder_refuses(data_dir, trained_run, tmp_path, capsys):
    shutil.copytree(trained_run, tmp_path, dirs_exist_ok=True)  # the live run's files: not "another run" to resume
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import files, time; lock = files.folder_lock({str(tmp_path)!r}, '.train.lock', 'busy'); lock.__enter__(); "
                               f"print('locked', flush=True); time.sleep(60)"],
        cwd=HERE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = (tmp_path / "log.json").read_bytes()
        for argv in (tiny_args(data_dir, tmp_path), ["--resume", str(tmp_path / "last.pt"), "--device", "cpu"]):
            code, err = run_main(train, argv, capsys)
            assert code == 2 and "another train.py is running" in err and len(error_lines(err)) == 1, err
        assert (tmp_path / "log.json").read_bytes() == before
    finally:
        holder.kill()
        holder.wait()
    assert train.main(tiny_args(data_dir, tmp_path, "--epochs", "1", "--overwrite")) == 0  # the lock died with it


def test_an_unexpected_error_with_workers_ends_the_process(data_dir, tmp_path):
    # The workers ignore SIGTERM (a stop is the main process's decision); an error that reaches the top
    # must still end them, or Python's exit would wait for them forever.
    script = (f"import loop, train\n"
              f"def fail(*args, **kwargs): raise RuntimeError('CUDA out of memory (simulated)')\n"
              f"loop.evaluate = fail\n"
              f"train.main({tiny_args(data_dir, tmp_path, '--workers', '1')!r})\n")
    process = subprocess.run([sys.executable, "-c", script], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert process.returncode == 1 and "CUDA out of memory (simulated)" in process.stderr


def test_the_lock_dies_with_its_process_not_with_its_workers(tmp_path):
    # A DataLoader worker is a fork of the training process: killed, the process must not leave the lock
    # to a worker that lives on for a few seconds (an flock would be shared with it, keeping a resume out).
    script = (f"import files, os, signal, sys, time\n"
              f"lock = files.folder_lock({str(tmp_path)!r}, '.train.lock', 'busy'); lock.__enter__()\n"
              f"if os.fork() == 0:\n"
              f"    print('worker', os.getpid(), flush=True); time.sleep(60); os._exit(0)\n"
              f"time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", script], cwd=HERE, stdout=subprocess.PIPE, text=True)
    worker = int(holder.stdout.readline().split()[1])
    try:
        with pytest.raises(files.FolderInUse):
            files.folder_lock(str(tmp_path), ".train.lock", "busy").__enter__()
        holder.kill()
        holder.wait()
        os.kill(worker, 0)  # the worker is still alive
        with files.folder_lock(str(tmp_path), ".train.lock", "busy"):
            pass
    finally:
        holder.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)
