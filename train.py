"""Train ResNet18 (CIFAR variant) on CIFAR-10 with albumentations augmentation.

    python train.py --epochs 50                                        # the default recipe, on a GPU
    python train.py --device cpu --train-subset 5000 --test-subset 1000 --epochs 8 --batch-size 128  # ~7 min on 2 cores
    python train.py --resume last.pt                                   # continue a stopped run
    python train.py --recipe airbench --epochs 26                      # airbench's ResNet-18 settings as published
    torchrun --standalone --nproc_per_node 8 train.py --epochs 50      # the same recipe on 8 GPUs

Writes into --out-dir (default: the current folder) log.json (rewritten after every epoch), last.pt
(every epoch, for --resume), best.pt (the best epoch so far) and probe.npz (--probe: the Grad-CAM maps of
8 test images after every epoch), which is what `gradcam.py` and `plot_curves.py log.json` read by
default. Checkpoints hold only tensors and plain values: torch.load(path, weights_only=True) reads them.
Under torchrun only rank 0 writes and prints, but for errors: one that a process alone meets, it says;
one that every process meets, each machine says once.
The recipes, resuming, torchrun and every output file are described in docs/. The epoch loop is
train(), just below main(); the training step is in loop.train_one_epoch.
"""
import argparse
import contextlib
import os
import signal
import sys
import time

import torch

import augment
import cam_checks
import cli
import devices
import distributed
import files
import loop
import probe
import runfiles
from cli import UsageError, note, warn
from loop import Diverged, Stopped
from resnet import CheckpointError
from runfiles import BEST_NAME, FINAL_KEYS, LAST_NAME, LOG_NAME, RUNTIME_FLAGS


# ----------------------------------------------------------------------------- the run

# Errors that every rank meets at the same point (the same arguments, a shared decision): said once a machine.
SAID_ONCE_A_MACHINE = (UsageError, Diverged, Stopped, distributed.ElsewhereFailed, distributed.ProcessesDiffer)


def main(argv=None):
    world = distributed.world_from_environment()
    try:
        with distributed.quiet_unless(world.main):
            return train(lambda: (parse_args(argv), runfiles.flags_given(build_parser(), argv)), world)
    except (UsageError, CheckpointError, augment.DatasetError, devices.DeviceError, files.FolderInUse,
            distributed.ElsewhereFailed, distributed.ProcessesDiffer) as error:
        return report(world, error, "error: ", 2)
    except Diverged as error:
        return report(world, error, "stopped: ", 1)
    except Stopped as error:
        return report(world, error, "stopped ", 130)
    except KeyboardInterrupt:  # before the run's own handler was installed
        return report(world, "stopped before the first epoch; nothing was written", "", 130)
    except runfiles.WriteFailed as error:
        return report(world, error, "error: ", 1)


def train(read_command_line, world=distributed.World()):
    """The whole run: the checks, then the epochs, each trained, evaluated, saved and printed.
    `read_command_line()`: the arguments and the flags the command line set (flags_given); `world`: the
    processes of a torchrun launch (one without it). Returns the exit code."""
    with distributed.processes(world) as world:
        args, checkpoint, device, precision, world, data, parts = prepare(read_command_line, world)
        # Signals set a flag from here on: a stop during the setup still ends cleanly, at the first step.
        # Every process-wide setting goes back on leaving: main() may run inside a notebook or a test.
        heap = loop.freed_memory_kept_in_heap(device.type == "cpu")
        with contextlib.ExitStack() as stack:
            world.together(lambda: stack.enter_context(runfiles.own_out_dir(args.out_dir)), here=world.main)
            stop = stack.enter_context(loop.StopFlag(world))
            stack.enter_context(devices.applied(devices.backend_settings(device.type, args.deterministic)))
            run = Run(args, data, parts, checkpoint, device, precision, stack.enter_context(heap), world)
            # Bars only for a person at a terminal, from rank 0; a redirected run gets a line a minute.
            bar = world.main and sys.stdout.isatty() and sys.stderr.isatty()
            lines_every = 60 if world.main and not bar else None
            trainer, first = run.trainer, len(run.history) + 1
            with run.ending_cleanly():
                for epoch in range(first, args.epochs + 1):
                    start = time.perf_counter()
                    run.sampler.set_epoch(epoch)
                    record = {"epoch": epoch, "lr": trainer.lr(), **loop.train_one_epoch(
                        trainer, run.loader, epoch, args.epochs, stop, bar, lines_every=lines_every)}
                    final = run.evaluate(record, bar)
                    if args.schedule == "plateau":  # never on the test set
                        trainer.scheduler.step(record["val_acc"] if run.val is not None else record["train_loss"])
                    record["seconds"] = time.perf_counter() - start
                    run.save(record, final)  # written while the next epoch trains
                    cli.say(epoch_line(record, args.epochs, run.val is not None))
            run.say_done(stop, trained=first <= args.epochs)
    return 0


def report(world, error, kind, code):
    """One line on stderr (distributed.report_error); returns the exit code."""
    distributed.report_error(world, "train.py", error, f"{kind}{error}", SAID_ONCE_A_MACHINE)
    return code


# ----------------------------------------------------------------------------- command line

# --help ends with the docstring's commands: one text, not two.
EPILOG = "examples:\n" + __doc__.split("\n\n")[1]


def parse_args(argv=None):
    """The command line, with the defaults of the --recipe it names."""
    recipe_only = cli.Parser(prog=os.path.basename(__file__), add_help=False)
    recipe_only.add_argument("--recipe", choices=sorted(loop.RECIPES), default="default")
    recipe = recipe_only.parse_known_args(argv)[0].recipe
    return build_parser(recipe).parse_args(argv)


def build_parser(recipe="default"):
    parser = cli.Parser(prog=os.path.basename(__file__), description=__doc__.split("\n\n")[0], epilog=EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=sorted(loop.RECIPES), default="default",
                        help="a whole recipe in one word: default, airbench (its ResNet-18 baseline as published) or "
                             "seed (the project this started from); flags beside it override it (default: %(default)s)")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=sorted(augment.DATASETS), default="cifar10", help="(default: %(default)s)")
    data.add_argument("--data-dir", default="./data",
                      help="folder holding (or receiving) the dataset (default: %(default)s)")
    data.add_argument("--no-download", dest="download", action="store_false",
                      help="fail instead of downloading a missing dataset")
    data.add_argument("--train-subset", type=int, default=0, metavar="N",
                      help="train on the first N training images only (0: all), for quick runs (default: %(default)s)")
    data.add_argument("--test-subset", type=int, default=0, metavar="N",
                      help="evaluate on N class-balanced test images only (0: all), for quick runs; their "
                           "accuracy is not the test accuracy (default: %(default)s)")
    data.add_argument("--val-split", type=int, metavar="N",
                      help="hold out N training images for validation, which the plateau schedule and best.pt "
                           "then watch (default: %(default)s)")
    data.add_argument("--plant-shortcut", metavar="CLASS",
                      help="stamp a 4x4 patch on 80%% of CLASS's training images: a model that learns a shortcut on "
                           "purpose, whose right explanation is known (gradcam.py --shortcut); its files say so")
    data.add_argument("--probe", type=int, default=8, metavar="N",
                      help=f"after every epoch, Grad-CAM at {probe.LAYER} of N fixed test images (one per class first) "
                           f"into {probe.PROBE_NAME}, drawn by plot_curves.py (0: off) (default: %(default)s)")
    data.add_argument("--workers", type=int,
                      help="DataLoader workers (default: the cores less one, at most 16; shared under torchrun)")

    aug = parser.add_argument_group("augmentation")
    aug.add_argument("--pad-crop", type=int, metavar="PIXELS",
                     help="reflect-pad by this many pixels, then random 32x32 crop (0: off) (default: %(default)s)")
    aug.add_argument("--no-flip", dest="flip", action="store_false", help="no random horizontal flip")
    aug.add_argument("--cutout", type=int, metavar="PIXELS",
                     help="side of the square hole filled with the mean colour (0: off) (default: %(default)s)")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=50, help="training epochs (default: %(default)s)")
    opt.add_argument("--batch-size", type=int,
                     help="images per step; under torchrun the global batch (default: %(default)s)")
    opt.add_argument("--lr", type=float, help="peak learning rate (default: 0.2 * batch-size / 500)")
    opt.add_argument("--momentum", type=float, help="SGD momentum (default: %(default)s)")
    opt.add_argument("--no-nesterov", dest="nesterov", action="store_false", help="plain momentum")
    opt.add_argument("--weight-decay", type=float, help="L2 weight decay (default: %(default)s)")
    opt.add_argument("--label-smoothing", type=float, help="label smoothing (default: %(default)s)")
    opt.add_argument("--schedule", choices=(*loop.ONE_CYCLE_SHAPES, "plateau"),
                     help="onecycle (PyTorch's OneCycleLR, cosine) or linear (airbench's), stepped every batch; "
                          "plateau: ReduceLROnPlateau on the validation accuracy, else the training loss, never "
                          "the test set (default: %(default)s)")
    opt.add_argument("--warmup", type=float, metavar="FRACTION",
                     help="onecycle, linear: fraction of the steps warming up (default: %(default)s)")
    opt.add_argument("--plateau-patience", type=int, metavar="EPOCHS",
                     help="plateau: epochs without improvement before the lr drops 10x (default: %(default)s)")

    speed = parser.add_argument_group("device and speed")
    speed.add_argument("--device", default="auto",
                       help="auto (cuda, then mps, then cpu), cuda, mps or cpu (default: %(default)s)")
    speed.add_argument("--precision", choices=devices.PRECISIONS, default="auto",
                       help=f"autocast precision; {devices.PRECISION_HELP}. fp16 runs on a CPU too, slowly "
                            "(default: %(default)s)")
    speed.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                       help="keep the NCHW memory format")
    speed.add_argument("--compile", action="store_true", help="torch.compile the model")
    speed.add_argument("--sync-bn", action="store_true",
                       help="under torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm); "
                            "slower")
    speed.add_argument("--seed", type=int, default=0,
                       help="seed of weights, data order and augmentation (default: %(default)s)")
    speed.add_argument("--deterministic", action="store_true",
                       help="deterministic algorithms only (slower): a resumed CPU run repeats an uninterrupted "
                            "one exactly (in a notebook on a GPU, set CUBLAS_WORKSPACE_CONFIG=:4096:8 first)")

    out = parser.add_argument_group("output")
    out.add_argument("--out-dir", help=f"where {LOG_NAME}, {LAST_NAME} and {BEST_NAME} go (default: the "
                                       "current folder, or the folder of --resume)")
    out.add_argument("--overwrite", action="store_true",
                     help="replace the files of another run found in --out-dir (refused without it)")
    out.add_argument("--resume", metavar="PATH",
                     help=f"continue the run saved in this {LAST_NAME}: its recipe (--data-dir and --no-download "
                          "keep theirs unless given), this command line's --device, --precision, --workers, ...")
    parser.set_defaults(**loop.RECIPES[recipe], recipe=recipe)
    if recipe == "seed":
        parser.set_defaults(**loop.SEED_MACHINE)
    return parser


def check_args(args, world=distributed.World()):
    """Raise UsageError for values no run can use (with `world`'s processes)."""
    rules = ((("epochs", "batch_size"), lambda v: v >= 1, "must be at least 1"),
             (("train_subset", "test_subset", "val_split", "seed", "pad_crop", "cutout", "weight_decay",
               "plateau_patience", "workers", "probe"), lambda v: v is None or v >= 0, "must not be negative"),
             (("lr",), lambda v: v is None or v > 0, "must be positive"),
             (("label_smoothing",), lambda v: 0 <= v < 1, "must be in [0, 1)"),
             (("warmup",), lambda v: 0 < v < 1, "must be between 0 and 1"),
             (("cutout",), lambda v: v <= 32, "must be at most 32 pixels"),
             (("probe",), lambda v: v <= probe.MOST, f"must be at most {probe.MOST} (its maps are in each checkpoint)"))
    for names, allowed, rule in rules:
        for name in names:
            if not allowed(getattr(args, name)):
                raise UsageError(f"--{name.replace('_', '-')} {rule} (got {getattr(args, name)})")
    if args.batch_size % world.size:
        raise UsageError(batch_not_divisible(args, world.size))


def batch_not_divisible(args, processes):
    """What to do when the global batch does not divide among the processes: a resumed run keeps its batch."""
    batch = args.batch_size
    if args.resume:
        counts = [n for n in range(1, 2 * processes + 1) if batch % n == 0]
        where = (f"on {', '.join(map(str, counts[:-1]))} or {counts[-1]} processes" if len(counts) > 1
                 else "in a single process")
        return (f"{args.resume} was saved with a global batch of {batch}, which does not divide among {processes} "
                f"processes; resume it {where}")
    nearest = [n for n in (batch - batch % processes, batch - batch % processes + processes) if n > 0]
    return (f"--batch-size {batch} is the global batch and does not divide among {processes} processes; give a "
            f"multiple of {processes} ({' or '.join(map(str, nearest))})")


def epoch_line(record, epochs, has_val):
    val = f"  val loss {record['val_loss']:.4f} acc {100 * record['val_acc']:.2f}%" if has_val else ""
    scaled = f" ({100 * record['test_ece_scaled']:.2f}% at T {record['temperature']:.2f})" if has_val else ""
    return (f"epoch {record['epoch']:>3}/{epochs}  lr {record['lr']:.4g}  "
            f"train loss {record['train_loss']:.4f} acc {100 * record['train_acc']:.2f}%{val}  "
            f"test loss {record['test_loss']:.4f} acc {100 * record['test_acc']:.2f}% "
            f"(flip TTA {100 * record['test_acc_tta']:.2f}%) ECE {100 * record['test_ece']:.2f}%{scaled}  "
            f"{record['seconds']:.1f}s in all (training {record['train_seconds']:.1f}s at "
            f"{record['images_per_s']:.0f} img/s)")


# ----------------------------------------------------------------------------- setting up

def prepare(read_command_line, world):
    """Every input checked before anything is created: a bad dataset leaves no folder and no lock behind.
    Each rank reads its own command line, checkpoint, device and data (its machine's copies); a failure
    anywhere stops every rank. Under torchrun rank 0 owns the folder, and each machine's first process
    downloads the data while the others wait."""
    # Read once connected: a bad flag on one machine stops every process, not that machine's alone.
    args, given = world.together(read_command_line)
    args, checkpoint, device, precision = world.together(lambda: settle(args, given, world))
    world.together(lambda: runfiles.check_new_run(args, checkpoint), here=world.main)
    data = load_data(args, world)
    world = distributed.on_device(world, device, precision, agreed_settings(args, checkpoint, data))
    if checkpoint is not None and list(checkpoint["classes"]) != list(data.classes):
        # The same on every rank (compared just above): said once a machine.
        saved, found = (", ".join(map(str, classes[:3])) + ", ..." for classes in (checkpoint["classes"], data.classes))
        raise UsageError(f"{args.resume} was trained on other classes ({saved}) than those in {args.data_dir} "
                         f"({found}); resume it with the run's data")
    parts = augment.split_data(data, args)
    steps = len(augment.SeededBatchSampler(len(parts[0][1]), args.batch_size, args.seed))  # an epoch's
    saved_steps = checkpoint and checkpoint["scheduler"].get("total_steps")
    if saved_steps and saved_steps != args.epochs * steps:  # the same on every rank: the data were compared
        raise UsageError(f"{args.resume} took {saved_steps // args.epochs} steps an epoch, but these training "
                         f"images make {steps}: resume it with the run's data (and --train-subset)")
    return args, checkpoint, device, precision, world, data, parts


def settle(args, given, world):
    """The run's arguments (with --resume: merged with its checkpoint), checked, the checkpoint, and this
    rank's device and precision."""
    checkpoint = None
    if args.resume:
        defaults = vars(build_parser().parse_args([]))
        args, checkpoint = runfiles.args_for_resume(args, given, defaults)
    check_args(args, world)
    # The peak lr as a number in log.json and the checkpoint: "default" names other values in other versions.
    args.lr = loop.derived_lr(args)
    device, precision = loop.resolve_device(args, world)
    args.out_dir = args.out_dir or "."
    args.data_dir = os.path.abspath(args.data_dir)  # saved in the checkpoint: a resume from any folder finds it
    return args, checkpoint, device, precision


def load_data(args, world):
    """The dataset, downloaded (if missing and allowed) once per machine by its first process, rank 0's
    machine first: on a shared file system the others then find it there instead of writing it again."""
    def load(download):
        return augment.load_dataset(args.dataset, args.data_dir, download=download)
    loaded = [world.together(lambda: load(args.download), here=world.main),
              world.together(lambda: load(args.download), here=world.local_rank == 0 and not world.main),
              world.together(lambda: load(False), here=world.local_rank != 0)]
    return next(data for data in loaded if data is not None)


# Machine flags that every process must share all the same: --sync-bn changes the collectives of every
# forward, --no-channels-last the parameters' layout (DDP compares their strides).
AGREED_MACHINE_FLAGS = ("sync_bn", "channels_last")


def agreed_settings(args, checkpoint, data):
    """What every process must share, by name: the recipe by the flag that sets it (the seed too: it
    shuffles each rank's share of the images), two machine flags, a resumed run's history, and the data
    (other image counts would make the ranks take different numbers of steps). The same names on every
    rank, whatever its checkpoint holds: the parser's."""
    options = {action.dest: action.option_strings[-1] for action in build_parser()._actions if action.option_strings}
    settings = {options[name]: getattr(args, name, None) for name in options
                if name not in RUNTIME_FLAGS + ("help",) or name in AGREED_MACHINE_FLAGS}
    return {**settings, "the checkpoint's history": checkpoint["history"] if checkpoint else None,
            "the checkpoint's classes": checkpoint["classes"] if checkpoint else None,
            "training images": len(data.train_labels), "test images": len(data.test_labels),
            "classes": data.classes, "official files": data.official}


class Run:
    """What one training run holds besides its loop (train()): the loader, the trainer, the evaluation
    images, its history and files; it evaluates an epoch, saves it, and ends the run cleanly."""

    def __init__(self, args, data, parts, checkpoint, device, precision, heap_reuse, world=distributed.World()):
        torch.manual_seed(args.seed)
        (train_images, train_labels), val = parts  # split_data's
        test_images, test_labels = augment.test_data(data, args)
        workers = augment.default_workers(world.local_size) if args.workers is None else args.workers
        if device.type == "cpu" and args.epochs * len(train_images) > 100_000:
            warn(f"training on the CPU: {args.epochs} epochs of {len(train_images)} images will "
                 f"take hours; use a GPU, or --train-subset and --epochs for a quick run")
        self.args, self.data, self.world, self.resumed = args, data, world, checkpoint
        # Shared: /dev/shm may be too small on one machine only, and the others must not wait for it.
        self.loader, self.sampler = world.together(lambda: augment.make_train_loader(
            train_images, train_labels, args, data.mean, device, workers, world=world))
        model = loop.build_model(len(data.classes), args, device)
        self.trainer = loop.Trainer(model, args, precision, device, data.mean, data.std, len(self.loader), world)
        self.history, self.best, self.last_final = [], None, None
        if checkpoint is not None:  # a checkpoint that does not fit fails everywhere alike, or stops the rest
            world.together(lambda: runfiles.restore_checkpoint(self.trainer, checkpoint))
            self.history, self.best = list(checkpoint["history"]), checkpoint["best"]
            self.last_final = {key: checkpoint.get(key) for key in FINAL_KEYS}
        self.writer = runfiles.BackgroundWriter(saved_epoch=len(self.history), enabled=world.main)
        self.test = augment.as_tensors(test_images, test_labels, device)
        self.val = None if val is None else augment.as_tensors(*val, device)
        # --probe: the same test images every epoch, chosen once; a resume goes on with the checkpoint's.
        self.probed = (checkpoint or {}).get("probe")
        if self.probed is None and args.probe:
            picked = probe.pick(test_labels, args.probe, args.seed)
            self.probed = probe.state(*(tensor[picked.to(device)] for tensor in self.test), picked, [])
        self.shortcut = cam_checks.planted_shortcut(args.plant_shortcut, data.classes)
        self.described = runfiles.data_description(data, test_labels, self.shortcut)
        if self.shortcut:
            warn(f"--plant-shortcut: {100 * cam_checks.SHORTCUT_SHARE:.0f}% of the {self.shortcut['class_name']} "
                 f"training images carry a patch, which this model will learn as the class's sign; its files say so")
        self.best_key = "val_acc" if val is not None else "test_acc"
        self.env = runfiles.environment(device, precision, workers, args, heap_reuse, world)
        self.paths = {name: os.path.join(args.out_dir, name) for name in runfiles.RUN_FILES}
        self.resume_command = world.resume_command(__file__, self.paths[LAST_NAME])
        dropped = len(train_images) - len(self.loader) * args.batch_size
        if dropped > 0:
            note(f"each epoch trains on {len(self.loader)} batches of {args.batch_size}: {dropped} of the "
                 f"{len(train_images)} training images, different ones each epoch, are left out (a smaller "
                 f"last batch would disturb BatchNorm's statistics and make --compile compile again)")
        processes = (f" x {world.size} processes on {world.nodes} node{'s' * (world.nodes > 1)} ({world.backend}, "
                     f"{world.per_rank(args.batch_size)} images a step each)" if world.launched else "")
        if len(self.history) < args.epochs:  # else say_done() says there is nothing to do
            cli.say(f"{'resuming at' if self.history else 'training from'} epoch {len(self.history) + 1}/{args.epochs}"
                    f" on {self.env['device_name']} ({precision}, {workers} workers){processes}, {len(train_images)} "
                    f"training images, {len(test_labels)} test images; writing into {args.out_dir}/")

    def evaluate(self, record, bar):
        """The validation (with --val-split) and test loss, accuracy and calibration into `record`; with
        --val-split also the temperature fitted on the validation images and the test calibration after it.
        Returns the test confusion matrix and reliability bins (FINAL_KEYS), and the probe's epoch (--probe,
        rank 0). Batches: each process's share of a training batch (the memory it has)."""
        batch, epoch, classes = self.world.per_rank(self.args.batch_size), record["epoch"], len(self.data.classes)
        temperature = 1.0
        if self.val is not None:
            val = loop.evaluate(self.trainer, *self.val, classes, batch, f"epoch {epoch} validation", bar,
                                fit_temperature=True)
            temperature = loop.fitted_temperature(val)  # never from the test set
            record.update(val_loss=val["loss"], val_acc=val["acc"], val_nll=val["nll"], temperature=temperature)
        test = loop.evaluate(self.trainer, *self.test, classes, batch, f"epoch {epoch} test", bar, temperature)
        record.update(test_loss=test["loss"], test_acc=test["acc"], test_acc_tta=test["acc_tta"],
                      test_nll=test["nll"], test_ece=test["ece"])
        if self.val is not None:
            record.update(test_nll_scaled=test["nll_scaled"], test_ece_scaled=test["ece_scaled"])
        final = {"confusion": test["confusion"], "reliability": test["reliability"]}
        if self.probed is not None:  # rank 0 alone writes it; a failure there stops every rank
            start = time.perf_counter()
            final["probe"] = self.world.together(lambda: probe.explain(self.trainer, self.probed, epoch),
                                                 here=self.world.main)
            record["probe_seconds"] = time.perf_counter() - start
        return final

    def files_written(self):
        """Wait for rank 0's write in progress; a failed write (a full disk) stops every rank, not rank 0
        alone (the others would wait for it in the next step). Returns the last epoch saved."""
        self.world.together(self.writer.wait, here=self.world.main)
        return self.writer.saved_epoch

    def log(self, history, final):
        """log.json's contents after `history`; the final metrics come from the last epoch's `final`."""
        finished = history and history[-1]["epoch"] == self.args.epochs
        return runfiles.build_log(self.args, self.env, self.data.classes, history, self.best_key, self.described,
                                  final if finished else None)

    def save(self, record, final):
        """Snapshot a finished epoch (CPU copies: training goes on) and hand last.pt, best.pt, probe.npz and
        log.json to the writer, which writes them while the next epoch trains."""
        self.files_written()  # the epoch before's, written while this one trained
        epoch, history = record["epoch"], self.history + [record]
        improved = self.best is None or record[self.best_key] > self.best["value"]
        best = {"metric": self.best_key, "value": record[self.best_key], "epoch": epoch} if improved else self.best
        probed = self.probed
        if final.get("probe"):
            probed = {**probed, "epochs": probed["epochs"] + [final["probe"]]}

        def snapshot():
            checkpoint = runfiles.build_checkpoint(self.trainer, self.args, self.data, epoch, history, best)
            checkpoint.update(data=self.described, probe=probed, **{key: final[key] for key in FINAL_KEYS})
            return checkpoint, self.log(history, final)

        self.writer.submit(epoch, snapshot, lambda checkpoint, log: runfiles.save_epoch(
            self.paths, checkpoint, improved, log, self.resume_command))
        self.history, self.best, self.probed = history, best, probed

    def catch_up_files(self):
        """On a resume, bring the folder up to date with the checkpoint first (runfiles.catch_up)."""
        log = self.log(self.history, self.last_final)
        runfiles.catch_up(self.paths, os.path.abspath(self.args.resume), self.resumed, log)
        if not os.path.exists(self.paths[BEST_NAME]):
            note(f"no best.pt of epoch {self.best['epoch']} came with {self.args.resume}: {self.paths[BEST_NAME]} "
                 f"appears when an epoch beats its {self.best_key} {100 * self.best['value']:.2f}%; until then "
                 f"gradcam.py can read {self.paths[LAST_NAME]}")

    @contextlib.contextmanager
    def ending_cleanly(self):
        """Around the epochs: a resumed folder is brought up to date first; every way out (the end, a NaN,
        a stop, any other error) waits for the files in writing and says how to go on."""
        if self.history:
            self.world.together(self.catch_up_files, here=self.world.main)
        self.resumed = None  # its tensors are in the model and optimizer now
        try:
            try:
                yield
                self.files_written()
            except Diverged as error:
                done = self.files_written()
                saved = f"{self.paths[LAST_NAME]} still holds epoch {done}" if done else "no epoch was saved"
                raise Diverged(f"{error}; {saved}. Lower --lr (or check the data) and start again") from None
            except (Stopped, KeyboardInterrupt) as error:
                done = self.files_written()  # every rank waits here until rank 0's files are complete
                saved = (f"{'epoch 1 is' if done == 1 else f'epochs 1-{done} are'} saved; continue with: "
                         f"{self.resume_command}" if done else "no epoch was completed, nothing was saved")
                raise Stopped(f"at {error or f'epoch {len(self.history) + 1}'}; {saved}") from None
        except BaseException:
            # Every way out, also a write that fails while a stop waits for it (a full disk at a SIGTERM):
            # the write in progress finishes before the lock goes, or a next run could take the folder while
            # a file is half-written, and the loader's workers end now (augment.stop_workers says why).
            with contextlib.suppress(Exception):
                self.writer.wait()
            augment.stop_workers(self.loader)
            raise

    def say_done(self, stop, trained):
        if not trained:
            cli.say(f"nothing to do: {self.args.resume} already holds all {self.args.epochs} epochs")
            return
        if stop.signal is not None:
            cli.say(f"{signal.Signals(stop.signal).name} came after the last training step: the run is complete")
        summary = runfiles.summarize(self.history, self.best_key)
        planted = f" (with the shortcut planted in {self.shortcut['class_name']})" if self.shortcut else ""
        cli.say(f"done{planted}: final test accuracy {100 * summary['final_test_acc']:.2f}% (flip TTA "
                f"{100 * summary['final_test_acc_tta']:.2f}%), best {100 * summary['best_test_acc']:.2f}% at "
                f"epoch {summary['best_test_acc_epoch']}, {summary['total_seconds']:.0f}s; wrote "
                f"{', '.join(path for path in self.paths.values() if os.path.exists(path))}")


if __name__ == "__main__":
    sys.exit(main())
