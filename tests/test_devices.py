"""GPUs and Macs decided on a CPU: every device-dependent choice fed the facts of machines this is not."""
import argparse
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import augment
import devices
import distributed
import gradcam
import loop
import resnet
import runfiles
import train

from helpers import (CLASSES, HERE, coloured_images, error_lines, fp16_args, interrupt_after_epoch,
                     process_settings, run_main, save_test_images, tiny_args)


@pytest.mark.parametrize("capability, expected", [
    ((6, 0), "fp16"), ((7, 0), "fp16"), ((7, 5), "fp16"),   # P100, V100, T4 / RTX 20xx: no bf16 kernels
    ((8, 0), "bf16"), ((8, 6), "bf16"), ((9, 0), "bf16"),   # A100, RTX 30xx, H100
])
def test_auto_precision_follows_the_gpus_compute_capability(capability, expected):
    assert devices.choose_precision("auto", devices.Facts("cuda", capability)) == expected
    assert devices.choose_precision("fp32", devices.Facts("cuda", capability)) == "fp32"
    slow_bf16 = devices.precision_warning("bf16", devices.Facts("cuda", capability))
    assert (slow_bf16 is not None) == (expected == "fp16")


@pytest.mark.parametrize("driver, build, said", [
    ("550.54.15", "13.0", ["driver 550.54.15", "built for CUDA 13.0", "driver 580 or newer", "pip uninstall",
                           "whl/cu126"]),                                                  # Colab's driver, torch's CUDA 13
    ("560.35.03", None, ["driver 560.35.03", "CPU-only build", "whl/cu126"]),
    ("560.35.03", "ROCm 6.2", ["a ROCm 6.2 build", "whl/cu126"]),
    ("470.82.01", "12.6", ["driver 470.82.01", "update the driver"]),                     # too old for any build
    ("580.65.06", "13.0", ["driver 580.65.06", "cannot use it", "CUDA_VISIBLE_DEVICES"]),  # new enough: hidden?
    ("", "12.8", ["driver of unknown version", "CUDA 12.8"]),
])
def test_a_gpu_that_torch_cannot_use_is_said_not_skipped(driver, build, said):
    for name in ("auto", "cuda"):
        with pytest.raises(devices.DeviceError) as raised:
            devices.choose_device(name, False, False, nvidia_driver=driver, torch_build=build)
        assert all(part in str(raised.value) for part in said), str(raised.value)
    assert ("whl/cu126" in str(raised.value)) == ("whl/cu126" in said)  # no build for a driver below 525
    assert devices.choose_device("cpu", False, False, driver, build) == "cpu"  # the CPU on purpose
    assert devices.choose_device("auto", True, False, driver, build) == "cuda"
    assert devices.choose_device("auto", False, False, None, build) == "cpu"  # no NVIDIA GPU here


def test_the_nvidia_driver_version_is_read_where_a_gpu_is(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    proc, dev, no_smi = tmp_path / "version", tmp_path / "dev", "absent-nvidia-smi"
    dev.mkdir()
    (dev / "nvidiactl").touch()
    for text, version in [
            ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n", "550.54.15"),
            ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  (dvs-builder@U)\n",
             "580.65.06"),
            ("something else\n", "")]:
        proc.write_text(text)
        assert devices.nvidia_driver_version(str(proc), no_smi, str(dev)) == version
    # A container without its host's GPUs still sees the host's driver in /proc: no device, no GPU.
    assert devices.nvidia_driver_version(str(proc), no_smi, str(tmp_path / "empty")) is None
    missing = str(tmp_path / "missing")
    assert devices.nvidia_driver_version(missing, no_smi, str(dev)) is None
    smi = tmp_path / "nvidia-smi"  # WSL: nvidia-smi and /dev/dxg, but no /proc/driver/nvidia
    smi.write_text("#!/bin/sh\necho 552.22\n")
    smi.chmod(0o755)
    assert devices.nvidia_driver_version(missing, str(smi), str(dev)) == "552.22"
    proc.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 2024\n")
    for hidden in ("", "-1", "none", "-1,0"):  # every GPU hidden on purpose: the CPU is what was asked for
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert devices.nvidia_driver_version(str(proc), no_smi, str(dev)) is None, hidden
    for shown in ("0", "1,0", "GPU-8f6c1b2a"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", shown)
        assert devices.nvidia_driver_version(str(proc), no_smi, str(dev)) == "550.54.15", shown


def test_default_workers_leave_a_core_to_the_training_process(monkeypatch):
    for cores, processes, workers in [(2, 1, 1), (1, 1, 1), (16, 1, 15), (64, 1, 16), (16, 8, 1), (96, 8, 11)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, cores=cores: set(range(cores)), raising=False)
        assert augment.default_workers(processes) == workers, (cores, processes)


def test_sync_bn_with_compile_warns_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(devices, "pick_device", lambda name, index: torch.device("cuda", 0))  # an H100's facts
    monkeypatch.setattr(devices, "read_facts", lambda device: devices.Facts("cuda", (9, 0)))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_90"])
    monkeypatch.setattr(devices, "check_computes", lambda device: None)
    args = argparse.Namespace(device="cuda", precision="auto", compile=True, sync_bn=True)
    loop.resolve_device(args, distributed.World(launched=True, size=2, local_size=2))
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--sync-bn with --compile" in err
    loop.resolve_device(argparse.Namespace(**dict(vars(args), compile=False)), distributed.World(launched=True, size=2))
    assert capsys.readouterr().err == ""


def test_auto_precision_on_cpus_and_macs():
    assert devices.choose_precision("auto", devices.Facts("cpu", cpu_bf16=True)) == "bf16"
    assert devices.choose_precision("auto", devices.Facts("cpu", cpu_bf16=False)) == "fp32"
    assert devices.choose_precision("auto", devices.Facts("mps", platform="darwin")) == "fp32"
    assert "slow" in devices.precision_warning("fp16", devices.Facts("cpu"))


def test_cpu_bf16_needs_the_instructions_not_just_avx512(monkeypatch):
    # oneDNN's own check says yes on any AVX-512 CPU (Skylake to Ice Lake servers), which emulates bf16.
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    for avx512_bf16, amx, expected in [(False, False, False), (True, False, True), (False, True, True)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        assert devices.cpu_supports_bf16("x86_64") is expected
    assert devices.cpu_supports_bf16("aarch64")  # ARM: oneDNN's answer


def test_a_t4_gets_fp16_although_torch_calls_bf16_supported(monkeypatch, capsys):
    # torch.cuda.is_bf16_supported() is True on a T4 (it counts emulation); the capability decides.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    probed = []
    monkeypatch.setattr(devices, "check_computes", probed.append)  # no GPU here to run its first computation
    args = train.build_parser().parse_args(["--device", "cuda"])
    assert loop.resolve_device(args) == (torch.device("cuda"), "fp16") and probed == [torch.device("cuda")]
    loop.resolve_device(train.build_parser().parse_args(["--device", "cuda", "--precision", "bf16"]))
    assert "slow fallback kernels" in capsys.readouterr().err


class OneGpu:
    """torch.cuda's RNG calls on a machine with one GPU, recording what is set."""

    def __init__(self, index=0):
        self.index, self.set = index, []

    def current_device(self):
        return self.index

    def get_rng_state(self, device="cuda"):
        return torch.full((16,), 7, dtype=torch.uint8)

    def set_rng_state(self, state, device="cuda"):
        self.set.append(state)


def test_resume_on_fewer_gpus_than_saved(monkeypatch):
    gpu = OneGpu()
    saved = devices.rng_state("cuda", gpu)
    assert isinstance(saved["cuda"], torch.Tensor)  # one state, not one per GPU of the machine
    devices.restore_rng_state(saved, "cuda", gpu)
    assert torch.equal(gpu.set[-1], saved["cuda"])
    devices.restore_rng_state(saved, "cpu", gpu)  # a CUDA run resumed on a CPU
    assert len(gpu.set) == 1


def tensors_in(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from tensors_in(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from tensors_in(value)


def test_checkpoint_of_a_gpu_run_holds_cpu_tensors(monkeypatch):
    # FakeTensorMode makes tensors that are on "cuda" as far as every torch call can tell, without a GPU.
    from torch._subclasses.fake_tensor import FakeTensorMode
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.zeros(16, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.zeros(16, dtype=torch.uint8)] * 2)
    args = train.build_parser().parse_args([])
    data = augment.ImageData(None, None, None, None, CLASSES, augment.CIFAR10_MEAN, augment.CIFAR10_STD, True)
    with torch.device("meta"):  # no initial values: torch 2.9's fake uniform_ would draw them on a real GPU
        model = resnet.resnet18()
    with FakeTensorMode(allow_non_fake_inputs=True), torch.device("cuda"):
        model = model.to_empty(device="cuda")
        trainer = loop.Trainer(model, args, "bf16", torch.device("cuda"), augment.CIFAR10_MEAN,
                                  augment.CIFAR10_STD, steps_per_epoch=10)
        for parameter in model.parameters():  # what SGD's first step creates
            trainer.optimizer.state[parameter]["momentum_buffer"] = torch.zeros_like(parameter)
        assert next(model.parameters()).device.type == "cuda"
        checkpoint = runfiles.build_checkpoint(trainer, args, data, 1, [], None)
    tensors = list(tensors_in(checkpoint))
    assert len(tensors) > 2 * len(list(model.parameters())) and {t.device.type for t in tensors} == {"cpu"}


def test_precision_is_the_machines_on_resume(fp16_data_dir, tmp_path, monkeypatch, capsys):
    # An A100's bf16 run goes on in fp16 on a T4, then in fp32 on a CPU: precision is not the recipe.
    resume = ["--resume", str(tmp_path / "last.pt"), "--device", "cpu", "--workers", "0", "--data-dir",
              fp16_data_dir]
    interrupt_after_epoch(monkeypatch, 1)
    code, err = run_main(train, fp16_args(fp16_data_dir, tmp_path, "--epochs", "3", "--precision", "bf16"), capsys)
    assert code == 130, err
    assert torch.load(tmp_path / "last.pt", weights_only=True)["scaler"] == {}  # bf16 needs no scaler
    interrupt_after_epoch(monkeypatch, 2)
    code, err = run_main(train, [*resume, "--precision", "fp16"], capsys)
    assert code == 130 and "ignoring" not in err, err
    assert torch.load(tmp_path / "last.pt", weights_only=True)["scaler"]["scale"] > 0  # a fresh scaler ran
    monkeypatch.undo()
    code, err = run_main(train, [*resume, "--precision", "fp32"], capsys)
    assert code == 0 and "ignoring" not in err, err
    log = json.loads((tmp_path / "log.json").read_text())
    assert [r["epoch"] for r in log["epochs"]] == [1, 2, 3] and log["environment"]["precision"] == "fp32"


def test_fp16_overflowing_steps_are_skipped_not_fatal(fp16_data_dir, tmp_path, monkeypatch, capsys):
    # A loss scale of 2**40 makes every early fp16 gradient overflow: the scaler skips those steps and
    # halves the scale. That is no divergence, and the schedule goes on without warning.
    scaler = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled: scaler(device, 2.0**40, enabled=enabled))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, err = run_main(train, fp16_args(fp16_data_dir, tmp_path), capsys)
    assert code == 0, err
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)], [str(w.message) for w in caught]
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    assert checkpoint["scaler"]["scale"] == 2.0**40 / 2**4  # 2 epochs x 2 steps, each skipped
    assert checkpoint["scheduler"]["last_epoch"] == 4  # the schedule counted the skipped steps


def test_only_cuda_pins_batches():
    # Non-blocking copies only from pinned memory, and only CUDA gets pinned batches.
    assert [devices.pin_memory(kind) for kind in ("cuda", "mps", "cpu")] == [True, False, False]
    images, labels = coloured_images(64, 0)
    args = train.build_parser().parse_args(["--batch-size", "32"])
    loader, _ = augment.make_train_loader(images, labels, args, augment.CIFAR10_MEAN, torch.device("mps"), 0)
    assert not loader.pin_memory


def test_peak_memory_units_by_platform():
    assert devices.peak_resident_mib(2048, "linux") == 2  # KiB on Linux
    assert devices.peak_resident_mib(2 * 2**20, "darwin") == 2  # bytes on macOS


def test_gradcam_accepts_mps_and_says_when_absent(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    code, err = run_main(gradcam, ["--image", save_test_images(tmp_path)[0], "--device", "mps"], capsys)
    assert code == 2 and "this machine has no MPS" in err and len(err.strip().splitlines()) == 1, err


def test_backend_settings_by_device():
    cuda = devices.backend_settings("cuda", deterministic=False)
    assert cuda["cudnn_benchmark"] and cuda["matmul_tf32"] and cuda["cudnn_tf32"]
    assert cuda["deterministic_algorithms"] == (False, False)
    exact = devices.backend_settings("cuda", deterministic=True)
    assert not exact["cudnn_benchmark"] and exact["cublas_workspace_config"] == ":4096:8"
    assert "cudnn_benchmark" not in devices.backend_settings("cpu", deterministic=False)


def test_training_leaves_process_settings_as_found(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)  # as a notebook might have set it
    before = process_settings()
    with devices.applied(devices.backend_settings("cuda", deterministic=True)):
        assert process_settings() != before
    assert process_settings() == before
    assert train.main(tiny_args(data_dir, tmp_path, "--deterministic", "--epochs", "1")) == 0
    assert process_settings() == before


def test_a_programs_own_precision_settings_survive_a_run():
    # A notebook that chose TF32 with the newer API (torch refuses to read the legacy flags after that)
    # and deterministic algorithms in warn-only mode gets both back as they were. Set and put back by
    # plain assignment: fp32_precision is a property computed by torch, which monkeypatch's undo (pytest
    # 9.2 deletes what it set) cannot take away.
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with devices.applied(devices.backend_settings("cuda", deterministic=True)):
            assert torch.are_deterministic_algorithms_enabled()
        assert matmul.fp32_precision == "tf32"
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
        matmul.fp32_precision = before


def test_a_notebooks_float32_matmul_precision_survives_a_gpu_run():
    # Writing the legacy allow_tf32 flag makes torch.get_float32_matmul_precision() raise ("mix of the
    # legacy and new APIs") until the precision is set again.
    torch.set_float32_matmul_precision("medium")
    try:
        with devices.applied(devices.backend_settings("cuda", deterministic=False)):
            pass
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision("highest")


def test_compile_and_fused_sgd_by_gpu():
    assert "7.0" in devices.compile_problem(devices.Facts("cuda", (6, 1)))  # P100, GTX 10xx: no Triton
    assert devices.compile_problem(devices.Facts("cuda", (7, 5))) is None
    assert devices.compile_problem(devices.Facts("cpu")) is None
    assert devices.fused_optimizer("cuda") and not devices.fused_optimizer("cpu")


def test_asking_the_start_method_does_not_fix_it():
    code = ("import multiprocessing, devices; devices.worker_start_method(); "
            "assert multiprocessing.get_start_method(allow_none=True) is None")
    assert subprocess.run([sys.executable, "-c", code], cwd=HERE).returncode == 0


def test_model_inputs_have_one_layout_whatever_the_source():
    # Test images are permuted views; a padded last batch is a fresh tensor: the model sees one layout.
    images = augment.to_tensor(coloured_images(10, 0)[0])
    for channels_last in (True, False):
        args = train.build_parser().parse_args([] if channels_last else ["--no-channels-last"])
        trainer = loop.Trainer(resnet.resnet18(), args, "fp32", torch.device("cpu"), augment.CIFAR10_MEAN,
                                  augment.CIFAR10_STD, steps_per_epoch=1)
        assert trainer.inputs(images[:8]).stride() == trainer.inputs(loop.padded(images[8:], 8)).stride()


@pytest.mark.parametrize("free_mb, workers, expected", [
    (8000, 16, 4),    # a normal machine
    (64, 16, 1),      # Docker's default --shm-size: 16 workers with 1 batch each fit in half of it
    (64, 4, 4),
    (None, 16, 4),    # no /dev/shm to count (macOS, Windows)
])
def test_prefetch_fits_shared_memory(free_mb, workers, expected):
    batch_bytes = 512 * (3072 + 8)  # a uint8 batch of 512 and its int64 labels
    free = None if free_mb is None else free_mb * 10**6
    assert devices.fit_prefetch(free, workers, batch_bytes) == expected


def test_a_machine_without_dev_shm_gets_a_loader(monkeypatch):
    # macOS and Windows have no /dev/shm: free_shared_memory() says None, and the loader is made anyway.
    monkeypatch.setattr(devices, "free_shared_memory", lambda path="/dev/shm": None)
    images, labels = coloured_images(64, 0)
    args = train.build_parser().parse_args(["--batch-size", "32"])
    loader, _ = augment.make_train_loader(images, labels, args, augment.CIFAR10_MEAN, torch.device("cpu"), 0,
                                         world=distributed.World(size=2, local_size=2))
    assert len(loader) == 2


def test_too_little_shared_memory_is_one_line(data_dir, tmp_path, monkeypatch, capsys):
    with pytest.raises(devices.DeviceError):
        devices.fit_prefetch(200 * 10**6, 4, 10**6, dataset_bytes=150 * 10**6)  # spawn: the dataset counts
    images, labels = coloured_images(64, 0)
    args = train.build_parser().parse_args(["--batch-size", "32"])
    monkeypatch.setattr(devices, "free_shared_memory", lambda path="/dev/shm": 2 * 2 * 32 * 3080)  # 2 uint8 batches in half
    augment.make_train_loader(images, labels, args, augment.CIFAR10_MEAN, torch.device("cpu"), 1)  # uint8 fits
    with pytest.raises(devices.DeviceError):  # float32 batches, 4x the bytes, do not
        augment.make_train_loader(images, labels, args, augment.CIFAR10_MEAN, torch.device("cpu"), 1,
                                normalize_std=augment.CIFAR10_STD)
    monkeypatch.setattr(devices, "free_shared_memory", lambda path="/dev/shm": 100_000)
    capsys.readouterr()
    code, err = run_main(train, tiny_args(data_dir, tmp_path, "--workers", "1"), capsys)
    assert code == 2 and "--shm-size" in err and "--workers" in err and len(error_lines(err)) == 1, err


def test_spawned_workers_share_the_dataset_and_draw_the_same_batches():
    # macOS starts workers by spawn, Linux from Python 3.14 by forkserver: each worker unpickles the
    # dataset, which must then be a handle to shared memory rather than a copy.
    assert devices.dataset_in_shared_memory("spawn") and devices.dataset_in_shared_memory("forkserver")
    assert not devices.dataset_in_shared_memory("fork")
    images, labels = coloured_images(96, 0)
    args = train.build_parser().parse_args(["--batch-size", "32"])
    batches = {}
    for workers, method in ((0, None), (2, "spawn")):
        loader, sampler = augment.make_train_loader(images, labels, args, augment.CIFAR10_MEAN, torch.device("cpu"),
                                                  workers, start_method=method)
        sampler.set_epoch(1)
        batches[method] = [(x, y) for x, y in loader]
        if method == "spawn":
            assert loader.dataset.images.is_shared() and loader.dataset.labels.is_shared()
    assert len(batches["spawn"]) == 3
    for (x0, y0), (x1, y1) in zip(batches[None], batches["spawn"]):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_gpus_this_build_has_no_kernels_for_and_too_few_gpus(monkeypatch):
    cuda_13 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
    assert "a PyTorch build for it" in devices.build_problem((7, 0), cuda_13)  # a V100
    assert devices.build_problem((7, 5), cuda_13) is None and devices.build_problem((12, 1), cuda_13) is None
    assert devices.build_problem((6, 0), []) is None  # a CPU-only build lists nothing: nothing to say
    assert "from compute capability 9.0 on" in devices.build_problem((8, 0), ["sm_90a", "sm_100f", "compute_90"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(devices.DeviceError, match="LOCAL_RANK 2, but this machine shows 2 GPU"):
        devices.pick_device("cuda", 2)


def test_a_device_that_cannot_compute_is_one_line():
    devices.check_computes(torch.device("cpu"))
    # A tensor on the meta device has no values: its .item() fails as a broken GPU's first kernel would.
    with pytest.raises(devices.DeviceError, match=r"^meta cannot compute \(Tensor.item\(\) cannot be called on meta "
                                                  r"tensors\); check the GPU \(nvidia-smi\), or use --device cpu$"):
        devices.check_computes(torch.device("meta"))


def test_cuda_failing_at_start_up_is_one_line(monkeypatch):
    # CUDA's lazy start-up runs at the first query of the GPU's facts; a driver problem raises there.
    def broken_driver(device):
        raise RuntimeError("\n")  # no message at all: the error's kind names it

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(devices, "read_facts", broken_driver)
    with pytest.raises(devices.DeviceError, match=r"^--device cuda: the device cannot be used \(RuntimeError\); check"):
        loop.resolve_device(argparse.Namespace(device="cuda", precision="auto", compile=False))


def test_resume_keeps_this_machines_optimizer_implementation(data_dir, tmp_path):
    # Optimizer.load_state_dict takes every group setting from the checkpoint: a CPU run resumed on a
    # GPU would lose fused SGD (and the fp16 scaler's sync-free step) without care.
    args = train.parse_args(tiny_args(data_dir, tmp_path))
    trainer = loop.Trainer(loop.build_model(10, args, torch.device("cpu")), args, "bf16", torch.device("cpu"),
                               augment.CIFAR10_MEAN, augment.CIFAR10_STD, 2)
    data = augment.load_dataset("cifar10", data_dir, download=False)
    checkpoint = runfiles.build_checkpoint(trainer, args, data, 1, [], None)
    checkpoint["optimizer"]["param_groups"][0].update(fused=True, foreach=False)  # as a GPU run saves it
    before = {k: trainer.optimizer.param_groups[0][k] for k in ("fused", "foreach")}
    runfiles.restore_checkpoint(trainer, checkpoint)
    assert {k: trainer.optimizer.param_groups[0][k] for k in ("fused", "foreach")} == before


def test_resume_puts_momentum_buffers_in_the_parameters_layout(data_dir, tmp_path):
    # A --no-channels-last run resumed with channels_last (the default): loading keeps the saved NCHW
    # buffers, and CUDA's fused SGD refuses a step whose buffers' strides differ from the parameters'.
    def trainer(*flags):
        args = train.parse_args(tiny_args(data_dir, tmp_path, *flags))
        return loop.Trainer(loop.build_model(10, args, torch.device("cpu")), args, "fp32",
                            torch.device("cpu"), augment.CIFAR10_MEAN, augment.CIFAR10_STD, 2), args
    (saved, args), (resumed, _) = trainer("--no-channels-last"), trainer()
    images, labels = coloured_images(8, 0)
    with loop.StopFlag() as stop:  # one step: momentum buffers exist
        loop.train_one_epoch(saved, [(augment.to_tensor(images), torch.from_numpy(labels))], 1, 1, stop, False)
    data = augment.load_dataset("cifar10", data_dir, download=False)
    runfiles.save_checkpoint(runfiles.build_checkpoint(saved, args, data, 1, [], None), tmp_path / "nchw.pt")
    runfiles.restore_checkpoint(resumed, torch.load(tmp_path / "nchw.pt", weights_only=True))
    parameters = list(resumed.model.parameters())
    assert any(p.dim() == 4 and not p.is_contiguous() for p in parameters)  # channels_last conv weights
    for parameter, before in zip(parameters, saved.model.parameters()):
        buffer = resumed.optimizer.state[parameter]["momentum_buffer"]
        assert buffer.stride() == parameter.stride()
        assert torch.equal(buffer, saved.optimizer.state[before]["momentum_buffer"])  # the same values


def test_a_seed_recipe_run_resumes_in_its_own_precision_and_layout(trained_run, tmp_path):
    checkpoint = torch.load(trained_run / "last.pt", weights_only=True)
    checkpoint["args"]["recipe"] = "seed"
    path = tmp_path / "seed.pt"
    torch.save(checkpoint, path)
    defaults = vars(train.parse_args([]))
    resumed, _ = runfiles.args_for_resume(train.parse_args(["--resume", str(path)]), {"resume"}, defaults)
    assert (resumed.precision, resumed.channels_last) == ("fp32", False)
    given = train.parse_args(["--resume", str(path), "--precision", "bf16"])
    assert runfiles.args_for_resume(given, {"resume", "precision"}, defaults)[0].precision == "bf16"  # given: kept


def test_the_cpus_name_counts_in_words(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # one process of two under torchrun, on a 1-core VM
    assert devices.device_name(torch.device("cpu")).endswith("(1 core, 1 thread)")
