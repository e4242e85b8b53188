"""The one exception type for what a user got wrong.

Every mistake a user can make — a bad option value, a missing or unreadable file, a trace directory that
holds something else, an input the model cannot take — raises :class:`UsageError` with one sentence that
says what is wrong and how to fix it. The command line prints that sentence and exits with status 2; any
other exception is a bug in sparsetrace and is shown with its traceback.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A user mistake; the message is one sentence naming the offending value and the fix.

    A ``ValueError`` so that library callers who already catch ``ValueError`` keep working.
    """
