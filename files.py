"""Files that survive kills and full disks: atomic writes and the run lock. Standard library only, so that
plot_curves.py (which must start fast, without torch) writes as train.py and gradcam.py do.
"""
import contextlib
import json
import os


class FolderInUse(Exception):
    """Another process holds the folder's lock."""


def temp_name(path):
    return f"{path}.tmp-{os.getpid()}"


def atomic_write(path, data):
    """Write bytes so that `path` is always its old complete version or the new one: a temp file in the
    same folder, fsync, os.replace (atomic on POSIX and Windows), fsync the folder. On an error (a full
    disk) the temp file goes and the old version stays."""
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
            return atomic_write(path, f.read())
    os.replace(tmp, path)
    sync_folder(os.path.dirname(os.path.abspath(path)))


def write_json(path, value):
    atomic_write(path, (json.dumps(value, indent=1) + "\n").encode())


def remove_stale_temp_files(folder, names):
    """A killed writer can leave NAME.tmp-PID files behind; call this only while holding the folder's lock."""
    for entry in os.listdir(folder):
        if entry.split(".tmp-")[0] in names and ".tmp-" in entry:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, entry))


@contextlib.contextmanager
def folder_lock(folder, name, refusal):
    """An exclusive lock on a folder: a second run there is refused (FolderInUse(refusal)). A POSIX record
    lock (lockf): the kernel releases it when the process dies, even by SIGKILL, so a crash leaves no stale
    lock; and unlike flock, the processes it forks (DataLoader workers) do not share it, so a worker that
    outlives its killed parent for a few seconds does not keep a resume out. Windows: no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(os.path.join(folder, name), "a+") as file:
        try:
            fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise FolderInUse(refusal) from None
        file.truncate(0)
        file.write(f"{os.getpid()}\n")
        file.flush()
        yield
