"""Whether a file is open or mapped anywhere else, asked of the kernel: Linux grants a write
lease (``fcntl(fd, F_SETLEASE, F_WRLCK)``) only while no other open file description of the
file exists, in this process or any other, and a mapping keeps the description it was made
from after its descriptor is closed (``safetensors.load_file``'s tensors map their file). So
a granted lease means nobody can see the file's bytes change; the lease is given back at
once (closing the descriptor ends it), it is only asked for.

Where leases are not to be had (another OS, a filesystem without them, a file another user
owns) the answer is "maybe held": callers leave the file alone. An opener racing the check
breaks the lease, which the kernel signals to the lease holder: SIGURG here (ignored unless
handled), not the default SIGIO, whose default action ends the process.
"""

from __future__ import annotations

import fcntl
import os
import signal

__all__ = ["held_elsewhere"]


def held_elsewhere(path: str | os.PathLike) -> bool:
    """``path`` may be open or mapped by someone else (see module docstring); False only when
    the kernel says nobody is."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True
    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
    except (OSError, AttributeError):  # held (EAGAIN), or no leases here
        return True
    finally:
        os.close(fd)  # gives the lease back
    return False
