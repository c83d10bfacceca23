"""What a training run writes into its folder (log.json, last.pt, best.pt, probe.npz: their contents, and
how), the folder itself, and how --resume reads a run back. Nothing happens on import.

    checkpoint = runfiles.build_checkpoint(trainer, args, data, epoch, history, best)   # CPU tensors, plain values
    runfiles.BackgroundWriter().submit(epoch, snapshot, write)   # write(*snapshot()) while the next epoch trains

Checkpoints hold only tensors and plain values: torch.load(path, weights_only=True) reads them. Every file
is written atomically (files.py): a kill or a full disk leaves the previous complete version.
"""
import argparse
import concurrent.futures
import contextlib
import errno
import io
import json
import os
import platform

import numpy as np
import torch

import devices
import files
import probe
from cli import UsageError, warn
from loop import SEED_MACHINE
from resnet import CHECKPOINT_FORMAT, CheckpointError, read_checkpoint

LOG_NAME, LAST_NAME, BEST_NAME = "log.json", "last.pt", "best.pt"
RUN_FILES = (LOG_NAME, LAST_NAME, BEST_NAME, probe.PROBE_NAME)
LOCK_NAME = ".train.lock"  # held in the output folder while a run writes there
LOG_FORMAT = "resnet18-cifar-log/1"
# What the last epoch's test evaluation leaves for a finished run's log: the checkpoint's keys of the same name.
FINAL_KEYS = ("confusion", "reliability")


class WriteFailed(Exception):
    """A checkpoint or log could not be written (full disk, say); the previous versions are intact."""


def save_checkpoint(checkpoint, path):
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    files.atomic_write(path, buffer.getbuffer())


def environment(device, precision, workers, args, heap_reuse, world):
    import albumentations
    return {"python": platform.python_version(), "torch": torch.__version__,
            "albumentations": albumentations.__version__, "numpy": np.__version__,
            "platform": platform.platform(), "device": device.type, "device_name": devices.device_name(device),
            "precision": precision, "channels_last": args.channels_last, "compile": args.compile,
            "workers": workers, "torch_threads": torch.get_num_threads(), "cpu_heap_reuse": heap_reuse,
            **world.description(), "per_rank_batch": world.per_rank(args.batch_size), "sync_bn": args.sync_bn}


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
    """Writes each epoch's files in a thread while the next epoch trains: last.pt with fsync took 0.14-0.35 s
    on the development CPU, a tenth of a GPU epoch. Only the snapshot (copies to the CPU) stays on the
    training path. One write at a time; a write's error (a full disk) is raised by the next submit() or
    wait(). Not `enabled` (ranks other than 0): nothing is written."""

    def __init__(self, saved_epoch=0, enabled=True):
        self.saved_epoch, self.enabled = saved_epoch, enabled  # the last epoch whose files are complete
        # Its thread is joined at exit: the interpreter waits for a write in progress.
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer")
        self.pending = None  # (epoch, the future of its write)

    def submit(self, epoch, snapshot, write):
        """snapshot() runs here, on the training thread; write(*its result) in the writer's thread."""
        self.wait()
        if self.enabled:
            self.pending = epoch, self.pool.submit(write, *snapshot())
        else:
            self.saved_epoch = epoch

    def wait(self):
        """Wait for the write in progress; raise its error, if any. Returns the last epoch saved."""
        if self.pending is not None:
            (epoch, written), self.pending = self.pending, None
            written.result()
            self.saved_epoch = epoch
        return self.saved_epoch


def save_epoch(paths, checkpoint, improved, log, resume_command):
    """last.pt, then best.pt, probe.npz (--probe) and log.json: a kill between them leaves the others one
    epoch behind, and --resume rebuilds them from the checkpoint, so that all agree after a resume."""
    try:
        save_checkpoint(checkpoint, paths[LAST_NAME])
        if improved:
            files.atomic_link(paths[LAST_NAME], paths[BEST_NAME])
        write_probe(paths, checkpoint)
        files.write_json(paths[LOG_NAME], log)
    except OSError as error:
        reason = "the disk is full" if error.errno == errno.ENOSPC else (error.strerror or str(error))
        raise WriteFailed(f"could not save epoch {checkpoint['epoch']} ({reason}); the files of the last "
                          f"saved epoch are intact, continue with: {resume_command}") from None


def write_probe(paths, checkpoint):
    """probe.npz from the checkpoint's probe; without one (--probe 0), no probe.npz of a replaced run stays."""
    if checkpoint.get("probe") and checkpoint["probe"]["epochs"]:
        probe.write(paths[probe.PROBE_NAME], checkpoint["probe"], checkpoint["classes"])
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(paths[probe.PROBE_NAME])


def data_description(data, test_labels, shortcut=None):
    """What the accuracies were measured on (plot_curves.py and gradcam.py say when not the official test
    set), and the shortcut planted in the training images, if any (cam_checks.planted_shortcut: they say so)."""
    return {"official": data.official, "test_images": len(test_labels),
            "test_subset": len(test_labels) < len(data.test_labels), "planted_shortcut": shortcut}


def build_log(args, env, classes, history, best_key, data=None, final=None):
    """log.json's contents; a finished run's adds, from its last epoch (`final`: FINAL_KEYS), the per-class
    accuracy, the confusion matrix (rows: true class, columns: predicted) and the reliability diagram's bins."""
    log = {"format": LOG_FORMAT, "args": dict(vars(args)), "environment": env, "data": data, "classes": classes,
           "epochs": history, "summary": summarize(history, best_key) if history else None}
    if final is not None:
        confusion = final["confusion"]
        log["per_class_accuracy"] = {name: (row[i] / sum(row) if sum(row) else None)
                                     for i, (name, row) in enumerate(zip(classes, confusion))}
        log["confusion_matrix"] = confusion
        if final.get("reliability"):  # none in a checkpoint of an earlier version
            log["reliability"] = final["reliability"]
    return log


def build_checkpoint(trainer, args, data, epoch, history, best):
    """Everything a resume or gradcam.py needs, as CPU tensors and plain values: it loads on any machine."""
    raw_model = trainer.model  # never the compiled wrapper: no '_orig_mod.' prefixes
    state = devices.on_cpu({"model": raw_model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
                            "scheduler": trainer.scheduler.state_dict(), "scaler": trainer.scaler.state_dict(),
                            "rng": devices.rng_state(trainer.device.type)})
    return {"format": CHECKPOINT_FORMAT, **state,
            "model_args": {"num_classes": len(data.classes)}, "classes": list(data.classes),
            "mean": list(data.mean), "std": list(data.std), "dataset": args.dataset,
            "epoch": epoch, "args": dict(vars(args)), "history": history, "best": best}


def restore_checkpoint(trainer, checkpoint):
    try:
        trainer.model.load_state_dict(checkpoint["model"])
        # load_state_dict takes every group setting from the checkpoint, fused SGD too: keep this machine's.
        implementation = [{k: g.get(k) for k in ("fused", "foreach")} for g in trainer.optimizer.param_groups]
        trainer.optimizer.load_state_dict(checkpoint["optimizer"])
        for group, kept in zip(trainer.optimizer.param_groups, implementation):
            group.update(kept)
        match_parameter_layouts(trainer.optimizer)
        trainer.scheduler.load_state_dict(checkpoint["scheduler"])
        # A bf16 or fp32 run saved no scaler state: an fp16 run resuming it starts a fresh scaler.
        if checkpoint["scaler"] and trainer.scaler.is_enabled():
            trainer.scaler.load_state_dict(checkpoint["scaler"])
        devices.restore_rng_state(checkpoint["rng"], trainer.device.type)
    except (KeyError, RuntimeError, ValueError, TypeError) as error:
        raise CheckpointError(f"checkpoint does not fit this model and recipe "
                              f"({type(error).__name__}: {str(error).splitlines()[0][:120]})") from None


def match_parameter_layouts(optimizer):
    """Put SGD's momentum buffers in their parameter's memory layout: a checkpoint keeps the layout of the run
    that saved it, and CUDA's fused SGD refuses buffers whose strides differ from the parameters' (a run
    resumed with the other --channels-last setting would fail at its first step)."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            state = optimizer.state.get(parameter, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == parameter.shape and value.stride() != parameter.stride():
                    state[key] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)


# ----------------------------------------------------------------------------- a resume's folder

def resumes_in_place(resume, out_dir):
    """Whether out_dir is the folder of the checkpoint `resume` (a resume elsewhere starts a new folder)."""
    source = os.path.dirname(os.path.abspath(resume))
    return os.path.isdir(out_dir) and os.path.samefile(out_dir, source)


def catch_up(paths, source, checkpoint, log):
    """Make the folder of `paths` agree with `checkpoint`, read from `source`, before training goes on: a kill
    between an epoch's writes left best.pt and log.json an epoch behind; a resume into another --out-dir (a
    branch) starts there with the run as saved. `log`: what log.json should hold."""
    epoch, best_epoch = len(checkpoint["history"]), checkpoint["best"]["epoch"]
    out_dir = os.path.dirname(paths[LAST_NAME])
    in_place = resumes_in_place(source, out_dir)
    try:
        if not in_place:  # the loaded checkpoint itself: the file may change meanwhile (a live run)
            save_checkpoint(checkpoint, paths[LAST_NAME])
        if best_epoch == epoch:
            files.atomic_link(paths[LAST_NAME] if not in_place else source, paths[BEST_NAME])
        elif not in_place:
            bring_best_checkpoint(os.path.join(os.path.dirname(source), BEST_NAME), paths[BEST_NAME], checkpoint)
        write_probe(paths, checkpoint)
        if not in_place or log_on_disk_epochs(paths[LOG_NAME], log["args"]["epochs"]) < epoch:
            files.write_json(paths[LOG_NAME], log)
    except OSError as error:
        raise WriteFailed(f"could not bring {out_dir or '.'}/ up to date with {source} "
                          f"({error.strerror or error}); nothing was trained") from None


def bring_best_checkpoint(path, target, checkpoint):
    """best.pt from the resumed run's folder if it is `checkpoint`'s best epoch, else none (under --overwrite
    the replaced run's goes). Linked first, then checked: the source may change meanwhile."""
    best_epoch = checkpoint["best"]["epoch"]
    if os.path.exists(path):
        files.atomic_link(path, target)
        with contextlib.suppress(CheckpointError):
            linked = read_checkpoint(target)
            if linked.get("epoch") == best_epoch and linked.get("history") == checkpoint["history"][:best_epoch]:
                return
    with contextlib.suppress(FileNotFoundError):
        os.remove(target)


def log_on_disk_epochs(path, epochs):
    """How many epochs the log.json at `path` holds (0: missing, unreadable, another format, or a finished
    run's log, of `epochs` epochs, without its final metrics)."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
        with open(path) as f:
            log = json.load(f)
        done = len(log["epochs"]) == epochs
        complete = log.get("format") == LOG_FORMAT and log["summary"] and (not done or "confusion_matrix" in log)
        return len(log["epochs"]) if complete else 0
    return 0


# ----------------------------------------------------------------------------- the folder

@contextlib.contextmanager
def own_out_dir(out_dir):
    """Create the output folder and hold its lock (files.folder_lock); clear what a killed writer left."""
    with contextlib.ExitStack() as stack:
        try:
            os.makedirs(out_dir, exist_ok=True)
            probe = os.path.join(out_dir, f".write-test-{os.getpid()}")  # can new files be made there?
            open(probe, "wb").close()
            os.remove(probe)
            stack.enter_context(files.folder_lock(out_dir, LOCK_NAME, running_elsewhere(out_dir)))
        except OSError as error:
            raise UsageError(f"cannot write to output folder {out_dir} ({error.strerror}); choose another "
                             f"--out-dir") from None
        files.remove_stale_temp_files(out_dir, RUN_FILES)
        yield


def running_elsewhere(out_dir):
    return f"another train.py is running with output folder {out_dir}; wait for it or choose another --out-dir"


def check_new_run(args, checkpoint):
    """A new run in a folder that holds another run's files would replace them: say so, and the ways out."""
    out_dir = args.out_dir
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"--out-dir {out_dir} is a file, not a folder; choose another --out-dir")
    if os.path.exists(os.path.join(out_dir, LOCK_NAME)):  # a run still going there: say that, not "another run"
        with files.folder_lock(out_dir, LOCK_NAME, running_elsewhere(out_dir)):
            pass
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(out_dir, name))]
    if not found or args.overwrite or (checkpoint is not None and resumes_in_place(args.resume, out_dir)):
        return
    what, finished = ", ".join(found), False
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, IndexError):
        with open(os.path.join(out_dir, LOG_NAME)) as f:
            log = json.load(f)
        last = log["epochs"][-1]
        what = (f"{len(log['epochs'])} of {log['args']['epochs']} epochs, test accuracy "
                f"{100 * last['test_acc']:.2f}% at epoch {last['epoch']}")
        finished = len(log["epochs"]) >= log["args"]["epochs"]
    # A finished run has nothing left to resume: its --epochs are part of its recipe.
    resume = f"continue it with --resume {os.path.join(out_dir, LAST_NAME)}, "
    ways = "" if finished or LAST_NAME not in found else resume
    raise UsageError(f"{out_dir}/ holds another {'finished ' if finished else ''}run ({what}); {ways}choose another "
                     f"--out-dir, or give --overwrite to replace it")


# ----------------------------------------------------------------------------- --resume

# Flags that describe the machine rather than the recipe: --resume takes them from the command line (or
# their defaults, resolved for this machine); an A100's bf16 run may go on in fp16 on a T4.
MACHINE_FLAGS = ("device", "precision", "channels_last", "compile", "workers", "sync_bn", "resume", "out_dir",
                 "overwrite")
# Where the data are: kept from the checkpoint unless given, so that a resume finds the run's data.
PLACE_FLAGS = ("data_dir", "download")
RUNTIME_FLAGS = MACHINE_FLAGS + PLACE_FLAGS


def flags_given(parser, argv):
    """The names of the flags that the command line sets (argparse fills in only what is missing)."""
    unset = object()
    parsed = parser.parse_args(argv, namespace=argparse.Namespace(**{a.dest: unset for a in parser._actions}))
    return {name for name, value in vars(parsed).items() if value is not unset}


def args_for_resume(args, given, defaults):
    """Read --resume's checkpoint and merge: the recipe and the data's place from it, the machine from
    the command line; `given`: the flags the command line set; `defaults`: every flag's default."""
    checkpoint = read_checkpoint(args.resume)
    for key in ("optimizer", "scheduler", "scaler", "rng", "epoch", "args", "history", "best", "confusion",
                "model_args", "classes"):
        if key not in checkpoint:
            raise CheckpointError(f"{args.resume} lacks '{key}': it cannot be resumed")
    merged = dict(checkpoint["args"])
    ignored = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in sorted(given)
               if k not in RUNTIME_FLAGS and getattr(args, k) != merged.get(k)]
    if ignored:
        warn(f"ignoring {', '.join(ignored)}: --resume continues the recipe saved in {args.resume}")
    merged.update({k: getattr(args, k) for k in RUNTIME_FLAGS if k in MACHINE_FLAGS or k in given or k not in merged})
    if merged.get("recipe") == "seed":
        # Its machine settings (fp32, NCHW) are part of the seed's setup: the run goes on with them unless given.
        merged.update({k: v for k, v in SEED_MACHINE.items() if k not in given})
    for name, default in defaults.items():
        merged.setdefault(name, default)  # flags newer than the checkpoint
    if args.out_dir is None:
        merged["out_dir"] = os.path.dirname(os.path.abspath(args.resume))
    return argparse.Namespace(**merged), checkpoint
