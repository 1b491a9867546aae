"""Graceful Ctrl-C / SIGTERM: stop at the next batch, finish the bookkeeping, then raise.

A ``KeyboardInterrupt`` raised by the default handler lands wherever Python happens to be,
and inside a garbage-collection callback (SQLAlchemy has some) it is printed and dropped:
the study would run on. So the handler only asks Keras to stop (``model.stop_training``,
checked after every batch) and sets a flag; :func:`check` raises at safe points (epoch end,
trial end). A second Ctrl-C raises at once.
"""
from __future__ import annotations

import signal
import sys
import threading

_requested = threading.Event()
_model = None  # the Keras model being trained, if any


def _handler(signum, frame) -> None:
    if _requested.is_set():
        raise KeyboardInterrupt
    _requested.set()
    if _model is not None:
        _model.stop_training = True
    print(f"\n{signal.Signals(signum).name}: stopping after this batch "
          "(press Ctrl-C again to stop at once)", file=sys.stderr, flush=True)


def install() -> None:
    """Route SIGINT and SIGTERM through the graceful handler (the CLI does this)."""
    _requested.clear()
    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)


def watch(model) -> None:
    """Register the model in training, so an interrupt can stop it between batches."""
    global _model
    _model = model
    check()


def check() -> None:
    """Raise ``KeyboardInterrupt`` here if an interrupt was requested."""
    if _requested.is_set():
        raise KeyboardInterrupt
