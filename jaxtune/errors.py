"""The one error type a user can fix: `UserError`.

Every exception whose cause is the user's input (a config, a data record, a file, a checkpoint, a
model that does not fit or is not supported) derives from `UserError`, and its message alone says
what is wrong, where (file, line, key or tensor) and what to do. The command-line entry points
(`jaxtune.cli.guard`) print such a message as one line on stderr and exit with code 2; any other
exception is a bug and keeps its traceback. `--debug` (or JAXTUNE_DEBUG=1) shows the traceback of a
UserError too.
"""


class UserError(Exception):
  """An error in what the user gave us; the message says what to change."""


class ConfigError(UserError, ValueError):
  """A setting that cannot work: the message names the key (`data.max_seq_len: ...`) and what to do."""
