"""Typed exceptions. Every user-facing error says what is wrong and how to fix it in one sentence.

The CLI prints ``TTAError`` messages without a traceback and exits non-zero; anything else is a bug.
"""

from __future__ import annotations

import errno


class TTAError(Exception):
    """Base class for errors caused by user input or the environment, not by a bug in tta."""


class ConfigError(TTAError, ValueError):
    """An unknown method, an unknown or badly typed config key, or an invalid setting."""


class ModelError(TTAError, ValueError):
    """A model that cannot be loaded or that a method cannot adapt (e.g. Tent without norm layers)."""


class InputError(TTAError, ValueError):
    """A batch of the wrong shape, channel count or with non-finite values; the model is left unchanged."""


class DataError(TTAError, OSError):
    """A dataset file that is missing, truncated or not in the expected layout."""


class DownloadError(DataError):
    """A file that had to be downloaded could not be; the message says what to fetch and where to put it."""


PATH_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.ENOTDIR, errno.EISDIR,
                         errno.EDQUOT, errno.ENAMETOOLONG, errno.ENOENT, errno.EEXIST})


def path_error(err: OSError) -> str | None:
    """One sentence for an ``OSError`` on a path the user chose (no permission, read-only, full disk, a file where a
    folder is needed, ...), or ``None`` when it is not one (then it is a bug and keeps its traceback)."""
    if err.errno not in PATH_ERRNOS or not err.filename:
        return None
    return (f"cannot use {err.filename} ({err.strerror or 'error'}); choose another path, or fix its permissions or "
            "free space")
