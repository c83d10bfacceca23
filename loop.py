"""The training loop that train.py and benchmark.py share: the recipes, the model, optimiser and schedule,
the step and the epoch (train_one_epoch), evaluation, and stopping on a signal. Nothing happens on import.

    trainer = loop.Trainer(model, args, precision, device, mean, std, steps_per_epoch, world)
    loop.train_one_epoch(trainer, loader, epoch, epochs, stop, bar_enabled=True)
"""
import contextlib
import ctypes
import platform
import re
import signal
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import augment
import devices
import distributed
from cli import note, say, warn
from resnet import resnet18

# The recipes that --recipe names. "airbench": airbench's ResNet-18 baseline as published
# (KellerJordan/cifar10-zoo, airbench/baselines/train_resnet18_94.py: 94.0% with flip TTA in 26 epochs).
# "default": the same but for a batch that divides among 8 GPUs (512, the lr scaled with it) and PyTorch's
# cosine one-cycle shape, chosen on the development split (docs/recipe-and-results.md). "seed": the project this
# started from, with a validation split instead of the test set.
RECIPES = {
    "airbench": {"batch_size": 500, "lr": 0.2, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
                 "label_smoothing": 0.0, "schedule": "linear", "warmup": 0.2, "plateau_patience": 5,
                 "pad_crop": 4, "flip": True, "cutout": 12, "val_split": 0},
}
RECIPES["default"] = dict(RECIPES["airbench"], batch_size=512, lr=None, schedule="onecycle")
RECIPES["seed"] = dict(RECIPES["default"], batch_size=64, lr=0.01, nesterov=False, weight_decay=0.0,
                       label_smoothing=0.0, schedule="plateau", pad_crop=0, cutout=0, val_split=5000)
SEED_MACHINE = {"precision": "fp32", "channels_last": False}  # what the seed ran on: not part of a recipe


class Diverged(Exception):
    """The loss became NaN or infinite."""


class Stopped(Exception):
    """SIGINT or SIGTERM arrived; the run stopped at a step boundary."""


def derived_lr(args):
    """Peak lr: the given one, or airbench's 0.2 per 500 images scaled with the batch (0.2048 at 512)."""
    return args.lr if args.lr is not None else 0.2 * args.batch_size / 500


def resolve_device(args, world=distributed.World()):
    """The device for --device (under torchrun: this rank's GPU) and the precision it runs (devices.py
    decides). Every problem is a DeviceError: one line, said by each rank that meets it (it may be this
    machine's alone: with --device auto, a machine whose CUDA is missing)."""
    try:
        device = devices.pick_device(args.device, world.local_rank if world.launched else None)
        facts = devices.read_facts(device)
    except RuntimeError as error:  # CUDA's start-up failing (a driver problem) on its first call
        gpu = f" (GPU {world.local_rank})" if world.launched else ""
        reason = devices.first_line(error)
        raise devices.DeviceError(f"--device {args.device}{gpu}: the device cannot be used ({reason}); check the GPU "
                                  f"(nvidia-smi), or use --device cpu") from None
    if world.launched:
        distributed.backend_for(device.type)  # refuses a device that torchrun's processes cannot connect (MPS)
    sync_bn = getattr(args, "sync_bn", False)
    problem = devices.build_problem(facts.capability, torch.cuda.get_arch_list()) if device.type == "cuda" else None
    problem = problem or (devices.compile_problem(facts) if args.compile else None)
    if sync_bn and device.type != "cuda":
        problem = f"--sync-bn needs CUDA GPUs (torch's SyncBatchNorm has no {device.type} implementation); leave it out"
    if problem:
        raise devices.DeviceError(problem)
    devices.check_computes(device)
    chosen = devices.choose_precision(args.precision, facts)
    warnings = [devices.precision_warning(chosen, facts)]
    if sync_bn and args.compile:
        warnings.append("--sync-bn with --compile is slow: torch.compile cannot trace SyncBatchNorm (pytorch/pytorch"
                        "#161302) and breaks each step at ResNet18's 20 BatchNorm layers, with a CPU-GPU sync at "
                        "each; use one or the other")
    for warning in filter(None, warnings):
        warn(warning)
    if sync_bn and not world.launched:
        note("--sync-bn has no effect in a single process")
    return device, chosen


def autocast(device, precision):
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16,
                          enabled=precision != "fp32")


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt's options (glibc's malloc.h), then their default values
GLIBC_MALLOC_DEFAULTS = {M_TRIM_THRESHOLD: 128 * 1024, M_MMAP_MAX: 65536}


def glibc():
    """The C library where it is glibc, else None (musl, macOS, Windows)."""
    with contextlib.suppress(OSError):
        return ctypes.CDLL("libc.so.6") if platform.libc_ver()[0] == "glibc" else None


@contextlib.contextmanager
def freed_memory_kept_in_heap(wanted):
    """Inside the block, on glibc, every allocation comes from the heap and freed memory stays there; yields
    whether that took effect. A CPU training step frees and re-allocates activations of up to 64 MiB, which
    glibc serves with fresh mmap pages that the kernel faults in and zeroes every step: 4.7 million page
    faults per two steps at batch 512 on a 2-core EPYC, 0.6 million from the heap (benchmark.py measures the
    step both ways). PyTorch's CPU tuning guide gets the same from jemalloc through LD_PRELOAD. On leaving,
    glibc's defaults return and the memory goes back: main() may run inside a notebook or a test."""
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


def build_model(num_classes, args, device):
    """ResNet18 on the device; BatchNorm synchronised across the ranks with --sync-bn (CUDA only)."""
    model = resnet18(num_classes=num_classes)
    if getattr(args, "sync_bn", False):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # the same state_dict keys as BatchNorm2d
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if args.channels_last else model


# Per-step schedules: PyTorch's OneCycleLR in two shapes. "onecycle": its defaults, cosine from peak/25 up
# to the peak, then down to peak/250,000. "linear": airbench's triangle, straight from peak/5 up to the peak
# and down towards 0, one step earlier than airbench's (whose last step trains at peak/(0.8 x steps)).
ONE_CYCLE_SHAPES = {"onecycle": {"anneal_strategy": "cos", "div_factor": 25.0, "final_div_factor": 1e4},
                    "linear": {"anneal_strategy": "linear", "div_factor": 5.0, "final_div_factor": 1e4}}


def make_scheduler(optimizer, args, steps_per_epoch):
    """onecycle and linear step every batch over the whole run; plateau steps once per epoch."""
    if args.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max" if args.val_split else "min",
                                                          factor=0.1, patience=args.plateau_patience)
    total_steps = args.epochs * steps_per_epoch
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=derived_lr(args), total_steps=total_steps,
        pct_start=warmup_fraction(args.warmup, total_steps), cycle_momentum=False, **ONE_CYCLE_SHAPES[args.schedule])


def warmup_fraction(warmup, total_steps):
    """OneCycleLR's pct_start for a warm-up of `warmup` of the steps. One step or less cannot climb:
    OneCycleLR divides by zero at exactly one and starts part-way down below it; say so, start at the peak."""
    if warmup * total_steps > 1:
        return warmup
    starts = ("the run starts at the peak lr" if total_steps > 1 else
              "the run's one step is its schedule's last, at nearly 0")
    note(f"a warm-up of {warmup:g} of {total_steps} steps is one step or less: {starts} (for a warm-up, "
         f"train more steps: more --epochs or images, or a smaller --batch-size)")
    return 0.99 / total_steps  # OneCycleLR then starts its anneal from the peak, 0.01 step before step 0


class Trainer:
    """What a training step uses: the model, optimiser, schedule, grad scaler, precision, layout, loss and
    the (compiled) forward functions. `model` is the plain model (what checkpoints save); training runs
    through DistributedDataParallel under torchrun, evaluation through the plain model."""

    def __init__(self, model, args, precision, device, mean, std, steps_per_epoch, world=distributed.World()):
        self.model, self.device, self.precision, self.world = model, device, precision, world
        # On the device once: a host tensor per step would be a host-to-device copy per step.
        self.mean, self.std = (torch.tensor(v, device=device) for v in (mean, std))
        self.channels_last = args.channels_last
        self.criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=derived_lr(args), momentum=args.momentum,
                                         nesterov=args.nesterov and args.momentum > 0, weight_decay=args.weight_decay,
                                         fused=devices.fused_optimizer(device.type) or None)
        self.scheduler = make_scheduler(self.optimizer, args, steps_per_epoch)
        self.per_step_schedule = args.schedule in ONE_CYCLE_SHAPES
        # fp16's narrow range needs the loss scaled up so that small gradients survive; bf16 and fp32 don't.
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.compiled = args.compile
        compiled = torch.compile if args.compile else (lambda module: module)
        self.forward = compiled(model)
        self.train_forward = compiled(world.wrap(model, device)) if world.launched else self.forward

    def inputs(self, images):
        # One memory layout whatever the source's strides (test images are permuted views, a padded
        # batch is not): a compiled model would compile again for another one.
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        return augment.normalize(images, self.mean, self.std).contiguous(memory_format=layout)

    def step_schedule(self):
        """The lr is a function of the step count, also for steps that the grad scaler skipped."""
        if not self.scaler.is_enabled() or self.scheduler.last_epoch > 0:
            return self.scheduler.step()  # only the scheduler's first step checks for an optimizer step
        # A skipped first step makes the scheduler warn that it ran before optimizer.step(): by design here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            self.scheduler.step()

    def lr(self):
        return self.optimizer.param_groups[0]["lr"]


class StopFlag:
    """SIGINT/SIGTERM set a flag that the loop checks between steps; a second signal stops at once.

    Under torchrun the ranks agree at every step (`requested`), so that all stop at the same step boundary,
    whichever saw the signal first. The vote is cast one step ahead, so that its round trip overlaps a step
    instead of stalling every one: a stop comes one step later than in a single process.
    """

    def __init__(self, world=distributed.World()):
        self.signal, self.world = None, world
        self.pending = None  # under torchrun: the vote of the step before

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, _frame):
        if self.signal is not None:
            # Under torchrun a second signal is normal: Ctrl-C reaches every process and torchrun sends
            # SIGTERM on top (SLURM signals them all too). torchrun kills what is left 30 s later.
            if self.world.launched:
                return
            raise KeyboardInterrupt
        self.signal = signum
        when = "after the next step, with every process" if self.world.launched else "after the current step"
        again = "" if self.world.launched else "; again to stop at once"
        print(f"\n{signal.Signals(signum).name} received: stopping {when} (once the last step is done, the run "
              f"finishes instead){again}", file=sys.stderr)

    def requested(self):
        """Whether to stop now. Under torchrun a collective: every rank must call it at every step; it
        returns the ranks' vote of the step before and casts this step's."""
        if not self.world.launched:
            return self.signal is not None
        verdict = self.pending is not None and self.pending.wait()
        self.pending = self.world.vote(self.signal is not None)
        return verdict

    def __exit__(self, *exc):
        if self.pending is not None and exc[0] is None:
            self.pending.wait()  # every rank cast it: finish it before the process group ends
        for s, handler in self.previous.items():
            # A stopping torchrun rank ignores the launcher's SIGTERM while it exits: the other ranks may
            # have exited a moment earlier, and its exit code (130) should still be its own.
            signal.signal(s, signal.SIG_IGN if self.world.launched and self.signal is not None else handler)


def progress_bar(iterable, total, description, enabled):
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=description, leave=False, disable=not enabled, dynamic_ncols=True,
                unit="step")


def train_one_epoch(trainer, loader, epoch, epochs, stop, bar_enabled, lines_every=None):
    """One pass over the loader (batches of uint8 images and labels), a training step a batch. The running
    sums stay on the device and are read only when the bar refreshes (twice a second) and at the end:
    .item() is a CPU-GPU sync point. Under torchrun they are all ranks' (one all-reduce at the end).
    Without a bar, a line every `lines_every` seconds (a redirected run's sign of life), if given."""
    t, device, world = trainer, trainer.device, trainer.world
    # Non-blocking only from pinned memory: from pageable memory the copy may still be reading when the
    # batch is freed (MPS: pytorch issue 189690), and CUDA makes such copies blocking anyway.
    non_blocking = getattr(loader, "pin_memory", False)
    t.model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    first_bad_step = torch.full((), NO_BAD_STEP, device=device, dtype=torch.long)
    seen, last_refresh, start = 0, time.monotonic(), time.perf_counter()
    bar = progress_bar(loader, len(loader), f"epoch {epoch}/{epochs}", bar_enabled)
    for step, (images, labels) in enumerate(bar):
        if stop.requested():
            raise Stopped(f"epoch {epoch}, after step {step} of {len(loader)}")
        images = images.to(device, non_blocking=non_blocking)
        labels = labels.to(device, non_blocking=non_blocking)
        # The step: forward and loss in the run's precision, backward (under torchrun DDP all-reduces the
        # gradients meanwhile), the optimiser's step through the grad scaler (fp16 only), the lr's step.
        with autocast(device, t.precision):
            logits = t.train_forward(t.inputs(images))
            loss = t.criterion(logits.float(), labels)
        t.optimizer.zero_grad(set_to_none=True)
        t.scaler.scale(loss).backward()
        t.scaler.step(t.optimizer)
        t.scaler.update()
        if t.per_step_schedule:
            t.step_schedule()
        loss, logits = loss.detach(), logits.detach()
        loss_sum += loss * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        first_bad_step = torch.where(torch.isfinite(loss), first_bad_step, first_bad_step.clamp(max=step + 1))
        seen += len(labels)
        if bar_enabled and time.monotonic() - last_refresh > 0.5:
            if not world.launched:  # one rank alone must not stop: the others would wait for it
                check_finite(first_bad_step, epoch, len(loader))
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{100 * correct.item() / seen:.2f}%")
            last_refresh = time.monotonic()
        elif lines_every is not None and time.monotonic() - last_refresh >= lines_every:
            say(f"epoch {epoch}/{epochs}: step {step + 1}/{len(loader)}, "
                f"{seen * world.size / (time.perf_counter() - start):.0f} img/s")
            last_refresh = time.monotonic()
    bar.close()
    check_finite(world.minimum(first_bad_step), epoch, len(loader))
    loss_sum, correct, seen = world.add_up(loss_sum, correct, torch.tensor(seen, device=device))
    getattr(torch, device.type).synchronize()  # queued GPU work belongs to this epoch's time
    seconds = time.perf_counter() - start
    return {"train_loss": loss_sum / seen, "train_acc": correct / seen,
            "train_seconds": seconds, "images_per_s": seen / seconds}


NO_BAD_STEP = 2**62


def check_finite(first_bad_step, epoch, steps):
    bad = int(first_bad_step.item())
    if bad != NO_BAD_STEP:
        raise Diverged(f"the loss became NaN or infinite at epoch {epoch}, step {bad} of {steps}")


@torch.no_grad()
def evaluate(trainer, images, labels, num_classes, batch_size, description="evaluating", bar_enabled=False,
             temperature=1.0, fit_temperature=False):
    """Loss (the training criterion, so that curves compare), accuracy, accuracy with horizontal-flip
    test-time augmentation, the confusion matrix, and calibration (the NLL and the expected calibration
    error, as they are and with the logits divided by `temperature`; with `fit_temperature` also the NLL
    at every TEMPERATURES, from which fitted_temperature chooses) of uint8 (N, 3, 32, 32) `images`.

    Under torchrun rank r evaluates batches r, r + size, ... with rank 0's BatchNorm statistics and the
    counts are added up: every image goes through the same batch as in one process. Batches of the training
    size: 1024 after training at 512 added 0.5 GiB on the CPU and ran no faster. A compiled model gets the
    ragged last batch padded to full size: another shape would compile again.
    """
    model, device, world = trainer.model, trainer.device, trainer.world
    world.share_buffers(model)
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct, correct_tta = (torch.zeros((), device=device, dtype=torch.long) for _ in range(2))
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.long)
    nll, nll_scaled = (torch.zeros((), device=device) for _ in range(2))
    nll_by_temperature = torch.zeros(len(TEMPERATURES) if fit_temperature else 0, device=device)
    bins, bins_scaled = (torch.zeros(3 * CALIBRATION_BINS, device=device) for _ in range(2))
    starts = range(0, len(images), batch_size)[world.rank::world.size]
    for start in progress_bar(starts, len(starts), description, bar_enabled):
        y = labels[start:start + batch_size].to(device)
        x = images[start:start + batch_size].to(device)
        x = trainer.inputs(padded(x, batch_size) if trainer.compiled else x)
        with autocast(device, trainer.precision):
            logits = trainer.forward(x)[:len(y)].float()
            logits_tta = logits + trainer.forward(x.flip(3))[:len(y)].float()
        loss_sum += trainer.criterion(logits, y) * len(y)
        predicted = logits.argmax(1)
        correct += (predicted == y).sum()
        correct_tta += (logits_tta.argmax(1) == y).sum()
        confusion += torch.bincount(y * num_classes + predicted, minlength=num_classes * num_classes)
        nll += F.cross_entropy(logits, y, reduction="sum")
        nll_scaled += F.cross_entropy(logits / temperature, y, reduction="sum")
        bins += calibration_sums(logits, y)
        bins_scaled += calibration_sums(logits / temperature, y)
        if fit_temperature:
            nll_by_temperature += nll_sums(logits, y)
    loss_sum, correct, correct_tta, confusion, nll, nll_scaled, nll_by_temperature, bins, bins_scaled = world.add_up(
        loss_sum, correct, correct_tta, confusion, nll, nll_scaled, nll_by_temperature, bins, bins_scaled)
    n = len(images)
    return {"loss": loss_sum / n, "acc": correct / n, "acc_tta": correct_tta / n,
            "confusion": [[int(c) for c in confusion[row * num_classes:(row + 1) * num_classes]]
                          for row in range(num_classes)],
            "nll": nll / n, "nll_scaled": nll_scaled / n, "nll_by_temperature": [v / n for v in nll_by_temperature],
            **reliability(bins), **{f"{key}_scaled": value for key, value in reliability(bins_scaled).items()}}


# Calibration as Guo et al. 2017 measure it: 15 equal-width bins of confidence (the top class's probability),
# ECE = sum over bins of |B|/N |accuracy(B) - confidence(B)|. The temperature that divides the logits is the
# one of TEMPERATURES (1/8 to 16, 1.4% apart) with the lowest validation NLL: a grid instead of Guo's LBFGS,
# because a sum per temperature adds up over torchrun's ranks like every other count here.
CALIBRATION_BINS = 15
TEMPERATURES = torch.logspace(-3, 4, 351, base=2.0)  # an epoch at either end logs that end


def nll_sums(logits, labels):
    """The summed negative log-likelihood of `labels` at every temperature of TEMPERATURES: (351,), 32
    temperatures at a time (a (32, batch, classes) tensor: CIFAR-100 at a batch of 4096 takes 52 MB)."""
    sums = []
    for temperatures in TEMPERATURES.to(logits.device).split(32):
        log_p = torch.log_softmax(logits[None] / temperatures[:, None, None], dim=2)
        sums.append(-log_p.gather(2, labels[None, :, None].expand(len(temperatures), -1, 1)).sum(dim=(1, 2)))
    return torch.cat(sums)


def calibration_sums(logits, labels):
    """Per confidence bin: the images, their summed confidence, and how many are right; flat (3 x 15,)."""
    confidence, predicted = torch.softmax(logits, dim=1).max(dim=1)
    bins = ((confidence * CALIBRATION_BINS).ceil().long() - 1).clamp(0, CALIBRATION_BINS - 1)  # (i/15, (i+1)/15]
    sums = torch.zeros(3, CALIBRATION_BINS, device=logits.device)
    for row, values in enumerate((torch.ones_like(confidence), confidence, (predicted == labels).float())):
        sums[row].index_add_(0, bins, values)
    return sums.reshape(-1)  # flat: world.add_up's tensors


def reliability(sums):
    """The expected calibration error of calibration_sums' added-up sums (a list), and the reliability
    diagram's bins (mean confidence and accuracy in each; None where a bin is empty)."""
    count, confidence, correct = (sums[i * CALIBRATION_BINS:(i + 1) * CALIBRATION_BINS] for i in range(3))
    ece = sum(abs(right - sure) for right, sure in zip(correct, confidence)) / sum(count)
    mean = [[None if k == 0 else total / k for total, k in zip(totals, count)] for totals in (confidence, correct)]
    return {"ece": ece, "reliability": {"count": [round(k) for k in count], "confidence": mean[0],
                                        "accuracy": mean[1]}}


def fitted_temperature(validation):
    """The temperature of TEMPERATURES with the lowest NLL on the validation images (evaluate's result)."""
    nll = validation["nll_by_temperature"]
    return float(TEMPERATURES[nll.index(min(nll))])


def padded(batch, size):
    """`batch` with copies of its first row appended up to `size` rows (samples are independent in eval mode)."""
    missing = size - len(batch)
    return batch if missing <= 0 else torch.cat([batch, batch[:1].expand(missing, *batch.shape[1:])])
