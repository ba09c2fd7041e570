"""Reading a file that someone else may have replaced: only a regular file, without blocking, and bounded.

The configuration file and the state directory's records are read by path. A FIFO put in a file's place
holds open(2) until a writer comes (for ever, with the event loop's thread and its signal handling), and a
device such as /dev/zero, or a huge file, holds the reader's memory: both are refused before a byte is read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class NotRegularFile(OSError):
    """The path names a FIFO, a device, a directory or a socket, not a regular file."""


def read_regular(path: Path, max_bytes: int) -> bytes:
    """At most ``max_bytes`` + 1 bytes of the regular file ``path`` (more than ``max_bytes``: the caller
    refuses the file, whose rest is never read). OSError as open(2) and read(2) raise it; NotRegularFile
    when it is not a regular file."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(f"{path} is not a regular file")
        return file.read(max_bytes + 1)
