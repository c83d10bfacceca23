"""Several processes: real torchrun launches (gloo on the CPU) and the decisions they share."""
import argparse
import json
import math
import os
import queue
import re
import signal
import socket
import threading

import numpy as np
import pytest
import torch

import augment
import benchmark
import devices
import distributed
import loop
import resnet
import runfiles
import train

from helpers import (assert_files_consistent, coloured_images, error_lines, interrupt_after_epoch, one_cycle_lrs,
                     run_main, tiny_args, torchrun, write_cifar_folder)


def ranks_waiting(processes, count, timeout=120):
    """Wait until `count` ranks of these torchrun launches say they are between steps. Each launcher's
    stderr is read in a thread of its own: the launchers' lines arrive in any order. Returns the ranks'
    process ids, and a function that gives a launcher's whole stderr once it has ended."""
    arrived, read = queue.Queue(), {process: [] for process in processes}

    def reader(process):
        for line in process.stderr:
            read[process].append(line)
            arrived.put(line)
        arrived.put(None)  # this launcher ended

    threads = {process: threading.Thread(target=reader, args=(process,), daemon=True) for process in processes}
    for thread in threads.values():
        thread.start()
    pids = []
    while len(pids) < count:
        try:
            line = arrived.get(timeout=timeout)
        except queue.Empty:
            for process in processes:  # not left running beside the next tests
                process.kill()
            raise AssertionError(f"no rank said it waits between steps: {''.join(sum(read.values(), []))}") from None
        assert line is not None, f"torchrun ended early: {''.join(sum(read.values(), []))}"
        pids += [int(pid) for pid in re.findall(r"test: between steps, waiting for a signal \(pid (\d+)\)", line)]

    def stderr_of(process):
        process.wait(timeout=timeout)
        threads[process].join(timeout=timeout)
        return "".join(read[process])
    return pids, stderr_of


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(argv_of_each, wait_in_epoch=None):
    """Two "machines" on this one: two torchrun agents of one process each, meeting by c10d rendezvous on
    localhost, each with its own command line (its own data, checkpoint or precision)."""
    endpoint = f"127.0.0.1:{free_port()}"
    return [torchrun(argv, "--nnodes", "2", "--nproc_per_node", "1", "--node-rank", str(rank), "--rdzv-backend", "c10d",
                     "--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes", wait_in_epoch=wait_in_epoch)
            for rank, argv in enumerate(argv_of_each)]


def said_by(script, output):
    """The lines that `script` itself said in a launch's output, without their "(rank N)": torchrun's
    failure report repeats them after "traceback : ", and names the script in "train.py FAILED"."""
    said = (re.match(rf"{re.escape(script)}(?: \(rank \d+\))?: (.*)$", line) for line in output.splitlines())
    return [match.group(1) for match in said if match]


def stderr_when_ended(processes, timeout=120):
    """The processes' stderr, together, once all have ended (killed if one has not after `timeout` s)."""
    try:
        return "".join(process.communicate(timeout=timeout)[1] for process in processes)
    finally:
        for process in processes:
            process.kill()


def reference_evaluation(checkpoint_path, data_dir, batch_size, precision, part="test"):
    """A single process's evaluation of a saved checkpoint on the test batch (or its run's validation
    images, with the temperature grid), one thread (as each rank had), in the run's precision (auto: bf16 or
    fp32, by the CPU)."""
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    args = argparse.Namespace(**checkpoint["args"])
    model = loop.build_model(10, args, torch.device("cpu"))
    model.load_state_dict(checkpoint["model"])
    trainer = loop.Trainer(model, args, precision, torch.device("cpu"), checkpoint["mean"], checkpoint["std"], 1)
    data = augment.load_dataset("cifar10", data_dir, download=False)
    images, labels = augment.split_data(data, args)[1] if part == "val" else (data.test_images, data.test_labels)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return loop.evaluate(trainer, augment.to_tensor(images), torch.from_numpy(labels), 10, batch_size,
                             fit_temperature=part == "val")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_torchrun_two_processes_make_one_run(data_dir, tmp_path):
    argv = tiny_args(data_dir, tmp_path, "--epochs", "4", "--train-subset", "200", "--batch-size", "20",
                     "--val-split", "20")
    process = torchrun(argv)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    # Rank 0 alone prints and writes: one start line, one line per epoch, one log, one checkpoint.
    assert len([line for line in out.splitlines() if line.startswith("training from")]) == 1, out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("epoch")] == ["1/4", "2/4", "3/4", "4/4"]
    assert sorted(n for n in os.listdir(tmp_path)) == [".train.lock", "best.pt", "last.pt", "log.json", "probe.npz"]
    log = json.loads((tmp_path / "log.json").read_text())
    env = log["environment"]
    assert (env["world_size"], env["nodes"], env["backend"], env["per_rank_batch"]) == (2, 1, "gloo", 10)
    last = log["epochs"][-1]
    assert last["test_acc"] >= 0.5, log["epochs"]  # chance is 0.1: the learnable task was learned
    assert last["train_loss"] < log["epochs"][0]["train_loss"]
    # The sharded evaluation's counts equal one process's evaluation of the saved checkpoint, exactly.
    reference = reference_evaluation(tmp_path / "last.pt", data_dir, batch_size=10, precision=env["precision"])
    assert (last["test_acc"], last["test_acc_tta"]) == (reference["acc"], reference["acc_tta"])
    assert log["confusion_matrix"] == reference["confusion"]
    assert last["test_ece"] == pytest.approx(reference["ece"], abs=1e-6)  # float sums: the order differs
    assert log["reliability"]["count"] == reference["reliability"]["count"]
    # The temperature: fitted on the validation images, whose NLL sums add up over the ranks.
    val = reference_evaluation(tmp_path / "last.pt", data_dir, batch_size=10, precision=env["precision"], part="val")
    assert last["val_acc"] == val["acc"]  # float sums in another order: the same grid point, or the next
    assert abs(math.log2(last["temperature"] / loop.fitted_temperature(val))) < 0.021


@pytest.mark.slow
def test_torchrun_a_failed_write_on_rank_0_stops_every_rank(data_dir, tmp_path):
    # last.pt cannot be replaced (a folder stands there): rank 0's write of epoch 1 fails while epoch 2
    # trains. The other rank must stop too, at the same point, instead of waiting for rank 0 in a step.
    (tmp_path / "last.pt").mkdir()
    process = torchrun(tiny_args(data_dir, tmp_path, "--epochs", "3", "--train-subset", "128", "--overwrite"))
    _, err = process.communicate(timeout=120)
    assert "train.py: error: could not save epoch 1" in err, err
    # torchrun's report, of the ranks that had ended when it looked: rank 0 failed (1); rank 1 stopped with
    # it (2), unless torchrun ended it first (-15).
    expected = {"0": ("1",), "1": ("2", "-15")}
    codes = re.findall(r"rank\s*: (\d) \(local_rank: \d\)\s*exitcode\s*: (-?\d+)", err)
    assert process.returncode != 0 and codes and all(code in expected[rank] for rank, code in codes), err
    assert 'train.py", line' not in err, err  # no rank died in a collective with a traceback


@pytest.mark.slow
def test_torchrun_nodes_with_different_data_stop_in_one_line(data_dir, tmp_path):
    # Two "machines", each with its own --data-dir: one holds fewer training images. Their ranks would
    # take different numbers of steps and wait for each other forever.
    smaller = write_cifar_folder(str(tmp_path / "smaller"), train_per_batch=16)
    nodes = two_nodes([tiny_args(folder, tmp_path / "run", "--train-subset", "0", "--epochs", "1")
                       for folder in (data_dir, smaller)])
    errors = stderr_when_ended(nodes)
    assert all(node.returncode != 0 for node in nodes)
    said = said_by("train.py", errors)  # once a machine: on a cluster each machine's log has its own
    assert len(said) == 2 and all(text.startswith("error: the processes of this run differ in training images (")
                                  for text in said), errors
    # torchrun's failure report shows the line too, not "To enable traceback see ...": it reads each
    # failed process's error file.
    # (At least one report: an agent whose rendezvous host has already gone may end without one.)
    assert re.search(r"traceback : train.py( \(rank 1\))?: error: the processes of this run differ in", errors), errors
    assert not (tmp_path / "run").exists()  # stopped before anything was created


@pytest.mark.slow
def test_torchrun_nodes_given_different_settings_stop_in_one_line(data_dir, tmp_path):
    # Each machine has its own command line. Another --lr would step each rank's optimizer differently on
    # the same averaged gradients (the copies of the model drift apart, rank 0 saves its own); another
    # --seed would shuffle other shares of the images (some seen twice an epoch, some never).
    nodes = two_nodes([tiny_args(data_dir, tmp_path / "run", "--lr", lr, "--seed", seed)
                       for lr, seed in (("0.1", "0"), ("0.2", "1"))])
    errors = stderr_when_ended(nodes)
    assert all(node.returncode != 0 for node in nodes)
    said = said_by("train.py", errors)
    assert len(said) == 2 and all("differ in --lr (0.1, 0.2), --seed (0, 1):" in text for text in said), errors
    assert not (tmp_path / "run").exists()


def test_the_settings_that_every_process_must_share_name_their_flags(trained_run):
    # The same names on every rank (World.differing compares them by name), whatever the checkpoint holds;
    # the machine's own flags are left out, but for the two that change what DDP does.
    checkpoint = torch.load(trained_run / "last.pt", weights_only=True)
    data = augment.load_dataset("cifar10", checkpoint["args"]["data_dir"], download=False)
    fresh = train.agreed_settings(train.parse_args([]), None, data)
    defaults = vars(train.parse_args([]))
    resumed_args, _ = runfiles.args_for_resume(train.parse_args(["--resume", str(trained_run / "last.pt")]),
                                               {"resume"}, defaults)
    resumed = train.agreed_settings(resumed_args, checkpoint, data)
    assert list(resumed) == list(fresh)
    assert (resumed["--lr"], resumed["--epochs"], resumed["the checkpoint's history"]) == (
        checkpoint["args"]["lr"], checkpoint["args"]["epochs"], checkpoint["history"])  # the run's own, compared
    assert all(json.dumps(value) for value in [*fresh.values(), *resumed.values()])  # compared as JSON text
    assert {"--lr", "--seed", "--batch-size", "--epochs", "--no-nesterov", "--sync-bn", "--no-channels-last",
            "the checkpoint's history", "training images", "classes"} <= set(fresh)
    assert not {"--device", "--precision", "--workers", "--data-dir", "--out-dir", "--resume", "--help"} & set(fresh)


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["checkpoint", "arguments", "a flag argparse refuses"])
def test_a_failure_on_one_node_before_training_stops_every_node(failure, data_dir, trained_run, tmp_path):
    # Two "machines", each with its own copy of the checkpoint or its own command line; the second's fails
    # before any training. The first must stop too, in one line, not wait for it nor end in a traceback (it
    # did when the checks came before the processes connected), and the second must say why, even where
    # the error is of a kind said once when every rank meets it (a usage error). Which machine gets rank 0
    # is the rendezvous's choice: the lines are compared without their "(rank N)".
    if failure == "checkpoint":
        missing = tmp_path / "missing" / "last.pt"
        argvs = [["--resume", str(copy), "--device", "cpu", "--workers", "0", "--out-dir", str(tmp_path / "run")]
                 for copy in (trained_run / "last.pt", missing)]
        why = f"error: checkpoint {missing} not found"
    elif failure == "arguments":
        argvs = [tiny_args(data_dir, tmp_path / "run", "--batch-size", str(batch)) for batch in (32, 33)]
        why = ("error: --batch-size 33 is the global batch and does not divide among 2 processes; give a multiple "
               "of 2 (32 or 34)")
    else:  # argparse's own error: it left silently (exit 2) while the other machine waited to connect
        argvs = [tiny_args(data_dir, tmp_path / "run", "--batch-size", batch) for batch in ("32", "3x")]
        why = "error: argument --batch-size: invalid int value: '3x' (see train.py --help)"
    nodes = two_nodes(argvs)
    errors = stderr_when_ended(nodes)
    assert all(node.returncode != 0 for node in nodes)
    assert sorted(said_by("train.py", errors)) == sorted(
        [why, "error: another process of this run failed (its message says why)"]), errors
    assert not (tmp_path / "run").exists()  # stopped before anything was created


@pytest.mark.slow
def test_nodes_with_different_precisions_stop_in_one_line(data_dir, tmp_path):
    # --precision auto decides per machine: an A100 (bf16) beside a T4 (fp16) would average loss-scaled
    # gradients with unscaled ones. Two "machines" given different precisions stand in for them.
    nodes = two_nodes([tiny_args(data_dir, tmp_path / "run", "--precision", precision) for precision in ("bf16", "fp32")])
    errors = stderr_when_ended(nodes)
    assert all(node.returncode != 0 for node in nodes)
    said = said_by("train.py", errors)
    assert len(said) == 2 and all("differ in precision (bf16, fp32):" in text for text in said), errors
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_nodes_stop_on_sigterm_and_resume_across_world_sizes(data_dir, tmp_path, monkeypatch, capsys):
    # 1 process -> 2 "nodes" (two torchrun agents, c10d rendezvous on localhost) -> 1 process. 4 steps an
    # epoch: under torchrun the ranks' stop vote is read one step after it is cast.
    argv = tiny_args(data_dir, tmp_path, "--epochs", "3", "--train-subset", "128")
    interrupt_after_epoch(monkeypatch, 1)
    assert train.main(argv) == 130
    resume = ["--resume", str(tmp_path / "last.pt"), "--device", "cpu", "--workers", "0"]
    nodes = two_nodes([resume, resume], wait_in_epoch=3)
    _, stderr_of = ranks_waiting(nodes, 2)
    for node in nodes:  # a cluster's preemption: every launcher gets SIGTERM
        node.send_signal(signal.SIGTERM)
    errors = "".join(stderr_of(node) for node in nodes)
    assert all(node.returncode != 0 for node in nodes)
    said = said_by("train.py", errors)  # once a machine
    assert len(said) == 2 and all(text.startswith("stopped at epoch 3, after step 2 of 4; epochs 1-2 are saved; "
                                                  "continue with: torchrun --nnodes 2 --nproc_per_node 1")
                                  for text in said), errors
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]  # nothing partial
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["epoch"] == 2 and saved["args"]["batch_size"] == 32
    assert json.loads((tmp_path / "log.json").read_text())["environment"]["nodes"] == 2
    monkeypatch.undo()
    assert train.main(resume) == 0
    log = json.loads((tmp_path / "log.json").read_text())
    assert [r["epoch"] for r in log["epochs"]] == [1, 2, 3] and log["environment"]["world_size"] == 1
    # The schedule went on where it was, whatever the number of processes: the lr of a one-process run.
    assert [r["lr"] for r in log["epochs"]] == pytest.approx(one_cycle_lrs(epochs=3, steps=4, peak=0.2 * 32 / 500))


@pytest.mark.slow
def test_torchrun_sigterm_then_sigkill_of_one_rank_then_resume(data_dir, tmp_path):
    argv = tiny_args(data_dir, tmp_path, "--epochs", "3", "--train-subset", "128")
    # SIGTERM to each process (as Ctrl-C or a cluster does): both stop at the same step and exit 130.
    process = torchrun(argv, wait_in_epoch=2)
    pids, stderr_of = ranks_waiting([process], 2)
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    err = stderr_of(process)
    # torchrun's report lists the ranks that had ended when it noticed the first (one or both: a rank that
    # ends a moment later is not listed), each with its exit code: 130, not a kill.
    codes = re.findall(r"exitcode  : (-?\d+)", err)
    assert codes and set(codes) == {"130"}, err
    assert re.search(r"train.py: stopped at epoch 2, after step 2 of 4; epoch 1 is saved; continue with: torchrun "
                     r"--standalone --nproc_per_node 2 /\S*train.py --resume", err), err
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    assert assert_files_consistent(tmp_path) == 1
    # SIGKILL of one rank: torchrun ends the other; every file is still a complete version.
    process = torchrun(["--resume", str(tmp_path / "last.pt"), "--device", "cpu", "--workers", "0"], wait_in_epoch=3)
    pids, stderr_of = ranks_waiting([process], 2)
    os.kill(pids[0], signal.SIGKILL)
    err = stderr_of(process)
    assert process.returncode != 0 and "SIGKILL" in err, err
    assert assert_files_consistent(tmp_path) in (1, 2)  # epoch 2's files may have been in the writing
    assert train.main(["--resume", str(tmp_path / "last.pt"), "--device", "cpu", "--workers", "0"]) == 0
    assert assert_files_consistent(tmp_path) == 3


def test_ranks_draw_different_augmentations_for_the_same_positions():
    images = np.tile(coloured_images(1, 0)[0], (64, 1, 1, 1))  # one image, many times
    shares = []
    for rank in (0, 1):
        dataset = augment.AugmentedImages(images, np.zeros(64, dtype=np.int64),
                                          augment.train_transform(augment.CIFAR10_MEAN))
        sampler = augment.SeededBatchSampler(64, 32, seed=0, rank=rank, world_size=2)
        shares.append([dataset.__getitems__(batch) for batch in sampler])
    for first, second in zip(*shares):
        assert len(first) == len(second) == 16
        assert sum(torch.equal(a[0], b[0]) for a, b in zip(first, second)) <= 2  # a crop may coincide
    # Together the ranks' shares are the global batch of a single process, in order.
    whole = [indices for _, indices in augment.SeededBatchSampler(64, 32, seed=0)]
    halves = [[indices for _, indices in augment.SeededBatchSampler(64, 32, seed=0, rank=r, world_size=2)]
              for r in (0, 1)]
    assert [a + b for a, b in zip(*halves)] == whole


def test_each_machine_downloads_once(tmp_path, monkeypatch):
    # The first process of a machine downloads; the others read what it wrote, never download themselves.
    downloads = []

    def download(spec, root):
        downloads.append(root)
        raise augment.DatasetError("no network in this test")

    monkeypatch.setattr(augment, "_download", download)
    args = train.parse_args(["--data-dir", str(tmp_path), "--device", "cpu"])
    for rank in range(4):  # two machines of two processes each
        with pytest.raises(augment.DatasetError):
            train.load_data(args, distributed.World(rank=rank, local_rank=rank % 2, size=4, local_size=2))
    assert downloads == [str(tmp_path)] * 2  # by ranks 0 and 2, the first of each machine


def test_global_batch_must_divide_among_processes(data_dir, tmp_path, capsys):
    args = train.parse_args(tiny_args(data_dir, tmp_path, "--batch-size", "32"))
    with pytest.raises(train.UsageError, match=r"--batch-size 32 is the global batch and does not divide among 3 "
                                               r"processes; give a multiple of 3 \(30 or 33\)$"):
        train.check_args(args, distributed.World(size=3, local_size=3))
    train.check_args(args, distributed.World(size=2, local_size=2))
    # A resumed run keeps its batch (airbench's 500, saved on one GPU, resumed on 8): the advice is the processes.
    resumed = argparse.Namespace(**dict(vars(args), batch_size=500, resume="run/last.pt"))
    with pytest.raises(train.UsageError, match=r"^run/last.pt was saved with a global batch of 500, which does not "
                                               r"divide among 8 processes; resume it on 1, 2, 4, 5 or 10 processes$"):
        train.check_args(resumed, distributed.World(size=8, local_size=8))
    code, err = run_main(train, tiny_args(data_dir, tmp_path, "--sync-bn"), capsys)
    assert code == 2 and "--sync-bn needs CUDA GPUs" in err and len(error_lines(err)) == 1, err


@pytest.mark.slow
def test_benchmark_under_torchrun_adds_the_all_reduce_and_scaling(tmp_path):
    process = torchrun(["--device", "cpu", "--batch-size", "8", "--steps", "1", "--workers", "0",
                        "--out-dir", str(tmp_path)], script="benchmark.py")
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    result = json.loads((tmp_path / "benchmark.json").read_text())
    assert (result["world_size"], result["per_rank_batch"], result["backend"]) == (2, 4, "gloo")
    for key in ("ddp_step_images_per_s", "all_reduce_ms", "step_ms", "scaling_efficiency"):
        assert result[key] > 0, key
    assert result["gradient_mb"] == pytest.approx(11_173_962 * 4 / 2**20)
    assert out.count("benchmark on") == 1  # rank 0 alone prints
    for label in ("DistributedDataParallel, all 2 processes", "gradient all-reduce alone", "scaling efficiency"):
        assert label in out


class AnotherRankDiverged(distributed.World):
    """One process's view of a run in which another rank's loss became NaN at step 1."""

    def minimum(self, tensor):
        return torch.minimum(tensor, torch.tensor(1))


def test_a_nan_on_another_rank_stops_this_one(data_dir, tmp_path):
    world, cpu = AnotherRankDiverged(), torch.device("cpu")
    args = train.parse_args(tiny_args(data_dir, tmp_path))
    images, labels = coloured_images(64, seed=0)
    loader, _ = augment.make_train_loader(images, labels, args, augment.CIFAR10_MEAN, cpu, 0, world=world)
    trainer = loop.Trainer(loop.build_model(10, args, cpu), args, "bf16", cpu, augment.CIFAR10_MEAN,
                               augment.CIFAR10_STD, len(loader), world)
    with loop.StopFlag(world) as stop, pytest.raises(loop.Diverged, match="epoch 1, step 1 of 2"):
        loop.train_one_epoch(trainer, loader, 1, 1, stop, bar_enabled=False)


def test_torchruns_variables_describe_the_processes():
    assert distributed.world_from_environment({}) == distributed.World()  # no torchrun: one process, nothing started
    world = distributed.world_from_environment({"RANK": "11", "LOCAL_RANK": "3", "WORLD_SIZE": "16",
                                           "LOCAL_WORLD_SIZE": "8"})
    assert (world.rank, world.local_rank, world.size, world.nodes, world.main, world.launched) == \
        (11, 3, 16, 2, False, True)
    assert world.per_rank(512) == 32
    assert world.resume_command("/p/train.py", "/r/last.pt").startswith(
        "torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d")
    assert distributed.World().resume_command("/p/train.py", "/r/a b.pt") == "python /p/train.py --resume '/r/a b.pt'"


def test_gpus_connect_their_own_nccl_group_only_after_the_checks(monkeypatch):
    # The processes connect over gloo first (distributed.processes); the GPUs' NCCL group comes after the checks,
    # bound to this rank's GPU. No GPU here: torch's new_group is replaced by a recorder.
    made, compared = [], []
    monkeypatch.setattr(torch.distributed, "new_group", lambda **options: made.append(options) or "nccl group")
    monkeypatch.setattr(distributed.World, "differing", lambda self, values: compared.append(values) or {})
    launched = distributed.World(rank=1, local_rank=1, size=2, local_size=2, launched=True, backend="gloo")
    gpu = distributed.on_device(launched, torch.device("cuda", 1), "bf16")
    assert (gpu.backend, gpu.data) == ("nccl", "nccl group")
    assert made == [{"backend": "nccl", "device_id": torch.device("cuda", 1)}]
    assert compared == [{"device": "cuda", "precision": "bf16"}]  # device type and precision agreed on first
    assert distributed.on_device(launched, torch.device("cpu"), "fp32") is launched  # CPU processes: all on gloo
    assert distributed.on_device(distributed.World(), torch.device("cuda", 0), "bf16") == distributed.World()  # one process
    with pytest.raises(devices.DeviceError, match="not on mps"):
        distributed.on_device(launched, torch.device("mps"), "fp32")
    monkeypatch.setattr(distributed.World, "differing",  # a T4 beside an A100
                        lambda self, values: {"precision": ['"bf16"', '"fp16"']})
    with pytest.raises(distributed.ProcessesDiffer, match=r"differ in precision \(bf16, fp16\)"):
        distributed.on_device(launched, torch.device("cuda", 1), "fp16")
    assert len(made) == 1


def test_the_model_is_wrapped_with_the_worlds_data_group():
    # The default group is gloo (checks, stop votes); gradients and --sync-bn's statistics go through the
    # world's data group (NCCL's on GPUs). A one-process gloo group stands in for it here.
    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        group = torch.distributed.new_group(backend="gloo")
        world = distributed.World(launched=True, backend="gloo", data=group)
        assert world.wrap(resnet.resnet18(10), torch.device("cpu")).process_group is group
        synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(resnet.resnet18(10))
        with pytest.raises(ValueError, match="only work with GPU modules"):  # torch's refusal on a CPU, after...
            world.wrap(synced, torch.device("cpu"))
        norms = [m for m in synced.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
        assert norms and all(m.process_group is group for m in norms)  # ...each layer got the data group
    finally:
        torch.distributed.destroy_process_group()


def test_the_processes_agree_by_one_exchange_that_names_what_differs(monkeypatch):
    elsewhere = {"classes": ("cat", "dog"), "--lr": 0.1, "--seed": 1, "only there": 1}  # another machine's
    monkeypatch.setattr(torch.distributed, "all_gather_object",
                        lambda everyone, mine: everyone.__setitem__(slice(None), [mine, elsewhere]))
    world = distributed.World(rank=0, size=2, local_size=2, launched=True)
    here = {"classes": ["cat", "dog"], "--lr": 0.2, "--seed": 1, "history": None}
    assert world.differing(here) == {"--lr": ["0.1", "0.2"], "only there": ["1", "null"]}
    assert distributed.World().differing(here) == {}  # one process: nothing to compare


def test_a_failed_stop_vote_raises_rather_than_saying_go_on(monkeypatch):
    # A peer gone (killed, out of memory) fails the vote's collective: read as "no stop", the rank would walk
    # into the next step's all-reduce and wait there.
    failed = torch.futures.Future()
    failed.set_exception(RuntimeError("Connection closed by peer"))
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda *a, **k: argparse.Namespace(get_future=lambda: failed))
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        distributed.World(launched=True, size=2).vote(False).wait()


def test_collectives_of_device_tensors_go_through_the_data_group(monkeypatch):
    # On GPUs the data group is NCCL's and the default group gloo, which would also take CUDA tensors, slowly,
    # through the host: so a collective that forgot its group would not fail there. It fails here.
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        group = torch.distributed.new_group(backend="gloo")
        world = distributed.World(launched=True, backend="gloo", data=group)
        used = []
        for name in ("all_reduce", "broadcast"):
            collective = getattr(torch.distributed, name)
            monkeypatch.setattr(torch.distributed, name, lambda *tensors, collective=collective, **options:
                                used.append(options.get("group")) or collective(*tensors, **options))
        world.add_up(torch.ones(2), torch.tensor(3))
        world.minimum(torch.ones(1))
        world.share_buffers(torch.nn.BatchNorm2d(2))
        benchmark.measure_all_reduce(torch.device("cpu"), 1, world)
        assert len(used) == 2 + 3 + 3 and all(g is group for g in used)  # the device's tensors
        used.clear()
        gather = torch.distributed.all_gather_object
        monkeypatch.setattr(torch.distributed, "all_gather_object", lambda *objects, **options:
                            used.append(options.get("group")) or gather(*objects, **options))
        world.count(True), world.differing({"a": 1}), world.vote(False).wait()
        assert len(used) == 3 and all(g is None for g in used)  # decisions: CPU values, on the default gloo group
    finally:
        torch.distributed.destroy_process_group()


def test_an_error_is_said_once_a_machine_and_left_for_torchruns_report(tmp_path, monkeypatch, capsys):
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    second_of_machine_2 = distributed.World(rank=3, local_rank=1, size=4, local_size=2, launched=True)
    first_of_machine_2 = distributed.World(rank=2, local_rank=0, size=4, local_size=2, launched=True)
    shared = train.UsageError("--batch-size 6 is the global batch and does not divide among 4 processes")
    distributed.report_error(second_of_machine_2, "train.py", shared, f"error: {shared}", train.SAID_ONCE_A_MACHINE)
    assert capsys.readouterr().err == ""  # the machine's first process says it
    record = json.loads(error_file.read_text())["message"]  # where torchrun's failure report reads it
    assert record["message"] == record["extraInfo"]["py_callstack"] == f"train.py (rank 3): error: {shared}"
    distributed.report_error(first_of_machine_2, "train.py", shared, f"error: {shared}", train.SAID_ONCE_A_MACHINE)
    assert capsys.readouterr().err == f"train.py (rank 2): error: {shared}\n"
    own = devices.DeviceError("--device cuda asked for, but PyTorch sees no CUDA GPU")  # this machine's alone
    distributed.report_error(second_of_machine_2, "train.py", own, f"error: {own}", train.SAID_ONCE_A_MACHINE)
    assert capsys.readouterr().err == f"train.py (rank 3): error: {own}\n"


def test_torchruns_root_cause_is_the_process_that_says_why(tmp_path, monkeypatch):
    # Rank 1 fails alone (at 100.95 s); rank 0 stops with it (at 101.02 s) and unwinds faster. torchrun's
    # report names the earliest error file its "Root Cause" (whole seconds; a tie goes to the failure it
    # noticed first), which must be rank 1's line, not rank 0's "another process failed", however late
    # rank 1 gets to say it. torch's own classes read the files; a recorder stands in for the count.
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
    monkeypatch.setattr(distributed.World, "count", lambda self, flag: 1)  # one rank failed
    clock = iter([1_800_000_100.95, 1_800_000_101.02])  # rank 1 meets its error, then rank 0 learns of it
    monkeypatch.setattr(distributed.time, "time", lambda: next(clock))
    errors = {}

    def fail():
        raise devices.DeviceError("--device cuda asked for, but PyTorch sees no CUDA GPU")
    for rank, here in ((1, True), (0, False)):
        with pytest.raises(Exception) as raised:
            distributed.World(rank=rank, local_rank=rank, size=2, local_size=2, launched=True).together(fail, here=here)
        errors[rank] = raised.value
    assert isinstance(errors[0], distributed.ElsewhereFailed)
    clock = iter([1_800_000_101.1, 1_800_000_103.5])  # rank 0 says its line at once, rank 1 seconds later
    monkeypatch.setattr(distributed.time, "time", lambda: next(clock))
    failures = {}
    for rank in (0, 1):  # torchrun notices rank 0 first
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / f"error-{rank}.json"))
        world = distributed.World(rank=rank, local_rank=rank, size=2, local_size=2, launched=True)
        distributed.report_error(world, "train.py", errors[rank], f"error: {errors[rank]}", train.SAID_ONCE_A_MACHINE)
        failures[rank] = ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=2,
                                        error_file=str(tmp_path / f"error-{rank}.json"))
    rank, first = ChildFailedError("train.py", failures).get_first_failure()
    assert (rank, first.message["message"]) == (1, "train.py (rank 1): error: --device cuda asked for, but PyTorch "
                                                    "sees no CUDA GPU")
