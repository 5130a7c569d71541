"""The one base class of errors that a user can fix (bad data, config, model folder, checkpoint, path).

The command line prints such an error as one message and exits non-zero, without a traceback (unless
``--debug`` or ``HKD4VLM_DEBUG=1``); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user gave is wrong; the message names the file, record and field and what would fix it."""


class ModelError(UserError, ValueError):
    """A model folder that cannot be loaded (missing, corrupt, or with non-finite weights)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be resumed from; the message names the folder, the file and what is wrong."""


class NonFiniteError(UserError, RuntimeError):
    """A loss, gradient or weight that is NaN or infinite."""


class InputError(UserError, ValueError):
    """An input to score that cannot be scored (a request field, a record's text, an image).

    Besides the message (which names the field), where they are known: ``field`` (the field's name as the
    caller wrote it: ``"options[1]"``, ``"choices[0].choice"``, ``"image"``), ``record`` (the record's index
    in a batch; the message then starts ``record #i: ``) and ``file`` (the image file). ``message`` is the
    message without the record prefix.
    """

    def __init__(self, message: str, *, field: str | None = None, record: int | None = None, file: str | None = None):
        self.message, self.field, self.record, self.file = message, field, record, file
        super().__init__(message if record is None else f"record #{record}: {message}")

    def in_record(self, index: int) -> InputError:
        """The same error, as the problem of the record at ``index`` of a batch."""
        return InputError(self.message, field=self.field, record=index, file=self.file)


class SettingError(UserError, ValueError):
    """A setting (a command-line option, an argument of the service) that cannot work; the message names it."""
