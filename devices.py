"""The machine's facts and every decision that depends on them, as plain functions a test can feed: no
GPU may be at hand where this is tested, yet most users train on one. `read_facts` asks the hardware and
`check_computes` runs on it; the decisions take plain facts (a device type, a compute capability, a byte
count), so tests call them with a T4's or a Mac's on a CPU. Nothing happens on import.

    device = devices.pick_device("auto")                    # cuda, then mps, then cpu
    devices.choose_precision("auto", devices.read_facts(device))  # 'fp16' on a T4, 'bf16' on an A100 or H100
"""
import contextlib
import multiprocessing
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# cuDNN has bf16 convolution kernels from Ampere (compute capability 8.0) on; below that bf16 runs on
# slow fallback kernels although torch.cuda.is_bf16_supported() says True (it counts emulation).
BF16_MIN_CAPABILITY = (8, 0)
PRECISION_HELP = ("auto: bf16 on NVIDIA GPUs of compute capability 8.0 and above (A100, H100, RTX 30xx/40xx: "
                  "bf16 tensor cores) and on CPUs with AVX512-BF16 or AMX; fp16 with a grad scaler on older "
                  "NVIDIA GPUs (T4, RTX 20xx; V100 with another torch build: no bf16 kernels); else fp32")


class DeviceError(ValueError):
    """A device or setting this machine cannot provide; one line that says what to do instead."""


@dataclass(frozen=True)
class Facts:
    """What the decisions below need to know about the machine."""
    device_type: str                 # "cuda", "mps" or "cpu"
    capability: tuple = None         # CUDA compute capability, (7, 5) on a T4, (9, 0) on an H100
    cpu_bf16: bool = False           # oneDNN has fast bf16 kernels (AVX512-BF16 or AMX)
    platform: str = sys.platform


# ----------------------------------------------------------------------------- asking the hardware

def cpu_supports_bf16(machine=None):
    """The CPU has bf16 instructions (x86: AVX512-BF16 or AMX; ARM: what oneDNN reports); elsewhere bf16 is
    slower than fp32. On x86, oneDNN's own check says yes for any AVX-512 CPU, which emulates bf16."""
    machine = (machine or platform.machine()).lower()
    try:
        if machine in ("x86_64", "amd64", "i386", "i686"):
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def read_facts(device):
    capability = tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None
    return Facts(device.type, capability, cpu_supports_bf16() if device.type == "cpu" else False, sys.platform)


def free_shared_memory(path="/dev/shm"):
    """Bytes free where DataLoader workers hand batches over, or None where there is none (macOS, Windows)."""
    try:
        stats = os.statvfs(path)
    except (OSError, AttributeError):
        return None
    return stats.f_bavail * stats.f_frsize


def worker_start_method():
    """'fork' (Linux up to Python 3.13), 'forkserver' (Linux from 3.14) or 'spawn' (macOS, Windows); asked
    without fixing it, as get_start_method() would (a notebook's later set_start_method() would fail)."""
    return multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]


# ----------------------------------------------------------------------------- decisions

def choose_device(name, cuda_available, mps_is_available, nvidia_driver=None, torch_build=None):
    """'auto' -> cuda, then mps, then cpu; an explicit device must exist. Returns the device type.
    nvidia_driver: the driver version of this machine's NVIDIA GPU (None: none); torch_build: '13.0' (CUDA),
    'ROCm 6.2' or None (CPU only). A GPU torch cannot use is said: --device auto would train on the CPU."""
    if name not in ("auto", "cuda", "mps", "cpu"):
        raise DeviceError(f"unknown --device {name!r}; use auto, cuda, mps or cpu")
    if name in ("auto", "cuda") and not cuda_available and nvidia_driver is not None:
        raise DeviceError(unusable_gpu(nvidia_driver, torch_build))
    if name == "auto":
        return "cuda" if cuda_available else "mps" if mps_is_available else "cpu"
    if name == "cuda" and not cuda_available:
        raise DeviceError("--device cuda asked for, but PyTorch sees no CUDA GPU (none found, or hidden by "
                          "CUDA_VISIBLE_DEVICES); use --device cpu")
    if name == "mps" and not mps_is_available:
        raise DeviceError("--device mps asked for, but this machine has no MPS; use --device cpu")
    return name


# The oldest NVIDIA driver that runs each CUDA major version's builds (CUDA's minor version compatibility).
MIN_DRIVER_FOR_CUDA = {12: 525, 13: 580}
CUDA_12_BUILD = ("pip uninstall -y torch torchvision && pip install torch torchvision --index-url "
                 "https://download.pytorch.org/whl/cu126 (CUDA 12.6: drivers from 525 on)")


def unusable_gpu(driver, torch_build):
    """The one line for an NVIDIA GPU that this torch cannot use, naming the driver, the build and the fix."""
    found = f"this machine has an NVIDIA GPU (driver {driver or 'of unknown version'})"
    cpu = "or give --device cpu to train on the CPU"
    driver_major = int(driver.split(".")[0]) if re.match(r"\d+", driver or "") else None
    if driver_major is not None and driver_major < MIN_DRIVER_FOR_CUDA[12]:
        return (f"{found}, older than any torch from 2.9 on can use (CUDA 12 builds need driver 525 or newer): "
                f"update the driver; {cpu}")
    if torch_build is None or torch_build.startswith("ROCm"):
        kind = "a CPU-only build" if torch_build is None else f"a {torch_build} build (for AMD GPUs)"
        return f"{found}, but this torch is {kind}: install a CUDA build, {CUDA_12_BUILD}; {cpu}"
    needed = MIN_DRIVER_FOR_CUDA.get(int(torch_build.split(".")[0]))
    if needed and driver_major is not None and driver_major < needed:
        return (f"{found}, but this torch was built for CUDA {torch_build}, which needs driver {needed} or newer: "
                f"update the driver, or replace torch with a build for CUDA 12, {CUDA_12_BUILD}; {cpu}")
    return (f"{found}, but this torch (built for CUDA {torch_build}) cannot use it: check nvidia-smi and "
            f"CUDA_VISIBLE_DEVICES; {cpu}")


def gpus_hidden(visible):
    """Whether CUDA_VISIBLE_DEVICES hides every GPU: CUDA stops at a first entry that is not an index or UUID."""
    if visible is None:
        return False
    first = visible.split(",")[0].strip()
    return not (first.isdigit() or first.startswith(("GPU-", "MIG-")))


def nvidia_driver_version(proc_file="/proc/driver/nvidia/version", nvidia_smi="nvidia-smi", dev="/dev"):
    """The NVIDIA driver's version ('550.54.15') where this machine has its GPU, '' where it cannot be read,
    None where there is none to use: no GPU device (a container sees its host's driver without the GPUs)
    or every GPU hidden by CUDA_VISIBLE_DEVICES."""
    nodes = ("nvidiactl", "dxg")  # dxg: WSL's GPU, which has nvidia-smi but no /proc entry
    if gpus_hidden(os.environ.get("CUDA_VISIBLE_DEVICES")) or not any(
            os.path.exists(os.path.join(dev, node)) for node in nodes):
        return None
    with contextlib.suppress(OSError):
        with open(proc_file) as f:  # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar ..."
            found = re.search(r"Kernel Module.*?\s(\d+\.\d+(?:\.\d+)?)\s", f.read())
            return found.group(1) if found else ""
    if shutil.which(nvidia_smi) is None:
        return None
    try:
        answer = subprocess.run([nvidia_smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    versions = answer.stdout.split()
    return versions[0] if answer.returncode == 0 and versions else None


def pick_device(name, index=None):
    """The torch.device for --device NAME; `index` picks one of several GPUs (torchrun's LOCAL_RANK)."""
    cuda = torch.cuda.is_available()
    driver = None if cuda or name not in ("auto", "cuda") else nvidia_driver_version()
    hip = getattr(torch.version, "hip", None)
    kind = choose_device(name, cuda, torch.backends.mps.is_available(), driver,
                         torch.version.cuda or (f"ROCm {hip}" if hip else None))
    if kind == "cuda" and index is not None:
        visible = torch.cuda.device_count()
        if index >= visible:
            raise DeviceError(f"this process has LOCAL_RANK {index}, but this machine shows {visible} GPU(s): "
                              f"give torchrun --nproc_per_node {visible} or fewer")
        # The current device is what "cuda" means to RNG states, synchronize() and DataLoader's pinning thread.
        torch.cuda.set_device(index)
        return torch.device(kind, index)
    return torch.device(kind)


def check_computes(device):
    """A GPU that fails at its first computation (a driver problem, an ECC error, exclusive mode) fails here,
    among the checks, in one line: not in a traceback later, nor while torchrun's other machines wait."""
    if device.type == "cpu":
        return
    try:
        torch.ones(1, device=device).add_(1).item()  # .item(): a sync point, where a failed kernel is raised
    except RuntimeError as error:
        raise DeviceError(f"{device} cannot compute ({first_line(error)}); check the GPU (nvidia-smi), or use "
                          f"--device cpu") from None


def first_line(error):
    """An exception's message in one line (CUDA's run to many), or its type's name."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:160]


def choose_precision(requested, facts):
    """--precision auto resolved for the machine: 'bf16', 'fp16' or 'fp32'; an explicit choice stays."""
    if requested != "auto":
        return requested
    if facts.device_type == "cuda":
        return "bf16" if facts.capability >= BF16_MIN_CAPABILITY else "fp16"
    if facts.device_type == "cpu":
        return "bf16" if facts.cpu_bf16 else "fp32"
    return "fp32"


def precision_warning(precision, facts):
    """A one-line warning for a precision that runs slowly on this machine, or None."""
    if precision == "fp16" and facts.device_type == "cpu":
        # Measured on a 2-core AMD EPYC: 12.7 s per training step of 32 images in fp16, 0.34 s in bf16 (37x);
        # 2.9 s and 0.12 s at 8 images (25x).
        return ("fp16 on a CPU is very slow (reference kernels: 25 to 37 times slower than bf16 on a 2-core EPYC); "
                "it runs here so that the GPU's fp16 + grad scaler path can be tried anywhere. For speed use "
                "--precision bf16 or fp32")
    if precision == "bf16" and facts.device_type == "cuda" and facts.capability < BF16_MIN_CAPABILITY:
        major, minor = facts.capability
        return (f"bf16 on a GPU of compute capability {major}.{minor} runs on slow fallback kernels (bf16 "
                f"tensor cores start at 8.0); --precision auto picks fp16 here")
    if precision == "bf16" and facts.device_type == "cpu" and not facts.cpu_bf16:
        return "this CPU has no bf16 kernels (AVX512-BF16 or AMX): bf16 runs slower than fp32 here"
    return None


def compile_problem(facts):
    """Why torch.compile cannot run here, or None: Triton needs compute capability 7.0 (not a P100, GTX 10xx)."""
    if facts.device_type == "cuda" and facts.capability < (7, 0):
        major, minor = facts.capability
        return (f"--compile needs a GPU of compute capability 7.0 or above (Triton); this one has {major}.{minor}: "
                f"train without --compile")
    return None


def build_problem(capability, arch_list):
    """Why this PyTorch build has no kernels for this GPU, or None: a GPU older than every architecture the
    build lists fails at its first kernel (torch 2.14's CUDA 13 wheels start at sm_75, without the V100's)."""
    # Source builds may name architectures with a suffix (sm_90a, sm_100f): the digits count.
    built = sorted(int(re.match(r"sm_(\d+)", arch).group(1)) for arch in arch_list if re.match(r"sm_\d+", arch))
    major, minor = capability
    if built and major * 10 + minor < built[0]:
        return (f"this PyTorch build has GPU kernels from compute capability {built[0] // 10}.{built[0] % 10} on; "
                f"this GPU has {major}.{minor}: install a PyTorch build for it (an older CUDA version), or "
                f"use --device cpu")
    return None


def fused_optimizer(device_type):
    """CUDA's fused SGD also spares the fp16 grad scaler its per-step sync (found_inf.item() when unfused)."""
    return device_type == "cuda"


def pin_memory(device_type):
    """Page-locked batches let the copy to a CUDA GPU run asynchronously; elsewhere they only cost."""
    return device_type == "cuda"


def peak_resident_mib(ru_maxrss, platform_name=sys.platform):
    """getrusage's ru_maxrss in MiB: Linux counts it in KiB, macOS in bytes."""
    return ru_maxrss / 2**20 if platform_name == "darwin" else ru_maxrss / 1024


def backend_settings(device_type, deterministic):
    """The process-wide switches a run wants, by name (see SETTINGS); `applied` restores them afterwards."""
    settings = {"deterministic_algorithms": (deterministic, False)}
    if deterministic:
        # cuBLAS is deterministic only with a fixed workspace (CUDA docs, "Reproducibility").
        settings.update(cublas_workspace_config=":4096:8", cudnn_benchmark=False)
    if device_type == "cuda":
        # Fixed input shapes: cuDNN's autotuner finds the fastest kernels once. TF32 matters only for
        # fp32 work (the fp32 path, and the parts autocast leaves in fp32) on Ampere and newer.
        settings.update(matmul_tf32=True, cudnn_tf32=True, cudnn_benchmark=not deterministic)
    return settings


def _attribute(owner, name):
    return (lambda: getattr(owner, name)), (lambda value: setattr(owner, name, value))


def _set_environment(name, value):
    os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)


# name -> (read, write) of every process-wide switch that backend_settings may change, then of the newer
# precision API that the TF32 flags change behind the scenes: `applied` puts them all back, in this order.
# Last: once allow_tf32 was written, torch.get_float32_matmul_precision() raises ("mix of the legacy and
# new APIs") until it is set again; a notebook's "medium" would otherwise be broken by a run.
SETTINGS = {
    "deterministic_algorithms": (
        lambda: (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()),
        lambda value: torch.use_deterministic_algorithms(value[0], warn_only=value[1])),
    "cublas_workspace_config": (lambda: os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
                                lambda value: _set_environment("CUBLAS_WORKSPACE_CONFIG", value)),
    "cudnn_benchmark": _attribute(torch.backends.cudnn, "benchmark"),
    "matmul_tf32": _attribute(torch.backends.cuda.matmul, "allow_tf32"),
    "cudnn_tf32": _attribute(torch.backends.cudnn, "allow_tf32"),
}
PRECISION_SETTINGS = {
    "matmul_fp32_precision": _attribute(torch.backends.cuda.matmul, "fp32_precision"),
    "cudnn_conv_fp32_precision": _attribute(torch.backends.cudnn.conv, "fp32_precision"),
    "cudnn_rnn_fp32_precision": _attribute(torch.backends.cudnn.rnn, "fp32_precision"),
    "float32_matmul_precision": (torch.get_float32_matmul_precision, torch.set_float32_matmul_precision),
}


@contextlib.contextmanager
def applied(settings):
    """Apply process-wide settings inside the block and put back what was there on leaving: a run may
    live inside a notebook or a test, which must not inherit them. A value that cannot be read is left
    alone: once a program has used the newer fp32_precision API, torch refuses to read the legacy
    allow_tf32 flags; the program chose its own precision."""
    before = {}
    for name, (read, _) in [*((name, SETTINGS[name]) for name in settings), *PRECISION_SETTINGS.items()]:
        with contextlib.suppress(RuntimeError):
            before[name] = read()
    try:
        for name in settings:
            if name in before:
                SETTINGS[name][1](settings[name])
        yield
    finally:
        for name, value in before.items():
            {**SETTINGS, **PRECISION_SETTINGS}[name][1](value)


def dataset_in_shared_memory(start_method):
    """Under spawn and forkserver every worker would unpickle its own copy of the dataset; a forked worker
    shares its parent's memory already, copy-on-write."""
    return start_method in ("spawn", "forkserver")


def fit_prefetch(free_bytes, workers, batch_bytes, dataset_bytes=0, wanted=4):
    """Batches each DataLoader worker may prepare ahead so that they (and the dataset, when shared) fit in
    half the free shared memory. DeviceError when not one batch each fits: Docker gives containers 64 MB
    unless told otherwise, and a worker that runs out dies with "Bus error"."""
    if workers == 0 or free_bytes is None:
        return wanted
    budget = free_bytes // 2 - dataset_bytes
    prefetch = min(wanted, budget // (workers * batch_bytes)) if budget > 0 else 0
    if prefetch < 1:
        needed = 2 * (dataset_bytes + workers * batch_bytes)
        raise DeviceError(f"/dev/shm has {free_bytes / 1e6:.1f} MB free, but {workers} DataLoader workers need "
                          f"about {needed / 1e6:.1f} MB of shared memory; give the container more (docker run "
                          f"--shm-size 1g) or use fewer --workers (0 uses none)")
    return int(prefetch)


# ----------------------------------------------------------------------------- state that must travel

def on_cpu(tree):
    """The nested dicts/lists with every tensor copied to the CPU (a copy even there: training goes on changing
    the original). CPU tensors load on any machine, without map_location."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {key: on_cpu(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(on_cpu(value) for value in tree)
    return tree


def rng_state(device_type, cuda=torch.cuda):
    """The random state a resume needs: the CPU generator's and the current GPU's (one, whatever the number
    of GPUs: a run may resume on a machine that has fewer)."""
    state = {"torch": torch.get_rng_state()}
    if device_type == "cuda":
        state["cuda"] = cuda.get_rng_state()
    return state


def restore_rng_state(state, device_type, cuda=torch.cuda):
    torch.set_rng_state(state["torch"])
    if device_type == "cuda" and "cuda" in state:
        cuda.set_rng_state(state["cuda"])


def describe_cpu():
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "CPU"


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        cores, threads = os.cpu_count() or 1, torch.get_num_threads()
        return f"{describe_cpu()} ({cores} core{'s' * (cores != 1)}, {threads} thread{'s' * (threads != 1)})"
    return device.type
