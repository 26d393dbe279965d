"""When progress bars show: on a terminal only.

Every bar of kvsqueeze is a tqdm bar built with ``disable=bar_disabled(progress)``: off when the
caller asks for none, and otherwise tqdm's own ``disable=None``, which turns the bar off when its
stream (stderr) is not a terminal — a CI log or a file gets no carriage-return redraws; the
commands' own lines (what runs, the tables, the saved paths) still say what happened.
"""

from __future__ import annotations


def bar_disabled(progress: bool) -> bool | None:
    """tqdm's ``disable`` for a bar the caller wants (``progress``): None (tqdm: disabled unless its
    stream is a terminal) or True (no bar)."""
    return None if progress else True
