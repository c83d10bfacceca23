"""train.py with a pause that a test can aim a signal at: run it in train.py's place (also under torchrun).

    TEST_PAUSE_IN_WRITE=last.pt python tests/paused_train.py ARGS   # waits before last.pt's new version replaces the old
    TEST_WAIT_IN_EPOCH=2 python tests/paused_train.py ARGS          # waits after epoch 2's first step for a signal
    TEST_DISK_FULL_AT=last.pt python tests/paused_train.py ARGS     # every write of last.pt finds the disk full

Each says where it waits, with its process id, in one line on stderr ("test: inside a write of last.pt
(pid N)", "test: between steps, waiting for a signal (pid N)"), then waits at most a minute: whatever the
machine's load, the test's kill or signal lands there.
"""
import errno
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import loop  # noqa: E402
import train  # noqa: E402


def say(line):
    # One write of the whole line: torchrun's processes share one stderr, and print() writes the text and
    # its newline separately, so two processes' lines could interleave.
    sys.__stderr__.write(line + "\n")
    sys.__stderr__.flush()


def pause_before_replacing(name):
    """Every atomic write ends with os.replace(temp, path): wait there, the new version written but not in place."""
    replace = os.replace

    def paused_replace(source, destination):
        if os.path.basename(destination) == name:
            say(f"test: inside a write of {name} (pid {os.getpid()})")
            time.sleep(60)
        replace(source, destination)
    os.replace = paused_replace


def disk_full_at(name):
    """Every atomic write of `name` fails as a full disk makes it fail, at its last step."""
    replace = os.replace

    def full_replace(source, destination):
        if os.path.basename(destination) == name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        replace(source, destination)
    os.replace = full_replace


def wait_after_first_step(epoch):
    """In that epoch, the loop's second stop check (after the first step) waits for a signal first."""
    train_one_epoch = loop.train_one_epoch

    def paused_epoch(trainer, loader, this_epoch, epochs, stop, bar_enabled, **options):
        if this_epoch == epoch:
            requested, checks = stop.requested, []

            def requested_after_a_wait():
                checks.append(1)
                if len(checks) == 2:
                    say(f"test: between steps, waiting for a signal (pid {os.getpid()})")
                    deadline = time.monotonic() + 60
                    while stop.signal is None and time.monotonic() < deadline:
                        time.sleep(0.01)
                return requested()
            stop.requested = requested_after_a_wait
        return train_one_epoch(trainer, loader, this_epoch, epochs, stop, bar_enabled, **options)
    loop.train_one_epoch = paused_epoch


if __name__ == "__main__":
    if os.environ.get("TEST_PAUSE_IN_WRITE"):
        pause_before_replacing(os.environ["TEST_PAUSE_IN_WRITE"])
    if os.environ.get("TEST_DISK_FULL_AT"):
        disk_full_at(os.environ["TEST_DISK_FULL_AT"])
    if os.environ.get("TEST_WAIT_IN_EPOCH"):
        wait_after_first_step(int(os.environ["TEST_WAIT_IN_EPOCH"]))
    sys.exit(train.main())
