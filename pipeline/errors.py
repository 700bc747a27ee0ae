"""The error types a user can fix by changing an argument, a file or a config value.

The CLI prints these as one line and exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


def _user_errors() -> tuple[type[BaseException], ...]:
    from dualfocus.pipeline.config import ConfigError
    from dualfocus.pipeline.corpus import CorpusError
    from dualfocus.pipeline.models import ModelLoadError

    errors: list[type[BaseException]] = [ConfigError, CorpusError, ModelLoadError, FileNotFoundError]
    try:
        from dualfocus.store import StoreError
        errors.append(StoreError)
    except ImportError:  # store package not importable: its errors cannot occur either
        pass
    return tuple(errors)


class UserError(ValueError):
    """A generic problem with the user's input (a file, a flag); the message says what to change."""


USER_ERRORS = (UserError, *_user_errors())
