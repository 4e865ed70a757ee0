"""The one error type a user can fix: `UserError`.

Every exception whose cause is the user's input (a config, a data record, a file, a checkpoint, a
model that does not fit or is not supported) derives from `UserError`, and its message alone says
what is wrong, where (file, line, key or tensor) and what to do. The command-line entry points
(`jaxtune.cli.guard`) print such a message as one line on stderr and exit with code 2; any other
exception is a bug and keeps its traceback. `--debug` (or JAXTUNE_DEBUG=1) shows the traceback of a
UserError too.

A write that fails because of where it goes (a full disk, no permission, a read-only file system) is
the user's to fix as well: every write site turns it into a `WriteError` (`write_failure` says
whether an exception is one).
"""

import errno

# The errno values of a write the user can fix, and how a message names each.
WRITE_ERRNOS = {
  errno.ENOSPC: "no space left on the device",
  errno.EDQUOT: "disk quota exceeded",
  errno.EROFS: "read-only file system",
  errno.EACCES: "permission denied",
  errno.EPERM: "operation not permitted",
}


class UserError(Exception):
  """An error in what the user gave us; the message says what to change."""


class ConfigError(UserError, ValueError):
  """A setting that cannot work: the message names the key (`data.max_seq_len: ...`) and what to do."""


class WriteError(UserError):
  """A file that could not be written (full disk, no permission, read-only); the message says what is safe."""


def write_failure(error: BaseException | None) -> str | None:
  """What made `error` (or an exception it was raised from) a failed write, e.g. "no space left on the device".

  None when it is something else. Besides OSError, this recognises the error text of
  TensorStore (Orbax's array writer), which reports the OS error as `[os_error_code='28']`.
  """
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
      return WRITE_ERRNOS[error.errno]
    text = str(error)
    for code, what in WRITE_ERRNOS.items():
      if f"os_error_code='{code}'" in text:
        return what
    error = error.__cause__ or error.__context__
  return None


def write_fix(why: str) -> str:
  """What the user can do about a failed write whose cause `write_failure` named."""
  if why.startswith((WRITE_ERRNOS[errno.ENOSPC], WRITE_ERRNOS[errno.EDQUOT])):
    return "free space there (or choose a disk with room)"
  return "make it writable (or choose a directory you can write)"
