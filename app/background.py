"""Background work: :func:`spawn` starts it, and this is the one place that says how it runs.

Under gunicorn's gevent worker the process is monkey-patched, so a ``threading.Thread`` *is* a greenlet: cheap
(thousands per worker), and cooperative with the request handlers (every blocking socket call yields). Outside
gevent (Flask's test client, the CLI) it is an ordinary OS thread. Either way the code is written against
plain threads and ``threading`` primitives, and everywhere else in ``app/`` speaks of threads.
"""
from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from typing import Any


def spawn(target: Callable[..., Any], *args: Any, name: str, inherit_context: bool = False) -> threading.Thread:
    """Start ``target(*args)`` in a daemon thread (a greenlet under gevent) called ``name`` and return it.

    ``inherit_context``: run it in a copy of the caller's context variables (the log context of a call,
    :mod:`app.logging_setup`), which a new thread or greenlet does not inherit by itself.
    """
    if inherit_context:
        target, args = contextvars.copy_context().run, (target, *args)
    thread = threading.Thread(target=target, args=args, name=name, daemon=True)
    thread.start()
    return thread
