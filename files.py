"""Files that survive kills and full disks: atomic writes and the run lock. Standard library only, so that
plot_curves.py (which must start fast, without torch) uses the same writes as train.py and gradcam.py.

    files.atomic_write("log.json", data)      # a reader sees the old file or the whole new one
    with files.RunLock("runs/a", ".train.lock", "another run holds runs/a"):   # a second writer is refused
        ...
"""
import contextlib
import json
import os


class FolderInUse(Exception):
    """Another process holds the folder's lock."""


def temp_name(path):
    return f"{path}.tmp-{os.getpid()}"


def atomic_write(path, data):
    """Write bytes so that `path` is always either its old complete version or the new one.

    Temp file in the same folder, fsync, os.replace (atomic on POSIX and Windows), fsync the folder.
    On an error (a full disk) the temp file is removed and the old version stays.
    """
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    sync_folder(os.path.dirname(os.path.abspath(path)))


def sync_folder(folder):
    """Make a rename in `folder` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_link(source, path):
    """Make `path` the same file as `source` (a hard link: no second copy), atomically."""
    if os.path.exists(path) and os.path.samefile(source, path):
        return  # already: and rename() between two links of one file does nothing, leaving the temp link
    tmp = temp_name(path)
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


def remove_stale_temp_files(folder, names):
    """A killed writer can leave NAME.tmp-PID files behind; call this only while holding the folder's lock."""
    for entry in os.listdir(folder):
        if ".tmp-" in entry and entry.split(".tmp-")[0] in names:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, entry))


class RunLock:
    """An exclusive lock on a folder: a second run there is refused instead of interleaving files.

    A POSIX record lock (lockf): the kernel releases it when the process dies, even by SIGKILL, so a crash
    leaves no stale lock; and unlike flock, the processes it forks (DataLoader workers) do not share it,
    so a worker that outlives its killed parent for a few seconds does not keep a resume out.
    """

    def __init__(self, folder, name, refusal):
        self.path, self.refusal = os.path.join(folder, name), refusal

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # Windows: no flock; runs are not guarded against each other there
            self.file = None
            return self
        self.file = open(self.path, "a+")
        try:
            fcntl.lockf(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.close()
            raise FolderInUse(self.refusal) from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()
