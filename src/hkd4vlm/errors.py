"""The one base class of errors that a user can fix (bad data, config, model folder, checkpoint, path).

The command line prints such an error as one message and exits non-zero, without a traceback (unless
``--debug`` or ``HKD4VLM_DEBUG=1``); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user gave is wrong; the message names the file, record and field and what would fix it."""


class ModelError(UserError, ValueError):
    """A model folder that cannot be loaded (missing, corrupt, or with non-finite weights)."""


class NonFiniteError(UserError, RuntimeError):
    """A loss, gradient or weight that is NaN or infinite."""
