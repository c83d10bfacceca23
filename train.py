"""Train ResNet18 (CIFAR variant) on CIFAR-10 with albumentations augmentation.

    python train.py --epochs 50                                        # the default recipe, on a GPU
    python train.py --epochs 2 --train-subset 2000 --test-subset 1000 --device cpu   # a quick check on a CPU
    python train.py --resume last.pt                                   # continue a stopped run
    python train.py --benchmark                                        # where the time goes (no download)

Writes into --out-dir (default: the current folder) log.json (rewritten after every epoch), last.pt
(every epoch, for --resume) and best.pt (the best epoch so far), which is what `gradcam.py` and
`plot_curves.py log.json` read by default. Checkpoints hold only tensors and plain values:
torch.load(path, weights_only=True) reads them.
"""
import argparse
import contextlib
import ctypes
import errno
import io
import json
import os
import platform
import re
import signal
import sys
import threading
import time
import warnings

import numpy as np
import torch
import torch.nn as nn

import augment
import cli
import devices
from resnet import CHECKPOINT_FORMAT, CheckpointError, read_checkpoint, resnet18

LOG_NAME, LAST_NAME, BEST_NAME, LOCK_NAME = "log.json", "last.pt", "best.pt", ".train.lock"
LOG_FORMAT = "resnet18-cifar-log/1"
# Flags that describe the machine rather than the recipe: --resume takes them from the command line (or
# their defaults, resolved for this machine); an A100's bf16 run may go on in fp16 on a T4.
MACHINE_FLAGS = ("device", "precision", "channels_last", "compile", "workers", "resume", "out_dir", "overwrite",
                 "benchmark", "benchmark_steps")
# Where the data are: kept from the checkpoint unless given, so that a resume finds the run's data.
PLACE_FLAGS = ("data_dir", "download")
RUNTIME_FLAGS = MACHINE_FLAGS + PLACE_FLAGS


class UsageError(Exception):
    """Bad input: reported as one line on stderr with exit code 2."""


class Diverged(Exception):
    """The loss became NaN or infinite."""


class Stopped(Exception):
    """SIGINT or SIGTERM arrived; the run stopped at a step boundary."""


class WriteFailed(Exception):
    """A checkpoint or log could not be written (full disk, say); the previous versions are intact."""


# ----------------------------------------------------------------------------- command line

EPILOG = """\
examples:
  python train.py --epochs 50                              the default recipe, on a GPU
  python train.py --device cpu --train-subset 5000 --test-subset 1000 --epochs 8 --batch-size 128
                                                           a quick run on a CPU
  python train.py --resume last.pt                         continue a stopped run
  python train.py --benchmark                              where the time goes (no download)

files: log.json, last.pt and best.pt go into --out-dir (default: the current folder). A folder that
  holds another run's files is refused: continue that run with --resume, choose another --out-dir,
  or give --overwrite to replace it.

resume: --resume takes the recipe and the epoch count from the checkpoint (a recipe flag given
  beside it is ignored, with a warning). --device, --precision, --no-channels-last, --compile and
  --workers describe this machine: they come from the command line (or their defaults). --data-dir
  and --no-download keep the checkpoint's values unless given; --out-dir defaults to the checkpoint's
  folder.

recipe: the defaults are a published recipe, not tuned on any test set: batch 512; SGD with
  Nesterov momentum 0.9 (Sutskever et al. 2013); weight decay 5e-4 (He et al. 2016,
  kuangliu/pytorch-cifar); one-cycle schedule (Smith & Topin 2019) with PyTorch's OneCycleLR shape:
  from peak/25 up to the peak over the first 30% of steps, then a cosine anneal to peak/250000; peak
  lr 0.1 per 128 images (Goyal et al. 2017 linear scaling: 0.4 at batch 512); label smoothing 0.1
  (Szegedy et al. 2016); cutout 16 (DeVries & Taylor 2017). The seed project's recipe, with a
  validation split instead of the test set: --schedule plateau --val-split 5000 --lr 0.01
  --batch-size 64 --weight-decay 0 --label-smoothing 0 --no-nesterov --pad-crop 0 --cutout 0
  --precision fp32 --no-channels-last
"""


def build_parser():
    parser = cli.Parser(prog=os.path.basename(__file__), description=__doc__.split("\n\n")[0], epilog=EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=sorted(augment.DATASETS), default="cifar10",
                      help="dataset (default: %(default)s)")
    data.add_argument("--data-dir", default="./data",
                      help="folder holding (or receiving) the dataset (default: %(default)s)")
    data.add_argument("--no-download", dest="download", action="store_false",
                      help="fail instead of downloading a missing dataset")
    data.add_argument("--train-subset", type=int, default=0, metavar="N",
                      help="train on the first N training images only (0: all), for quick runs (default: %(default)s)")
    data.add_argument("--test-subset", type=int, default=0, metavar="N",
                      help="evaluate on N test images only (0: all): the same, class-balanced images every "
                           "epoch, for quick runs; their accuracy is not the test accuracy (default: %(default)s)")
    data.add_argument("--val-split", type=int, default=0, metavar="N",
                      help="hold out N training images as a validation set; the plateau schedule and "
                           "best.pt then watch it instead of the training loss / test accuracy (default: %(default)s)")
    data.add_argument("--workers", type=int, default=None,
                      help="DataLoader workers (default: CPU count, at most 16)")

    aug = parser.add_argument_group("augmentation")
    aug.add_argument("--pad-crop", type=int, default=4, metavar="PIXELS",
                     help="reflect-pad by this many pixels, then random 32x32 crop (0: off) (default: %(default)s)")
    aug.add_argument("--no-flip", dest="flip", action="store_false", help="no random horizontal flip")
    aug.add_argument("--cutout", type=int, default=16, metavar="PIXELS",
                     help="side of the one square cutout hole, filled with the mean colour (0: off) "
                          "(default: %(default)s)")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=50, help="training epochs (default: %(default)s)")
    opt.add_argument("--batch-size", type=int, default=512, help="images per step (default: %(default)s)")
    opt.add_argument("--lr", type=float, default=None,
                     help="peak learning rate (default: 0.1 * batch-size / 128)")
    opt.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: %(default)s)")
    opt.add_argument("--no-nesterov", dest="nesterov", action="store_false", help="plain momentum")
    opt.add_argument("--weight-decay", type=float, default=5e-4, help="L2 weight decay (default: %(default)s)")
    opt.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing (default: %(default)s)")
    opt.add_argument("--schedule", choices=("onecycle", "plateau"), default="onecycle",
                     help="onecycle: stepped every batch; plateau: ReduceLROnPlateau on the validation "
                          "accuracy (with --val-split) or else the training loss, never the test set "
                          "(default: %(default)s)")
    opt.add_argument("--warmup", type=float, default=0.3, metavar="FRACTION",
                     help="onecycle: fraction of the steps spent warming up (default: %(default)s)")
    opt.add_argument("--plateau-patience", type=int, default=5, metavar="EPOCHS",
                     help="plateau: epochs without improvement before the lr is divided by 10 (default: %(default)s)")

    speed = parser.add_argument_group("device and speed")
    speed.add_argument("--device", default="auto",
                       help="auto (cuda, then mps, then cpu), cuda, mps or cpu (default: %(default)s)")
    speed.add_argument("--precision", choices=devices.PRECISIONS, default="auto",
                       help=f"autocast precision; {devices.PRECISION_HELP}. fp16 runs on a CPU too, slowly "
                            "(default: %(default)s)")
    speed.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                       help="keep the NCHW memory format")
    speed.add_argument("--compile", action="store_true", help="torch.compile the model")
    speed.add_argument("--seed", type=int, default=0,
                       help="seed of weights, data order and augmentation (default: %(default)s)")
    speed.add_argument("--deterministic", action="store_true",
                       help="deterministic algorithms only (slower); with it a resumed CPU run repeats an "
                            "uninterrupted one exactly")

    out = parser.add_argument_group("output")
    out.add_argument("--out-dir", default=None,
                     help=f"where {LOG_NAME}, {LAST_NAME} and {BEST_NAME} go (default: the current "
                          "folder, or the folder of --resume)")
    out.add_argument("--overwrite", action="store_true",
                     help="replace the files of another run found in --out-dir (refused without it)")
    out.add_argument("--resume", metavar="PATH", default=None,
                     help=f"continue the run saved in this {LAST_NAME}: the recipe comes from it, the "
                          "machine's flags from the command line (see 'resume:' below)")
    out.add_argument("--benchmark", action="store_true",
                     help="measure the input pipeline, the model step and the full loop on synthetic "
                          "data, print a table and write benchmark.json; trains nothing")
    out.add_argument("--benchmark-steps", type=int, default=None, metavar="N",
                     help="timed steps per benchmark measurement (default: 3 on a CPU, about 100 s on "
                          "2 cores; 100 on a GPU)")
    return parser


def check_args(args):
    """Raise UsageError for values no run can use."""
    positive = {"epochs": args.epochs, "batch-size": args.batch_size}
    if args.benchmark_steps is not None:
        positive["benchmark-steps"] = args.benchmark_steps
    for name, value in positive.items():
        if value < 1:
            raise UsageError(f"--{name} must be at least 1 (got {value})")
    non_negative = {"train-subset": args.train_subset, "test-subset": args.test_subset,
                    "val-split": args.val_split, "seed": args.seed,
                    "pad-crop": args.pad_crop, "cutout": args.cutout, "weight-decay": args.weight_decay,
                    "plateau-patience": args.plateau_patience}
    for name, value in non_negative.items():
        if value < 0:
            raise UsageError(f"--{name} must not be negative (got {value})")
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers must not be negative (got {args.workers})")
    if args.lr is not None and not args.lr > 0:
        raise UsageError(f"--lr must be positive (got {args.lr})")
    if not 0 <= args.label_smoothing < 1:
        raise UsageError(f"--label-smoothing must be in [0, 1) (got {args.label_smoothing})")
    if not 0 < args.warmup < 1:
        raise UsageError(f"--warmup must be between 0 and 1 (got {args.warmup})")
    if args.cutout > 32:
        raise UsageError(f"--cutout must be at most 32 pixels (got {args.cutout})")


def derived_lr(args):
    """Peak lr: the given one, or 0.1 per 128 images (linear scaling rule)."""
    return args.lr if args.lr is not None else 0.1 * args.batch_size / 128


# ----------------------------------------------------------------------------- device and precision

def autocast(device, precision):
    """The autocast context for a precision, or a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


# mallopt options from glibc's malloc.h, and the values glibc starts with.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
GLIBC_MALLOC_DEFAULTS = {M_TRIM_THRESHOLD: 128 * 1024, M_MMAP_MAX: 65536}


def glibc():
    """The C library through ctypes where it is glibc, else None (musl, macOS, Windows)."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


@contextlib.contextmanager
def freed_memory_kept_in_heap(wanted):
    """Inside the block, on glibc, every allocation comes from the heap and freed memory stays there;
    yields whether that took effect.

    A training step on the CPU frees and re-allocates activations of up to 64 MiB each. glibc serves
    blocks that large with fresh mmap pages, which the kernel faults in and zeroes on every step: 4.7
    million page faults per two steps at batch 512, measured on a 2-core EPYC; from the heap, 0.6 million
    (the heap's first growth). `--benchmark` measures the step both ways. PyTorch's CPU tuning guide gets
    the same from jemalloc or tcmalloc through LD_PRELOAD; this needs no extra library. On leaving,
    glibc's default values return and the kept memory goes back to the kernel: main() may run inside a
    notebook or a test.
    """
    libc = glibc() if wanted else None
    applied = (libc is not None and bool(libc.mallopt(M_MMAP_MAX, 0))
               and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)))
    try:
        yield applied
    finally:
        if libc is not None:
            for option, value in GLIBC_MALLOC_DEFAULTS.items():
                libc.mallopt(option, value)
            libc.malloc_trim(0)


def default_workers():
    """Augmentation costs ~60-180 us per image per core: a GPU needs many workers to keep up (16 suffice)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(16, cores)


def resolve_device(args):
    """The device and the precision it runs: --precision auto becomes bf16, fp16 or fp32 (devices.py)."""
    device = devices.pick_device(args.device)
    facts = devices.read_facts(device)
    precision = devices.choose_precision(args.precision, facts)
    warning = devices.precision_warning(precision, facts)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    problem = devices.compile_problem(facts) if args.compile else None
    if problem:
        raise UsageError(problem)
    return device, precision


def process_settings(args, device):
    """cuDNN autotuning, TF32, deterministic algorithms for this run, put back as they were afterwards."""
    return devices.applied(devices.backend_settings(device.type, args.deterministic))


# ----------------------------------------------------------------------------- data

def split_data(data, args):
    """Apply --train-subset and --val-split; return (train, val) as (images, labels) pairs, val may be None."""
    images, labels = data.train_images, data.train_labels
    if args.train_subset > len(images):
        note(f"--train-subset {args.train_subset} asked for, but the dataset has {len(images)} training images: "
             f"training on all of them")
    if args.train_subset:
        images, labels = images[:args.train_subset], labels[:args.train_subset]
    if args.val_split >= len(images):
        raise UsageError(f"--val-split {args.val_split} leaves no training images (of {len(images)})")
    if not args.val_split:
        return (images, labels), None
    order = np.random.default_rng(args.seed).permutation(len(images))
    train, val = np.sort(order[args.val_split:]), np.sort(order[:args.val_split])
    return (images[train], labels[train]), (images[val], labels[val])


def test_data(data, args):
    """The test images to evaluate: all, or --test-subset of them, class-balanced and the same every epoch."""
    if not args.test_subset:
        return data.test_images, data.test_labels
    if args.test_subset >= len(data.test_labels):
        note(f"--test-subset {args.test_subset} asked for, but the dataset has {len(data.test_labels)} test "
             f"images: evaluating on all of them")
        return data.test_images, data.test_labels
    chosen = augment.balanced_subset(data.test_labels, args.test_subset)
    return data.test_images[chosen], data.test_labels[chosen]


def ignore_stop_signals_in_worker(_worker_id):
    # Ctrl-C (and a cluster's SIGTERM) reach the whole process group: only the main process decides how
    # to stop; workers end with it (DataLoader shuts them down, and they exit when their parent is gone).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_train_loader(images, labels, args, mean, device, workers, normalize_std=None, start_method=None):
    """The augmenting DataLoader and its sampler (call sampler.set_epoch before each epoch).

    start_method: how workers start (default: the platform's; see devices.worker_start_method).
    """
    start_method = start_method or devices.worker_start_method()
    shared = workers > 0 and devices.dataset_in_shared_memory(start_method)
    # Measured before the dataset moves into shared memory, which takes its own part of /dev/shm.
    pixel_bytes = 1 if normalize_std is None else 4  # uint8, or float32 normalized in the workers
    batch_bytes = args.batch_size * (images[0].size * pixel_bytes + labels[:1].nbytes)
    prefetch = devices.fit_prefetch(devices.free_shared_memory(), workers, batch_bytes,
                                    dataset_bytes=images.nbytes + labels.nbytes if shared else 0)
    dataset = augment.AugmentedImages(images, labels, augment.train_transform(
        mean, cutout=args.cutout, pad_crop=args.pad_crop, flip=args.flip, normalize_std=normalize_std),
        shared=shared)
    sampler = augment.SeededBatchSampler(len(dataset), args.batch_size, seed=args.seed)
    if 0 < prefetch < 4 and workers:
        note(f"/dev/shm is small: each DataLoader worker prepares {prefetch} batch(es) ahead instead of 4")
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers, pin_memory=devices.pin_memory(device.type),
        persistent_workers=workers > 0, prefetch_factor=prefetch if workers > 0 else None,
        worker_init_fn=ignore_stop_signals_in_worker if workers > 0 else None,
        multiprocessing_context=start_method if workers > 0 else None)
    return loader, sampler


# ----------------------------------------------------------------------------- model and optimiser

def make_optimizer(model, args, device):
    return torch.optim.SGD(model.parameters(), lr=derived_lr(args), momentum=args.momentum,
                           nesterov=args.nesterov and args.momentum > 0, weight_decay=args.weight_decay,
                           fused=devices.fused_optimizer(device.type) or None)


def make_scheduler(optimizer, args, steps_per_epoch):
    """onecycle steps every batch over the whole run; plateau steps once per epoch."""
    if args.schedule == "plateau":
        mode = "max" if args.val_split else "min"
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=0.1,
                                                          patience=args.plateau_patience)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=derived_lr(args), total_steps=args.epochs * steps_per_epoch,
        pct_start=args.warmup, anneal_strategy="cos", cycle_momentum=False)


class StepRunner:
    """One optimisation step on a uint8 batch already on the device, with the run's precision and layout."""

    def __init__(self, model, args, precision, device, mean, std, steps_per_epoch):
        self.model, self.device, self.precision = model, device, precision
        # On the device once: a host tensor per step would be a host-to-device copy per step.
        self.mean, self.std = (torch.tensor(v, device=device) for v in (mean, std))
        self.channels_last = args.channels_last
        self.criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
        self.optimizer = make_optimizer(model, args, device)
        self.scheduler = make_scheduler(self.optimizer, args, steps_per_epoch)
        self.per_step_schedule = args.schedule == "onecycle"
        self.scaler = torch.amp.GradScaler(device.type, enabled=devices.uses_grad_scaler(precision))
        self.compiled = args.compile
        self.forward = torch.compile(model) if args.compile else model

    def inputs(self, images):
        # One memory layout whatever the source's strides (test images are permuted views, a padded
        # batch is not): a compiled model would compile again for another one.
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        return augment.normalize(images, self.mean, self.std).contiguous(memory_format=layout)

    def __call__(self, images, labels):
        """Returns the detached loss and logits (device tensors: reading them is a sync point)."""
        with autocast(self.device, self.precision):
            logits = self.forward(self.inputs(images))
            loss = self.criterion(logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.per_step_schedule:
            self.step_schedule()
        return loss.detach(), logits.detach()

    def step_schedule(self):
        """The lr is a function of the step count, also for steps that the grad scaler skipped."""
        if not self.scaler.is_enabled():
            return self.scheduler.step()
        # A skipped first step makes the scheduler warn that it ran before optimizer.step(): by design here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            self.scheduler.step()

    def lr(self):
        return self.optimizer.param_groups[0]["lr"]


def build_model(num_classes, args, device):
    model = resnet18(num_classes=num_classes).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


# ----------------------------------------------------------------------------- training and evaluation

class StopFlag:
    """SIGINT/SIGTERM set a flag that the loop checks between steps; a second signal stops at once."""

    def __init__(self):
        self.signal = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, _frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n{signal.Signals(signum).name} received: stopping after the current step (once the last step "
              f"is done, the run finishes instead); again to stop at once", file=sys.stderr)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def progress_bar(iterable, total, description, enabled):
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=description, leave=False, disable=not enabled,
                dynamic_ncols=True, unit="step")


def show_progress():
    """Bars only for a person at a terminal: a redirected run gets one line per epoch, no bar spam."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def train_one_epoch(runner, loader, epoch, epochs, stop, bar_enabled):
    """One pass over the loader. Running sums stay on the device; they are read only when the bar
    refreshes (about twice a second) and at the end, because .item() is a CPU-GPU sync point."""
    model, device = runner.model, runner.device
    non_blocking = devices.copy_non_blocking(loader.pin_memory)
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    first_bad_step = torch.full((), -1, device=device, dtype=torch.long)
    seen, last_refresh, start = 0, time.monotonic(), time.perf_counter()
    bar = progress_bar(loader, len(loader), f"epoch {epoch}/{epochs}", bar_enabled)
    for step, (images, labels) in enumerate(bar):
        if step == 1:
            wait_for_a_signal_in_tests(stop)
        if stop.signal is not None:
            raise Stopped(f"epoch {epoch}, after step {step} of {len(loader)}")
        images = images.to(device, non_blocking=non_blocking)
        labels = labels.to(device, non_blocking=non_blocking)
        loss, logits = runner(images, labels)
        loss_sum += loss * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss), step + 1, first_bad_step)
        seen += len(labels)
        if bar_enabled and time.monotonic() - last_refresh > 0.5:
            check_finite(first_bad_step, epoch, len(loader))
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{100 * correct.item() / seen:.2f}%")
            last_refresh = time.monotonic()
    bar.close()
    devices.synchronizer(device.type)()  # queued GPU work belongs to this epoch's time
    seconds = time.perf_counter() - start
    check_finite(first_bad_step, epoch, len(loader))
    return {"train_loss": loss_sum.item() / seen, "train_acc": correct.item() / seen,
            "train_seconds": seconds, "images_per_s": seen / seconds}


def wait_for_a_signal_in_tests(stop):
    """Test-only switch: after an epoch's first step, say so and wait (at most a minute) for a stop
    signal, so that a test's signal lands between two steps whatever the machine's load."""
    if os.environ.get("TRAIN_TEST_WAIT_FOR_SIGNAL"):
        print("test: between steps, waiting for a signal", file=sys.stderr, flush=True)
        deadline = time.monotonic() + 60
        while stop.signal is None and time.monotonic() < deadline:
            time.sleep(0.01)


def check_finite(first_bad_step, epoch, steps):
    bad = int(first_bad_step.item())
    if bad > 0:
        raise Diverged(f"the loss became NaN or infinite at epoch {epoch}, step {bad} of {steps}")


@torch.no_grad()
def evaluate(runner, images, labels, num_classes, batch_size, description="evaluating", bar_enabled=False):
    """Loss, accuracy, accuracy with horizontal-flip test-time augmentation, and the confusion matrix.

    `images` is a uint8 (N, 3, 32, 32) tensor; the loss is the training criterion, so curves compare.
    Batches of the training size need less memory than a training step. Batches of 1024 after training
    at 512 added 0.5 GiB on the CPU (where freed memory stays in the heap) and ran no faster there.
    A compiled model gets the ragged last batch padded to full size: one more shape would mean one more
    compilation (10,000 test images = 19 x 512 + 272).
    """
    model, device = runner.model, runner.device
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    correct_tta = torch.zeros((), device=device, dtype=torch.long)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.long)
    starts = range(0, len(images), batch_size)
    for start in progress_bar(starts, len(starts), description, bar_enabled):
        y = labels[start:start + batch_size].to(device)
        x = images[start:start + batch_size].to(device)
        x = runner.inputs(padded(x, batch_size) if runner.compiled else x)
        with autocast(device, runner.precision):
            logits = runner.forward(x)[:len(y)].float()
            logits_tta = logits + runner.forward(x.flip(3))[:len(y)].float()
        loss_sum += runner.criterion(logits, y) * len(y)
        predicted = logits.argmax(1)
        correct += (predicted == y).sum()
        correct_tta += (logits_tta.argmax(1) == y).sum()
        confusion += torch.bincount(y * num_classes + predicted, minlength=num_classes * num_classes)
    n = len(images)
    return {"loss": loss_sum.item() / n, "acc": correct.item() / n, "acc_tta": correct_tta.item() / n,
            "confusion": confusion.view(num_classes, num_classes).tolist()}


def padded(batch, size):
    """`batch` with copies of its first row appended up to `size` rows (samples are independent in eval mode)."""
    missing = size - len(batch)
    return batch if missing <= 0 else torch.cat([batch, batch[:1].expand(missing, *batch.shape[1:])])


# ----------------------------------------------------------------------------- files

def pause_for_tests():
    """Test-only switch: pause inside a file write so that a test can kill the process mid-write."""
    pause = os.environ.get("TRAIN_TEST_PAUSE_IN_WRITE")
    if pause:
        time.sleep(float(pause))


def atomic_write(path, data):
    """Write bytes so that `path` is always either its old complete version or the new one.

    Temp file in the same folder, fsync, os.replace (atomic on POSIX and Windows), fsync the folder.
    """
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            half = len(data) // 2
            f.write(data[:half])
            pause_for_tests()
            f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    sync_folder(os.path.dirname(os.path.abspath(path)))


def sync_folder(folder):
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(checkpoint, path):
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    atomic_write(path, buffer.getbuffer())


def atomic_link(source, path):
    """Make `path` the same file as `source` (a hard link: no second copy), atomically."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)
    try:
        os.link(source, tmp)
    except OSError:  # file systems without hard links
        with open(source, "rb") as f:
            atomic_write(path, f.read())
        return
    os.replace(tmp, path)
    sync_folder(os.path.dirname(os.path.abspath(path)))


def write_json(path, value):
    atomic_write(path, (json.dumps(value, indent=1) + "\n").encode())


def remove_stale_temp_files(out_dir):
    """A killed run can leave NAME.tmp-PID files behind; the lock guarantees no live writer owns them."""
    for name in os.listdir(out_dir):
        if name.split(".tmp-")[0] in (LOG_NAME, LAST_NAME, BEST_NAME, "benchmark.json") and ".tmp-" in name:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(out_dir, name))


class RunLock:
    """An exclusive lock on the output folder: a second run there refuses instead of interleaving files.

    flock is released by the kernel when the process dies, even by SIGKILL, so a crash leaves no stale lock.
    """

    def __init__(self, out_dir):
        self.path = os.path.join(out_dir, LOCK_NAME)

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # Windows: no flock; runs are not guarded against each other there
            self.file = None
            return self
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.close()
            raise UsageError(f"another train.py is running with output folder {os.path.dirname(self.path)}; "
                             f"wait for it or choose another --out-dir") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()


def check_out_dir(out_dir):
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"--out-dir {out_dir} is a file, not a folder; choose another --out-dir")


def refuse_to_replace_another_run(out_dir):
    """A new run in a folder that holds another run's files would replace them: say so, and the ways out."""
    found = [name for name in (LOG_NAME, LAST_NAME, BEST_NAME) if os.path.exists(os.path.join(out_dir, name))]
    if not found:
        return
    what = ", ".join(found)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, IndexError):
        with open(os.path.join(out_dir, LOG_NAME)) as f:
            log = json.load(f)
        last = log["epochs"][-1]
        what = (f"{len(log['epochs'])} of {log['args']['epochs']} epochs, test accuracy "
                f"{100 * last['test_acc']:.2f}% at epoch {last['epoch']}")
    raise UsageError(f"{out_dir}/ holds another run ({what}); continue it with --resume "
                     f"{os.path.join(out_dir, LAST_NAME)}, choose another --out-dir, or give --overwrite to "
                     f"replace it")


def prepare_out_dir(out_dir):
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write-test-{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as error:
        raise UsageError(f"cannot write to output folder {out_dir} ({error.strerror}); "
                         f"choose another --out-dir") from None


# ----------------------------------------------------------------------------- log and checkpoint contents

def environment(device, precision, workers, args, heap_reuse):
    import albumentations
    return {"python": platform.python_version(), "torch": torch.__version__,
            "albumentations": albumentations.__version__, "numpy": np.__version__,
            "platform": platform.platform(), "device": device.type, "device_name": devices.device_name(device),
            "precision": precision, "channels_last": args.channels_last, "compile": args.compile,
            "workers": workers, "torch_threads": torch.get_num_threads(), "cpu_heap_reuse": heap_reuse}


def summarize(history, best_key):
    last = history[-1]
    best = max(history, key=lambda r: (r[best_key], -r["epoch"]))
    top = max(history, key=lambda r: (r["test_acc"], -r["epoch"]))
    return {"epochs_done": last["epoch"], "final_test_acc": last["test_acc"],
            "final_test_acc_tta": last["test_acc_tta"], "final_epoch": last["epoch"],
            "best_test_acc": top["test_acc"], "best_test_acc_epoch": top["epoch"],
            "best_checkpoint_epoch": best["epoch"], "best_checkpoint_metric": best_key,
            "total_seconds": sum(r["seconds"] for r in history)}


class BackgroundWriter:
    """Writes each epoch's files in a thread while the next epoch trains.

    last.pt with fsync took 0.14-0.35 s per epoch on the development CPU: a tenth of the 2.4 s that a GPU
    epoch should take. Only the snapshot (copies to the CPU, 7-25 ms there) stays on the training path.
    One write at a time: submit() waits for the one before. A write's error (a full disk) is raised by
    the next submit() or wait(); every file is still written atomically, so a kill at any moment leaves
    complete versions, and a failed write leaves the previous epoch's files as they were.
    """

    def __init__(self, saved_epoch=0):
        self.saved_epoch = saved_epoch  # the last epoch whose files are complete on disk
        self.thread, self.error = None, None

    def submit(self, epoch, write):
        self.wait()
        self.thread = threading.Thread(target=self._run, args=(epoch, write), name="checkpoint-writer")
        self.thread.start()  # not a daemon: the interpreter waits for a write in progress before exiting

    def _run(self, epoch, write):
        try:
            write()
            self.saved_epoch = epoch
        except BaseException as error:  # handed to the training thread, which reports it
            self.error = error

    def wait(self):
        """Wait for the write in progress; raise its error, if any. Returns the last epoch saved."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        return self.saved_epoch


def save_epoch(paths, checkpoint, improved, log):
    """last.pt, then best.pt, then log.json: a kill between them leaves the log one epoch behind, and
    --resume rebuilds the log from the checkpoint's history, so the two always agree after a resume."""
    try:
        save_checkpoint(checkpoint, paths[LAST_NAME])
        if improved:
            atomic_link(paths[LAST_NAME], paths[BEST_NAME])
        write_json(paths[LOG_NAME], log)
    except OSError as error:
        reason = "the disk is full" if error.errno == errno.ENOSPC else (error.strerror or str(error))
        raise WriteFailed(f"could not save epoch {checkpoint['epoch']} ({reason}); the files of the last "
                          f"saved epoch are intact, continue with: python train.py --resume "
                          f"{os.path.abspath(paths[LAST_NAME])}") from None


def data_description(data, test_labels):
    """What the accuracies were measured on: plot_curves.py and gradcam.py say so when it is not the
    official test set."""
    return {"official": data.official, "test_images": len(test_labels),
            "test_subset": len(test_labels) < len(data.test_labels)}


def build_log(args, env, classes, history, best_key, final=None, data=None):
    log = {"format": LOG_FORMAT, "args": dict(vars(args)), "environment": env, "data": data, "classes": classes,
           "epochs": history, "summary": summarize(history, best_key) if history else None}
    if final is not None:
        log.update(final)
    return log


def final_metrics(confusion, classes):
    """Per-class accuracy and the confusion matrix (rows: true class, columns: predicted)."""
    per_class = {name: (row[i] / sum(row) if sum(row) else None)
                 for i, (name, row) in enumerate(zip(classes, confusion))}
    return {"per_class_accuracy": per_class, "confusion_matrix": confusion}


def build_checkpoint(runner, args, data, epoch, history, best):
    """Everything a resume or gradcam.py needs, as CPU tensors and plain values: it loads on any machine."""
    raw_model = runner.model  # never the compiled wrapper: no '_orig_mod.' prefixes
    state = devices.on_cpu({"model": raw_model.state_dict(), "optimizer": runner.optimizer.state_dict(),
                            "scheduler": runner.scheduler.state_dict(), "scaler": runner.scaler.state_dict(),
                            "rng": devices.rng_state(runner.device.type)})
    return {"format": CHECKPOINT_FORMAT, **state,
            "model_args": {"num_classes": len(data.classes)}, "classes": list(data.classes),
            "mean": list(data.mean), "std": list(data.std), "dataset": args.dataset,
            "epoch": epoch, "args": dict(vars(args)), "history": history, "best": best}


def restore_checkpoint(runner, checkpoint):
    try:
        runner.model.load_state_dict(checkpoint["model"])
        runner.optimizer.load_state_dict(checkpoint["optimizer"])
        runner.scheduler.load_state_dict(checkpoint["scheduler"])
        # A bf16 or fp32 run saved no scaler state: an fp16 run resuming it starts a fresh scaler.
        if checkpoint["scaler"] and runner.scaler.is_enabled():
            runner.scaler.load_state_dict(checkpoint["scaler"])
        devices.restore_rng_state(checkpoint["rng"], runner.device.type)
    except (KeyError, RuntimeError, ValueError, TypeError) as error:
        raise CheckpointError(f"checkpoint does not fit this model and recipe "
                              f"({type(error).__name__}: {str(error).splitlines()[0][:120]})") from None


def flags_given(argv):
    """The names of the flags that the command line sets (argparse fills in only what is missing)."""
    names = vars(build_parser().parse_args([]))
    unset = object()
    parsed = build_parser().parse_args(argv, namespace=argparse.Namespace(**{name: unset for name in names}))
    return {name for name, value in vars(parsed).items() if value is not unset}


def args_for_resume(args, given):
    """Read --resume's checkpoint and merge: the recipe and the data's place from it, the machine from
    the command line; `given`: the flags the command line set."""
    checkpoint = read_checkpoint(args.resume)
    for key in ("optimizer", "scheduler", "scaler", "rng", "epoch", "args", "history"):
        if key not in checkpoint:
            raise CheckpointError(f"{args.resume} lacks '{key}': it cannot be resumed")
    merged = dict(checkpoint["args"])
    defaults = vars(build_parser().parse_args([]))
    ignored = [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
               if k not in RUNTIME_FLAGS and v != defaults.get(k) and v != merged.get(k)]
    if ignored:
        print(f"warning: ignoring {', '.join(ignored)}: --resume continues the recipe saved in {args.resume}",
              file=sys.stderr)
    merged.update({k: getattr(args, k) for k in RUNTIME_FLAGS if k in MACHINE_FLAGS or k in given or k not in merged})
    if args.out_dir is None:
        merged["out_dir"] = os.path.dirname(os.path.abspath(args.resume))
    return argparse.Namespace(**merged), checkpoint


def epoch_line(record, epochs, has_val):
    val = f"  val loss {record['val_loss']:.4f} acc {100 * record['val_acc']:.2f}%" if has_val else ""
    return (f"epoch {record['epoch']:>3}/{epochs}  lr {record['lr']:.4g}  "
            f"train loss {record['train_loss']:.4f} acc {100 * record['train_acc']:.2f}%{val}  "
            f"test loss {record['test_loss']:.4f} acc {100 * record['test_acc']:.2f}% "
            f"(flip TTA {100 * record['test_acc_tta']:.2f}%)  "
            f"{record['seconds']:.1f}s in all (training {record['train_seconds']:.1f}s at "
            f"{record['images_per_s']:.0f} img/s)")


# ----------------------------------------------------------------------------- the run

def train(args, given=frozenset()):
    """The whole run: data, model, epochs, files. `given`: the flags the command line set. Returns the exit code."""
    checkpoint = None
    if args.resume:
        args, checkpoint = args_for_resume(args, given)
    check_args(args)
    device, precision = resolve_device(args)
    args.out_dir = args.out_dir or "."
    args.data_dir = os.path.abspath(args.data_dir)  # saved in the checkpoint: a resume from any folder finds it
    check_out_dir(args.out_dir)
    if checkpoint is None and not args.overwrite:
        refuse_to_replace_another_run(args.out_dir)
    # Every input is checked before anything is created: a bad dataset leaves no folder and no lock behind.
    data = augment.load_dataset(args.dataset, args.data_dir, download=args.download)
    if checkpoint is not None and checkpoint["model_args"].get("num_classes") != len(data.classes):
        raise CheckpointError(f"{args.resume} is for {checkpoint['model_args'].get('num_classes')} "
                              f"classes, but {args.dataset} has {len(data.classes)}")
    prepare_out_dir(args.out_dir)
    # Signals set a flag from here on: a stop during the setup still ends cleanly, at the first step.
    # Every process-wide setting goes back on leaving: main() may run inside a notebook or a test.
    heap = freed_memory_kept_in_heap(device.type == "cpu")
    with RunLock(args.out_dir), StopFlag() as stop, process_settings(args, device), heap as heap_reuse:
        remove_stale_temp_files(args.out_dir)
        Run(args, data, checkpoint, device, precision, heap_reuse).run(stop)
    return 0


def note(message):
    print(f"note: {message}", file=sys.stderr)


class Run:
    """The state of one training run and its two jobs: run an epoch, save what it produced."""

    def __init__(self, args, data, checkpoint, device, precision, heap_reuse):
        torch.manual_seed(args.seed)
        (train_images, train_labels), val = split_data(data, args)
        test_images, test_labels = test_data(data, args)
        self.num_classes = len(data.classes)
        workers = default_workers() if args.workers is None else args.workers
        if device.type == "cpu" and args.epochs * len(train_images) > 100_000:
            print(f"warning: training on the CPU: {args.epochs} epochs of {len(train_images)} images will "
                  f"take hours; use a GPU, or --train-subset and --epochs for a quick run", file=sys.stderr)
        self.args, self.data, self.device = args, data, device
        self.loader, self.sampler = make_train_loader(train_images, train_labels, args, data.mean, device, workers)
        model = build_model(self.num_classes, args, device)
        self.runner = StepRunner(model, args, precision, device, data.mean, data.std, len(self.loader))
        self.history, self.best = [], None
        if checkpoint is not None:
            restore_checkpoint(self.runner, checkpoint)
            self.history, self.best = list(checkpoint["history"]), checkpoint["best"]
        self.writer = BackgroundWriter(saved_epoch=len(self.history))
        self.test = (augment.to_tensor(test_images).to(device), torch.from_numpy(test_labels).to(device))
        self.described = data_description(data, test_labels)
        self.val = None if val is None else (augment.to_tensor(val[0]).to(device), torch.from_numpy(val[1]).to(device))
        self.best_key = "val_acc" if val is not None else "test_acc"
        self.env = environment(device, precision, workers, args, heap_reuse)
        self.paths = {name: os.path.join(args.out_dir, name) for name in (LOG_NAME, LAST_NAME, BEST_NAME)}
        dropped = len(train_images) - len(self.loader) * args.batch_size
        if dropped > 0:
            note(f"each epoch trains on {len(self.loader)} batches of {args.batch_size}: {dropped} of the "
                 f"{len(train_images)} training images, different ones each epoch, are left out (a smaller "
                 f"last batch would disturb BatchNorm's statistics and make --compile compile again)")
        print(f"{'resuming at' if self.history else 'training from'} epoch {len(self.history) + 1}/{args.epochs}"
              f" on {self.env['device_name']} ({precision}, {workers} workers), {len(train_images)} training "
              f"images, {len(test_labels)} test images; writing into {args.out_dir}/")

    def epoch(self, epoch, stop):
        """Train and evaluate one epoch; returns its log record and the test confusion matrix."""
        args, runner = self.args, self.runner
        self.sampler.set_epoch(epoch)
        start = time.perf_counter()
        record = {"epoch": epoch, "lr": runner.lr()}
        record.update(train_one_epoch(runner, self.loader, epoch, args.epochs, stop, show_progress()))
        bar = show_progress()
        if self.val is not None:
            val = evaluate(runner, *self.val, self.num_classes, args.batch_size, f"epoch {epoch} validation", bar)
            record.update(val_loss=val["loss"], val_acc=val["acc"])
        test = evaluate(runner, *self.test, self.num_classes, args.batch_size, f"epoch {epoch} test", bar)
        record.update(test_loss=test["loss"], test_acc=test["acc"], test_acc_tta=test["acc_tta"])
        if args.schedule == "plateau":
            runner.scheduler.step(record["val_acc"] if self.val is not None else record["train_loss"])
        record["seconds"] = time.perf_counter() - start
        return record, test["confusion"]

    def save(self, record, confusion):
        """Snapshot a finished epoch (CPU copies: training may go on) and hand last.pt, best.pt and
        log.json to the writer, which writes them while the next epoch trains."""
        epoch, history = record["epoch"], self.history + [record]
        improved = self.best is None or record[self.best_key] > self.best["value"]
        best = {"metric": self.best_key, "value": record[self.best_key], "epoch": epoch} if improved else self.best
        final = final_metrics(confusion, self.data.classes) if epoch == self.args.epochs else None
        checkpoint = build_checkpoint(self.runner, self.args, self.data, epoch, history, best)
        checkpoint["data"] = self.described
        log = build_log(self.args, self.env, self.data.classes, history, self.best_key, final, self.described)
        self.writer.submit(epoch, lambda: save_epoch(self.paths, checkpoint, improved, log))
        self.history, self.best = history, best

    def run(self, stop):
        args, paths = self.args, self.paths
        if len(self.history) >= args.epochs:
            print(f"nothing to do: {args.resume} already holds all {args.epochs} epochs")
            return
        try:
            for epoch in range(len(self.history) + 1, args.epochs + 1):
                record, confusion = self.epoch(epoch, stop)
                self.save(record, confusion)
                print(epoch_line(record, args.epochs, self.val is not None), flush=True)
            self.writer.wait()
        except Diverged as error:
            done = self.writer.wait()
            saved = f"{paths[LAST_NAME]} still holds epoch {done}" if done else "no epoch was saved"
            raise Diverged(f"{error}; {saved}. Lower --lr (or check the data) and start again") from None
        except (Stopped, KeyboardInterrupt) as error:
            done = self.writer.wait()
            saved = (f"{'epoch 1 is' if done == 1 else f'epochs 1-{done} are'} saved; continue with: "
                     f"python train.py --resume {os.path.abspath(paths[LAST_NAME])}" if done else
                     "no epoch was completed, nothing was saved")
            raise Stopped(f"at {error or f'epoch {len(self.history) + 1}'}; {saved}") from None
        except BaseException:
            # Any other failure (a CUDA out-of-memory error, say): the write in progress finishes before
            # the lock goes, or a next run could take the folder while a file is half-written.
            with contextlib.suppress(Exception):
                self.writer.wait()
            raise
        if stop.signal is not None:
            print(f"{signal.Signals(stop.signal).name} came after the last training step: the run is complete")
        summary = summarize(self.history, self.best_key)
        print(f"done: final test accuracy {100 * summary['final_test_acc']:.2f}% (flip TTA "
              f"{100 * summary['final_test_acc_tta']:.2f}%), best {100 * summary['best_test_acc']:.2f}% at "
              f"epoch {summary['best_test_acc_epoch']}, {summary['total_seconds']:.0f}s; wrote "
              f"{paths[LOG_NAME]}, {paths[LAST_NAME]}, {paths[BEST_NAME]}")


# ----------------------------------------------------------------------------- benchmark

# The seed project's loop: batch 64, fp32, NCHW, 4 workers; the baseline of --benchmark's speedup.
SEED_SETTINGS = {"batch_size": 64, "precision": "fp32", "channels_last": False, "workers": 4, "compile": False}


def synthetic_images(count, seed=0):
    """Random uint8 images of CIFAR's size and random labels: the benchmark needs no download."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, count)


def measure_pipeline(args, device, workers, batches, normalize_in_workers=False):
    """Augmentation + DataLoader + host-to-device copy alone: about `batches` batches, timed after one
    warm-up pass (workers started). The synthetic images are at most 100 batches (157 MB at batch 512),
    passed over several times when more batches are wanted, rather than 1.6 GB for a GPU's 1,000.

    normalize_in_workers: float32 batches normalized by albumentations, instead of uint8 batches that
    the device normalizes: 4x the bytes through the worker queues and the copy.
    """
    pool = min(batches, 100)
    images, labels = synthetic_images(args.batch_size * pool)
    loader, sampler = make_train_loader(images, labels, args, augment.CIFAR10_MEAN, device, workers,
                                        augment.CIFAR10_STD if normalize_in_workers else None)
    non_blocking, synchronize = devices.copy_non_blocking(loader.pin_memory), devices.synchronizer(device.type)

    def one_pass(epoch):
        sampler.set_epoch(epoch)
        return sum(len(batch.to(device, non_blocking=non_blocking)) for batch, _ in loader)

    one_pass(0)  # warm-up
    synchronize()
    start = time.perf_counter()
    seen = sum(one_pass(epoch) for epoch in range(1, -(-batches // pool) + 1))
    synchronize()
    return seen / (time.perf_counter() - start)


def measure_step(args, precision, device, steps):
    """Forward, backward and optimizer step on one batch already on the device."""
    runner = StepRunner(build_model(10, args, device), args, precision, device, augment.CIFAR10_MEAN,
                        augment.CIFAR10_STD, steps_per_epoch=10 * steps)
    images, labels = synthetic_images(args.batch_size)
    images, labels = augment.to_tensor(images).contiguous().to(device), torch.from_numpy(labels).to(device)
    synchronize = devices.synchronizer(device.type)
    for _ in range(2):  # warm-up: kernel selection, compilation, the heap's growth
        runner(images, labels)
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        runner(images, labels)
    synchronize()
    return steps * args.batch_size / (time.perf_counter() - start)


def measure_full_loop(args, precision, device, workers, steps):
    """The real training loop (train_one_epoch) over `steps` batches; the second of two epochs is timed."""
    images, labels = synthetic_images(args.batch_size * steps)
    loader, sampler = make_train_loader(images, labels, args, augment.CIFAR10_MEAN, device, workers)
    runner = StepRunner(build_model(10, args, device), args, precision, device, augment.CIFAR10_MEAN,
                        augment.CIFAR10_STD, steps_per_epoch=len(loader))
    with StopFlag() as stop:
        for epoch in (1, 2):
            sampler.set_epoch(epoch)
            stats = train_one_epoch(runner, loader, epoch, 2, stop, bar_enabled=False)
    return stats["images_per_s"]


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "GPU memory allocated"
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**20, "GPU memory held by the Metal driver (at the end)"
    import resource
    return devices.peak_resident_mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss), "resident memory, main process"


def benchmark(args):
    """Measure where the time goes, on synthetic data, and write benchmark.json."""
    check_args(args)
    device, precision = resolve_device(args)
    workers = default_workers() if args.workers is None else args.workers
    out_dir = args.out_dir or "."
    prepare_out_dir(out_dir)
    with process_settings(args, device):
        result = measure_all(args, device, precision, workers)
    print(benchmark_table(result))
    path = os.path.join(out_dir, "benchmark.json")
    write_json(path, result)
    print(f"wrote {path}", flush=True)
    return 0


def measure_all(args, device, precision, workers):
    """Every row of the benchmark, in one process, so that the ratios compare like with like."""
    torch.manual_seed(args.seed)
    steps = args.benchmark_steps or (3 if device.type == "cpu" else 100)
    args = argparse.Namespace(**dict(vars(args), epochs=2))  # the schedule's length: the full loop runs 2 epochs
    seed_args = argparse.Namespace(**dict(vars(args), **SEED_SETTINGS))
    print(f"benchmark on {devices.device_name(device)}: batch {args.batch_size}, {precision}, "
          f"{'channels_last' if args.channels_last else 'NCHW'}, {workers} workers, {steps} timed steps each")
    # The pipeline is cheap to measure, so it gets 10x the batches: less noise.
    pipeline = measure_pipeline(args, device, workers, 10 * steps)
    pipeline_float = measure_pipeline(args, device, workers, 10 * steps, normalize_in_workers=True)
    # The step with glibc's default allocator too, as the baseline of heap reuse.
    tune_heap = device.type == "cpu" and glibc() is not None
    step_default_heap = measure_step(args, precision, device, steps) if tune_heap else None
    with freed_memory_kept_in_heap(tune_heap) as heap_reuse:
        step = measure_step(args, precision, device, steps)
        full = measure_full_loop(args, precision, device, workers, steps)
        with warnings.catch_warnings():  # 4 workers on a 2-core machine draw a warning: the seed used 4
            warnings.filterwarnings("ignore", message="This DataLoader will create")
            seed = measure_full_loop(seed_args, "fp32", device, SEED_SETTINGS["workers"], steps)
    memory, memory_kind = peak_memory_mb(device)
    return {"device": devices.device_name(device), "precision": precision, "batch_size": args.batch_size,
              "channels_last": args.channels_last, "compile": args.compile, "workers": workers, "steps": steps,
              "cpu_heap_reuse": heap_reuse,
              "pipeline_images_per_s": pipeline, "pipeline_normalized_in_workers_images_per_s": pipeline_float,
              "step_images_per_s": step, "step_default_malloc_images_per_s": step_default_heap,
              "full_loop_images_per_s": full,
              "efficiency": full / min(pipeline, step), "seed_settings_images_per_s": seed,
              "speedup_over_seed_settings": full / seed, "peak_memory_mb": memory, "peak_memory_kind": memory_kind,
              "torch": torch.__version__}


def benchmark_table(r):
    rows = [("input pipeline alone (augment + DataLoader + copy)", f"{r['pipeline_images_per_s']:,.0f} img/s"),
            ("  the same, normalized to float32 in the workers",
             f"{r['pipeline_normalized_in_workers_images_per_s']:,.0f} img/s"),
            ("model step alone (forward + backward + SGD)", f"{r['step_images_per_s']:,.0f} img/s"),
            *([("  the same, glibc's default malloc (no heap reuse)",
                f"{r['step_default_malloc_images_per_s']:,.0f} img/s")] if r["cpu_heap_reuse"] else []),
            ("full training loop", f"{r['full_loop_images_per_s']:,.0f} img/s"),
            ("efficiency: full / min(pipeline, step)", f"{r['efficiency']:.2f}"),
            ("seed's settings: batch 64, fp32, NCHW, 4 workers", f"{r['seed_settings_images_per_s']:,.0f} img/s"),
            ("speedup over the seed's settings", f"{r['speedup_over_seed_settings']:.2f}x"),
            (f"peak {r['peak_memory_kind']}", f"{r['peak_memory_mb']:,.0f} MiB")]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value:>14}" for name, value in rows)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return benchmark(args) if args.benchmark else train(args, flags_given(argv))
    except (UsageError, CheckpointError, augment.DatasetError, devices.DeviceError) as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    except Diverged as error:
        print(f"train.py: stopped: {error}", file=sys.stderr)
        return 1
    except Stopped as error:
        print(f"train.py: stopped {error}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before the run's own handler was installed
        print("train.py: stopped before the first epoch; nothing was written", file=sys.stderr)
        return 130
    except WriteFailed as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
