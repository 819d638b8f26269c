"""The one base class of the errors a user can fix (bad config, input, path), imported by every layer.

Each stage defines its own subclass next to the code that raises it (`ConfigError`, `ShardError`,
`IngestError`, ...); `raycell.__main__.main` prints any `UserError` (or a `FileNotFoundError`, which
file helpers raise for a missing input) as one line `raycell: error: ...` and exits with status 2.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; the message names the file, row or key and what to do."""


class ConfigError(UserError, ValueError):
    """A config file or override names a key that does not exist, or a value that is wrong or out of range."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types reported as one line with exit status 2."""
    return (UserError, FileNotFoundError)
