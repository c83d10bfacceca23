"""Where the training time goes, on synthetic CIFAR-size images (no download): the input pipeline, the
model step and train.py's full loop in images per second, each beside its baseline, all measured in the
same run. Prints a table and writes benchmark.json.

    python benchmark.py                                        # 3 timed steps a row on a CPU, 100 on a GPU
    python benchmark.py --device cpu --batch-size 128 --steps 5
    torchrun --standalone --nproc_per_node 8 benchmark.py      # adds the gradient all-reduce and scaling

Under torchrun --batch-size is the global batch, as in train.py; the table adds the step under
DistributedDataParallel, the gradient all-reduce alone, and the scaling efficiency (the N processes'
images/s over N times one process's, at the same batch per process).
"""
import argparse
import contextlib
import os
import sys
import time
import warnings

import numpy as np
import torch

import augment
import cli
import devices
import distributed
import files
import loop
from cli import UsageError
from resnet import resnet18

import albumentations as A  # noqa: E402 - after augment, which stops it asking PyPI for updates on import

# The seed project's loop: batch 64, fp32, NCHW, 4 workers; the baseline of the speedup.
SEED_SETTINGS = {"batch_size": loop.RECIPES["seed"]["batch_size"], **loop.SEED_MACHINE, "workers": 4,
                 "compile": False}


def build_parser():
    parser = cli.Parser(prog=os.path.basename(__file__), description=__doc__.split("\n\n")[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cuda, mps or cpu (default: %(default)s)")
    parser.add_argument("--precision", choices=devices.PRECISIONS, default="auto",
                        help=f"autocast precision; {devices.PRECISION_HELP} (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=loop.RECIPES["default"]["batch_size"],
                        help="images per step; under torchrun the global batch (default: %(default)s)")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                        help="keep the NCHW memory format")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers (default: as train.py's, the CPU count less one, at most 16)")
    parser.add_argument("--steps", type=int, default=None, metavar="N",
                        help="timed steps per row (default: 3 on a CPU, about 100 s on 2 cores; 100 on a GPU)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the weights and the augmentation; the images are fixed (default: %(default)s)")
    parser.add_argument("--deterministic", action="store_true", help="deterministic algorithms only")
    parser.add_argument("--out-dir", default=".", help="where benchmark.json goes (default: the current folder)")
    return parser


def check_args(args, world):
    for name, least in (("batch_size", 1), ("steps", 1), ("workers", 0), ("seed", 0)):
        value = getattr(args, name)
        if value is not None and value < least:
            rule = "must be at least 1" if least else "must not be negative"
            raise UsageError(f"--{name.replace('_', '-')} {rule} (got {value})")
    if args.batch_size % world.size:
        raise UsageError(f"--batch-size {args.batch_size} is the global batch and does not divide among "
                         f"{world.size} processes; give a multiple of {world.size}")


def run_args(args, **changes):
    """What the loop reads: the default recipe, this command line's machine settings, 2 epochs."""
    settings = dict(loop.RECIPES["default"], epochs=2, sync_bn=False)
    settings.update(vars(args), **changes)
    return argparse.Namespace(**settings)


def synthetic_images(count, seed=0):
    """Random uint8 images of CIFAR's size and random labels: the benchmark needs no download."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, count)


def measure_pipeline(args, device, workers, batches, world, normalize_in_workers=False):
    """Augmentation + DataLoader + host-to-device copy alone: about `batches` batches, timed after a warm-up
    pass. At most 100 batches of images (157 MB at batch 512), passed over again for more. normalize_in_workers:
    float32 batches normalized by albumentations (4x the bytes through the queues and the copy)."""
    pool = min(batches, 100)
    images, labels = synthetic_images(args.batch_size * pool)
    # Shared: /dev/shm may be too small on one machine only, and the others must not wait for it.
    loader, sampler = world.together(lambda: augment.make_train_loader(
        images, labels, args, augment.CIFAR10_MEAN, device, workers,
        augment.CIFAR10_STD if normalize_in_workers else None, world=world))
    non_blocking, synchronize = loader.pin_memory, getattr(torch, device.type).synchronize

    def one_pass(epoch):
        sampler.set_epoch(epoch)
        return sum(len(batch.to(device, non_blocking=non_blocking)) for batch, _ in loader)

    with workers_stopped(loader):
        one_pass(0)  # warm-up
        synchronize()
        start = time.perf_counter()
        seen = sum(one_pass(epoch) for epoch in range(1, -(-batches // pool) + 1))
        synchronize()
        return seen / (time.perf_counter() - start)


@contextlib.contextmanager
def workers_stopped(loader):
    """The loader's workers end on leaving, also on an error (a GPU out of memory, Ctrl-C): the traceback
    keeps the loader alive, and the process would never exit (augment.stop_workers says why)."""
    try:
        yield
    finally:
        augment.stop_workers(loader)


def augmentation_rate(args, images, cutout=None):
    """Images per second through the training transform in this process: what one worker core gives.
    cutout: another transform in the place of augment.Cutout (the baseline: albumentations' CoarseDropout)."""
    transform = augment.train_transform(augment.CIFAR10_MEAN, args.cutout, args.pad_crop, args.flip)
    if cutout is not None:
        transform = A.Compose([cutout if isinstance(step, augment.Cutout) else step for step in transform.transforms])
    augment.reseed(transform, args.seed)
    start = time.perf_counter()
    for image in images:
        transform(image=image)
    return len(images) / (time.perf_counter() - start)


def measure_augmentation(args):
    """The cutout made cheap, against the albumentations CoarseDropout it replaced, on the same images, one
    core each (best of three passes, against other work on the machine)."""
    images, _ = synthetic_images(5000, seed=1)
    coarse_dropout = A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(args.cutout, args.cutout),
                                     hole_width_range=(args.cutout, args.cutout),
                                     fill=augment.mean_colour(augment.CIFAR10_MEAN), p=1.0)
    ours = max(augmentation_rate(args, images) for _ in range(3))
    baseline = max(augmentation_rate(args, images, coarse_dropout) for _ in range(3))
    return {"augmentation_per_core_images_per_s": ours, "coarse_dropout_per_core_images_per_s": baseline,
            "cutout_speedup_per_core": ours / baseline}


def measure_step(args, precision, device, steps, batch, world=distributed.World()):
    """The training step alone: loop.train_one_epoch over one batch already on the device, again and again
    (no loader). With a launched `world`, under DistributedDataParallel (each process a batch of its own).
    Returns one process's images per second."""
    trainer = loop.Trainer(loop.build_model(10, args, device), args, precision, device, augment.CIFAR10_MEAN,
                           augment.CIFAR10_STD, steps_per_epoch=steps + 2, world=world)
    images, labels = synthetic_images(batch, seed=world.rank)
    batches = [(augment.to_tensor(images).contiguous().to(device), torch.from_numpy(labels).to(device))]
    with loop.StopFlag(world) as stop:
        # Two steps first: kernel selection, compilation, the heap's growth.
        loop.train_one_epoch(trainer, batches * 2, 1, 2, stop, bar_enabled=False)
        timed = loop.train_one_epoch(trainer, batches * steps, 2, 2, stop, bar_enabled=False)
    return timed["images_per_s"] / world.size  # the epoch counts every process's images


def measure_all_reduce(device, steps, world):
    """Seconds for one all-reduce of the gradients' bytes (ResNet18's 11.2 million float32 values) alone.
    DistributedDataParallel overlaps it with the backward pass in 25 MB buckets: this is its full cost."""
    flat = torch.zeros(sum(p.numel() for p in resnet18().parameters()), device=device)
    synchronize = getattr(torch, device.type).synchronize
    for _ in range(2):
        torch.distributed.all_reduce(flat, group=world.data)
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        torch.distributed.all_reduce(flat, group=world.data)
    synchronize()
    return (time.perf_counter() - start) / steps, flat.numel() * flat.element_size()


def measure_full_loop(args, precision, device, workers, steps, world):
    """The real training loop (loop.train_one_epoch) over `steps` batches; the second of two epochs is timed."""
    images, labels = synthetic_images(args.batch_size * steps)
    loader, sampler = world.together(lambda: augment.make_train_loader(
        images, labels, args, augment.CIFAR10_MEAN, device, workers, world=world))
    trainer = loop.Trainer(loop.build_model(10, args, device), args, precision, device, augment.CIFAR10_MEAN,
                           augment.CIFAR10_STD, steps_per_epoch=len(loader), world=world)
    with loop.StopFlag(world) as stop, workers_stopped(loader):
        for epoch in (1, 2):
            sampler.set_epoch(epoch)
            stats = loop.train_one_epoch(trainer, loader, epoch, 2, stop, bar_enabled=False)
    return stats["images_per_s"]


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "GPU memory allocated"
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**20, "GPU memory held by the Metal driver (at the end)"
    import resource
    peak = devices.peak_resident_mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak, "resident memory, main process"


def measure_all(args, device, precision, workers, world):
    """Every row of the benchmark, in one run, so that the ratios compare like with like."""
    torch.manual_seed(args.seed)
    steps = args.steps or (3 if device.type == "cpu" else 100)
    run = run_args(args)
    seed_run = run_args(args, **SEED_SETTINGS)
    batch = world.per_rank(args.batch_size)  # the step alone: one process's share, without collectives
    print(f"benchmark on {devices.device_name(device)}: batch {args.batch_size}"
          f"{f' ({world.size} processes of {world.per_rank(args.batch_size)})' if world.launched else ''}, "
          f"{precision}, {'channels_last' if args.channels_last else 'NCHW'}, {workers} worker{'s' * (workers != 1)}, "
          f"{steps} timed steps each")
    # The pipeline is cheap to measure, so it gets 10x the batches: less noise.
    pipeline = measure_pipeline(run, device, workers, 10 * steps, world)
    pipeline_float = measure_pipeline(run, device, workers, 10 * steps, world, normalize_in_workers=True)
    augmentation = measure_augmentation(run)
    # The step with glibc's default allocator too, as the baseline of heap reuse.
    tune_heap = device.type == "cpu" and loop.glibc() is not None
    step_default_heap = measure_step(run, precision, device, steps, batch) if tune_heap else None
    result = {}
    with loop.freed_memory_kept_in_heap(tune_heap) as heap_reuse:
        step = measure_step(run, precision, device, steps, batch)
        if world.launched:
            result.update(distributed_rows(run, precision, device, steps, world, step))
        full = measure_full_loop(run, precision, device, workers, steps, world)
        with warnings.catch_warnings():  # 4 workers on a 2-core machine draw a warning: the seed used 4
            warnings.filterwarnings("ignore", message="This DataLoader will create")
            seed = measure_full_loop(seed_run, "fp32", device, SEED_SETTINGS["workers"], steps, world)
    memory, memory_kind = peak_memory_mb(device)
    # The loop's rate counts every process's images; the pipeline and the step are one process's.
    step_per_process = result["ddp_step_images_per_s"] / world.size if world.launched else step
    return {"device": devices.device_name(device), "precision": precision, "batch_size": args.batch_size,
            "channels_last": args.channels_last, "compile": args.compile, "workers": workers, "steps": steps,
            "cpu_heap_reuse": heap_reuse, **world.description(), "per_rank_batch": world.per_rank(args.batch_size),
            "pipeline_images_per_s": pipeline, "pipeline_normalized_in_workers_images_per_s": pipeline_float,
            "pipeline_per_worker_images_per_s": pipeline / max(1, workers),
            "workers_to_feed_40k_images_per_s": 40_000 * max(1, workers) / pipeline, **augmentation,
            "step_images_per_s": step, **result,
            "step_default_malloc_images_per_s": step_default_heap if heap_reuse else None,
            "full_loop_images_per_s": full,
            "efficiency": full / world.size / min(pipeline, step_per_process),
            "seed_settings_images_per_s": seed, "speedup_over_seed_settings": full / seed,
            "peak_memory_mb": memory, "peak_memory_kind": memory_kind, "torch": torch.__version__}


def distributed_rows(run, precision, device, steps, world, step_alone):
    """The step under DistributedDataParallel, the gradient all-reduce alone, and the scaling efficiency."""
    ddp_step = measure_step(run, precision, device, steps, world.per_rank(run.batch_size), world)
    all_reduce_seconds, gradient_bytes = measure_all_reduce(device, steps, world)
    return {"ddp_step_images_per_s": ddp_step * world.size, "all_reduce_ms": 1000 * all_reduce_seconds,
            "gradient_mb": gradient_bytes / 2**20, "step_ms": 1000 * world.per_rank(run.batch_size) / ddp_step,
            "scaling_efficiency": ddp_step / step_alone}


# The table: (label, key in the result, format); labels name result keys in braces. A row whose value is
# missing (the torchrun rows in one process) or None (the default malloc, without heap reuse) is left out.
TABLE = [
    ("input pipeline alone (augment + DataLoader + copy){one_of}", "pipeline_images_per_s", "{:,.0f} img/s"),
    ("  per worker ({workers})", "pipeline_per_worker_images_per_s", "{:,.0f} img/s"),
    ("  workers (a core each) to feed 40,000 img/s", "workers_to_feed_40k_images_per_s", "{:.1f}"),
    ("  normalized to float32 in the workers instead", "pipeline_normalized_in_workers_images_per_s", "{:,.0f} img/s"),
    ("augmentation alone, one core", "augmentation_per_core_images_per_s", "{:,.0f} img/s"),
    ("  the same, cutout by albumentations' CoarseDropout", "coarse_dropout_per_core_images_per_s", "{:,.0f} img/s"),
    ("  speedup of the cheap cutout", "cutout_speedup_per_core", "{:.2f}x"),
    ("model step alone (forward + backward + SGD){one_of}", "step_images_per_s", "{:,.0f} img/s"),
    ("  the same, glibc's default malloc (no heap reuse)", "step_default_malloc_images_per_s", "{:,.0f} img/s"),
    ("model step, DistributedDataParallel, all {world_size} processes", "ddp_step_images_per_s", "{:,.0f} img/s"),
    ("  its time per step", "step_ms", "{:,.1f} ms"),
    ("  gradient all-reduce alone ({gradient_mb:.1f} MiB, {backend})", "all_reduce_ms", "{:,.1f} ms"),
    ("scaling efficiency: {world_size}-process step / ({world_size} x one process's)", "scaling_efficiency", "{:.2f}"),
    ("full training loop{all_of}", "full_loop_images_per_s", "{:,.0f} img/s"),
    ("efficiency: full{per_process} / min(pipeline, step)", "efficiency", "{:.2f}"),
    ("seed's settings: batch 64, fp32, NCHW, 4 workers", "seed_settings_images_per_s", "{:,.0f} img/s"),
    ("speedup over the seed's settings", "speedup_over_seed_settings", "{:.2f}x"),
    ("peak {peak_memory_kind}", "peak_memory_mb", "{:,.0f} MiB"),
]


def benchmark_table(r):
    several = r["world_size"] > 1
    names = dict(r, one_of=f" (one of {r['world_size']} processes)" if several else "",
                 all_of=f", all {r['world_size']} processes" if several else "", per_process=" / processes" * several)
    rows = [(label.format(**names), form.format(r[key])) for label, key, form in TABLE if r.get(key) is not None]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value:>14}" for name, value in rows)


def settle(args, world):
    """The arguments checked; this rank's device and precision."""
    check_args(args, world)
    return loop.resolve_device(args, world)


def benchmark(read_command_line, world):
    with distributed.processes(world) as world:
        args = world.together(read_command_line)  # once connected: a bad flag on one machine stops all
        device, precision = world.together(lambda: settle(args, world))  # a failure on one machine stops all
        world = distributed.on_device(world, device, precision)
        workers = augment.default_workers(world.local_size) if args.workers is None else args.workers
        with devices.applied(devices.backend_settings(device.type, args.deterministic)):
            result = measure_all(args, device, precision, workers, world)
    if world.main:
        print(benchmark_table(result))
        path = os.path.join(args.out_dir, "benchmark.json")
        try:
            os.makedirs(args.out_dir, exist_ok=True)
            files.write_json(path, result)
        except OSError as error:
            raise UsageError(f"cannot write {path} ({error.strerror}); choose another --out-dir") from None
        print(f"wrote {path}", flush=True)
    return 0


def main(argv=None):
    world = distributed.world_from_environment()
    try:
        with distributed.quiet_unless(world.main):
            return benchmark(lambda: build_parser().parse_args(argv), world)
    except (UsageError, devices.DeviceError, distributed.ElsewhereFailed, distributed.ProcessesDiffer) as error:
        # A device problem may be this machine's alone (its /dev/shm): each rank says its own.
        distributed.report_error(world, "benchmark.py", error, f"error: {error}",
                                 (UsageError, distributed.ElsewhereFailed, distributed.ProcessesDiffer))
        return 2
    except (loop.Stopped, KeyboardInterrupt) as error:  # Ctrl-C or SIGTERM during a timed row
        distributed.report_error(world, "benchmark.py", error, "stopped; benchmark.json was not written",
                                 (loop.Stopped, KeyboardInterrupt))
        return 130


if __name__ == "__main__":
    sys.exit(main())
