"""Publishing data from a running task (IPython Parallel's ``publish_data``).

Called on an engine while a task runs, :func:`publish_data` sends a dict of objects over
the engine's iopub channel, as a ``data_message`` whose parent is the running task; the
client that submitted the task merges it into that task's ``ar.data`` as it arrives, so
a long task can report partial results or progress.
"""

from __future__ import annotations

from typing import Any

from kernel_engine import serialize

DATA_MESSAGE = "data_message"


def publish_data(data: dict[str, Any]) -> None:
    """Send ``data`` (a dict of picklable objects) to whoever runs the current task.

    Raises
    ------
    RuntimeError
        When not called on an engine.
    TypeError
        When ``data`` is not a dict with string keys.
    """
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise TypeError(f"publish_data takes a dict with string keys, not {type(data).__name__}")
    from IPython import get_ipython

    kernel = getattr(get_ipython(), "kernel", None)
    if kernel is None or getattr(kernel, "session", None) is None:
        raise RuntimeError("publish_data runs on an engine, inside a task")
    kernel.session.send(
        kernel.iopub_socket,
        DATA_MESSAGE,
        {"engine_id": getattr(kernel, "engine_id", None)},
        parent=kernel.get_parent("shell"),
        ident=b"data",
        buffers=serialize.dumps(data),
    )
