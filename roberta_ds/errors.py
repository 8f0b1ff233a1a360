"""One base class for every bad input (config, ds_config, dataset, checkpoint, prepare, export).

Each command-line entry point catches `InputError` once and exits with EXIT_BAD_INPUT and the
message, which names the file, key or value; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_BAD_INPUT = 2
EXIT_RENDEZVOUS = 3


class InputError(ValueError):
    """A bad input or environment the user can fix; the message says what and where."""


class RendezvousError(RuntimeError):
    """The process group could not form (EXIT_RENDEZVOUS)."""


class RunDirInUse(InputError):
    """The run folder belongs to a live run (its lock is held): that run's EXIT_STATUS is not ours
    to write."""
