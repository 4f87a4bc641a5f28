"""``publish_data`` for tasks: ``from jupyter_ext.datapub import publish_data`` on an
engine sends partial results to the task's ``ar.data`` (see
:mod:`kernel_engine.engine.datapub`)."""

from kernel_engine.engine.datapub import publish_data

__all__ = ["publish_data"]
