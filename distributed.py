"""Everything torchrun: the processes of a run, how they connect, agree, stop together and say an error
once. With one process every call here is a no-op or a plain local value, so the rest of the code reads
like single-process code. Nothing happens on import.

    world = distributed.world_from_environment()        # one process, or torchrun's RANK/WORLD_SIZE
    with distributed.processes(world) as world:         # connected over gloo (a no-op for one process)
        world = distributed.on_device(world, device, precision, shared)  # agreed; NCCL between GPUs
"""
import contextlib
import dataclasses
import inspect
import json
import os
import shlex
import signal
import sys
import time

import torch
import torch.nn as nn

import devices
import files


class ElsewhereFailed(Exception):
    """Another process of the run failed (and said why); this one stops too."""


class ProcessesDiffer(Exception):
    """The processes of a run differ in something they must share: every rank meets it, said once a machine."""


@dataclasses.dataclass
class World:
    """The processes of one run: a single one, or those torchrun started (RANK, LOCAL_RANK, WORLD_SIZE).
    The decisions that must be the same everywhere go through `vote` (stop), `count` (failed) and
    `differing` (settings): small CPU values on the default gloo group; the device's tensors go through
    `data`, NCCL's group between GPUs (None: the default group)."""
    rank: int = 0
    local_rank: int = 0
    size: int = 1
    local_size: int = 1
    launched: bool = False  # by torchrun: the process group is (to be) started
    backend: str = None  # of the device's collectives: nccl between GPUs (from on_device), else gloo
    data: object = None

    @property
    def main(self):
        return self.rank == 0

    @property
    def nodes(self):
        return max(1, self.size // self.local_size)

    def per_rank(self, batch_size):
        return batch_size // self.size

    def vote(self, flag):
        """Start `any(flag)` over the ranks without waiting: the result's .wait() gives it."""
        value = torch.tensor([int(bool(flag))])
        work = torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX, async_op=True)

        def verdict(done):
            done.value()  # raises if the collective failed (a peer gone): not a quiet "no"
            return bool(value.item())
        return work.get_future().then(verdict)

    def count(self, flag):
        """On how many ranks `flag` is true (every rank must call it)."""
        if not self.launched:
            return int(bool(flag))
        value = torch.tensor([int(bool(flag))])
        torch.distributed.all_reduce(value)
        return int(value.item())

    def add_up(self, *tensors):
        """The tensors' values (as Python numbers and lists) summed over the ranks in one collective, exact
        for counts (float64 up to 2**53). A single process just reads them (a sync point)."""
        if not self.launched:
            return [t.tolist() for t in tensors]
        packed = torch.cat([t.reshape(-1).double() for t in tensors])
        torch.distributed.all_reduce(packed, group=self.data)
        values, totals = packed.tolist(), []
        for t in tensors:
            part, values = values[:t.numel()], values[t.numel():]
            totals.append(part if t.dim() else part[0])
        return totals

    def minimum(self, tensor):
        if self.launched:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN, group=self.data)
        return tensor

    def differing(self, values):
        """The entries of `values` (a dict of plain values) that differ between the ranks, each with the
        values seen as sorted JSON texts: {name: [text, ...]}. One all_gather_object; every rank must call it."""
        if not self.launched:
            return {}
        everyone = [None] * self.size
        torch.distributed.all_gather_object(everyone, values)
        names = list(values) + sorted(set().union(*everyone) - set(values))  # every rank judges the same names
        seen = {name: sorted({json.dumps(other.get(name), sort_keys=True) for other in everyone}) for name in names}
        return {name: texts for name, texts in seen.items() if len(texts) > 1}

    def together(self, job, here=True):
        """Run `job` (on this rank if `here`); if it failed on any rank, every rank stops: each failing one
        with its own error (`on_every_rank` when all failed: said once a machine), the others with
        ElsewhereFailed. No rank waits forever for one that left."""
        result, error = None, None
        try:
            result = job() if here else None
        except Exception as raised:  # noqa: BLE001 - handed on below, after the ranks have agreed
            error = raised
            error.met_at = time.time()  # for torchrun's report (report_error)
        failed = self.count(error is not None)
        if failed and error is None:
            elsewhere = ElsewhereFailed("another process of this run failed (its message says why)")
            elsewhere.met_at = time.time()  # after the count, which the failing rank joined after its error
            raise elsewhere
        if failed:
            error.on_every_rank = failed == self.size
            raise error
        return result

    def wrap(self, model, device):
        """DistributedDataParallel under torchrun: it all-reduces the gradients during backward and
        broadcasts rank 0's BatchNorm statistics at each training forward (not with SyncBatchNorm)."""
        if not self.launched:
            return model
        synced = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
        for module in synced:
            module.process_group = self.data  # not the default group's gloo: it would copy through the host
        # torch 2.13 renamed broadcast_buffers (deprecated there, with a warning) to forward_sync_buffers.
        ddp = nn.parallel.DistributedDataParallel
        sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
                else "broadcast_buffers")
        return ddp(model, device_ids=[device.index] if device.type == "cuda" else None, process_group=self.data,
                   **{sync: not synced})

    def share_buffers(self, model):
        """Rank 0's BatchNorm statistics everywhere: each rank's last training step updated its own."""
        if self.launched:
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, src=0, group=self.data)

    def resume_command(self, script, path):
        """The command that continues the run saved at `path` with these processes; absolute paths (`script`
        and `path`) make it work as printed, from any folder."""
        script, path = shlex.quote(os.path.abspath(script)), shlex.quote(os.path.abspath(path))
        if not self.launched:
            return f"python {script} --resume {path}"
        if self.nodes == 1:
            return f"torchrun --standalone --nproc_per_node {self.local_size} {script} --resume {path}"
        return (f"torchrun --nnodes {self.nodes} --nproc_per_node {self.local_size} --rdzv-backend c10d "
                f"--rdzv-endpoint HOST:PORT {script} --resume {path}")

    def description(self):
        return {"world_size": self.size, "nodes": self.nodes, "backend": self.backend}


def world_from_environment(environ=None):
    """The World that torchrun's variables describe, or a single process without them."""
    environ = os.environ if environ is None else environ
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        return World()
    size = int(environ["WORLD_SIZE"])
    return World(rank=int(environ["RANK"]), local_rank=int(environ.get("LOCAL_RANK", 0)), size=size,
                 local_size=int(environ.get("LOCAL_WORLD_SIZE", size)), launched=True)


def backend_for(device_type):
    """nccl between GPUs, gloo between CPU processes; MPS has no collective backend."""
    if device_type not in ("cuda", "cpu"):
        raise devices.DeviceError(f"torchrun runs on CUDA GPUs (nccl) or on the CPU (gloo), not on {device_type}; "
                                  f"give --device cpu, or run without torchrun")
    return "nccl" if device_type == "cuda" else "gloo"


@contextlib.contextmanager
def processes(world):
    """Connect a torchrun launch's processes over gloo (a no-op for one process), before anything that may
    fail on one machine only (its GPU, its checkpoint or data), so that every check can go through
    World.together: such a failure stops every rank in one line instead of leaving the others waiting."""
    if not world.launched:
        yield world
        return
    torch.distributed.init_process_group("gloo")
    try:
        yield dataclasses.replace(world, backend="gloo")
    except RuntimeError:
        raise  # a collective failed: a peer may be gone, and tearing down would wait for it
    except BaseException:
        # Every rank may still have a line to say: torchrun sends SIGTERM to the processes still running as
        # soon as one has ended, which another, meeting the same end, may do first (its SIGKILL: 30 s later).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        torch.distributed.destroy_process_group()
        raise
    torch.distributed.destroy_process_group()  # and every other group, NCCL's too


def on_device(world, device, precision, shared=None):
    """`world` after the one exchange that checks what every process must share: the device type and
    precision (--device auto and --precision auto decide per machine: a T4's fp16 beside an A100's bf16
    would average loss-scaled gradients with unscaled ones) and `shared`, the caller's settings by name.
    Its device's tensors then go through NCCL's own group between GPUs (gloo's default group on CPUs)."""
    if not world.launched:
        return world
    differ = world.differing({"device": device.type, "precision": precision, **(shared or {})})
    if differ:
        named = [f"{name} ({', '.join(str(json.loads(text)) for text in texts)})" if len("".join(texts)) < 40
                 else name for name, texts in differ.items()]
        raise ProcessesDiffer(f"the processes of this run differ in {', '.join(named)}: give every machine the same "
                              f"command line, checkpoint and --data-dir contents, and the same kind of device (or "
                              f"--device and --precision)")
    if backend_for(device.type) == "gloo":
        return world
    # device_id: NCCL connects now, bound to this rank's GPU, rather than at the first collective.
    group = torch.distributed.new_group(backend="nccl", device_id=device)
    return dataclasses.replace(world, backend="nccl", data=group)


def report_error(world, script, error, text, alike_everywhere):
    """`script: text` in one line on stderr (`script (rank N): text` from a rank other than 0). What every
    rank met alike (an error of the kinds `alike_everywhere`, or met by all in World.together) is said by
    each machine's first process, anything else by each rank that met it. Under torchrun the line also
    goes into the process's error file, so that torchrun's failure report shows it instead of "To enable
    traceback see ..." (torch's own `record` would put a traceback there)."""
    line = f"{script}{f' (rank {world.rank})' if world.launched and not world.main else ''}: {text}"
    if world.local_rank == 0 or not getattr(error, "on_every_rank", isinstance(error, alike_everywhere)):
        print(line, file=sys.stderr)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE") if world.launched else None
    if error_file:  # the format of torch.distributed.elastic's ErrorHandler.record_exception
        # torchrun's report names the earliest file its "Root Cause" (in whole seconds; a tie goes to the one
        # it noticed first): a file is dated when its error was met, and one that only says another process
        # failed a second later.
        timestamp = int(getattr(error, "met_at", time.time())) + isinstance(error, ElsewhereFailed)
        record = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(timestamp)}}}
        with contextlib.suppress(OSError):  # atomically: torchrun's agent fails on a half-written file
            files.atomic_write(error_file, json.dumps(record).encode())


@contextlib.contextmanager
def quiet_unless(main):
    """Ranks other than 0 print nothing (their lines would repeat rank 0's); errors are printed by the caller."""
    if main:
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
        yield
