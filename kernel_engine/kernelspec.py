"""Install and find the engine kernel spec (``jupyter-px-engine``)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

KERNEL_NAME = "jupyter-px-engine"
SPEC_VERSION = 2
"""Bumped when the spec changes, so an installed older one is replaced (2: CurveZMQ)."""


def spec_dict(python: str | None = None) -> dict[str, Any]:
    """The kernel.json of the engine kernel spec, for the given Python."""
    return {
        "argv": [python or sys.executable, "-m", "kernel_engine.engine", "-f", "{connection_file}"],
        "display_name": "jupyter-px engine (Python 3)",
        "language": "python",
        "interrupt_mode": "signal",
        "env": {"PYDEVD_DISABLE_FILE_VALIDATION": "1"},
        "metadata": {
            "debugger": False,
            # engines encrypt their channels when the controller asks (CurveZMQ)
            "supported_encryption": ["curve"],
            "jupyter_px": {"engine": True, "spec_version": SPEC_VERSION},
        },
    }


def install(user: bool = False, prefix: str | None = None, python: str | None = None) -> str:
    """Install the engine kernel spec; returns the directory it was installed into.

    Parameters
    ----------
    user
        Install for the current user (``~/.local/share/jupyter``).
    prefix
        Install under this prefix (``sys.prefix`` is what ``--sys-prefix`` means).
    python
        The Python that runs engines; the running one by default.
    """
    with tempfile.TemporaryDirectory() as tmp:
        spec_dir = Path(tmp) / KERNEL_NAME
        spec_dir.mkdir()
        (spec_dir / "kernel.json").write_text(json.dumps(spec_dict(python), indent=1))
        return str(
            KernelSpecManager().install_kernel_spec(
                str(spec_dir), KERNEL_NAME, user=user, prefix=None if user else prefix
            )
        )


def find() -> dict[str, Any] | None:
    """The installed engine kernel spec (its kernel.json as a dict), or None."""
    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    except NoSuchKernel:
        return None
    return spec.to_dict()


def _outdated(spec: dict[str, Any]) -> bool:
    """Whether ``spec`` is one of ours from before :data:`SPEC_VERSION` (a spec somebody
    wrote by hand under our name, with no ``jupyter_px`` metadata, is left alone)."""
    ours = (spec.get("metadata") or {}).get("jupyter_px")
    return isinstance(ours, dict) and ours.get("spec_version", 1) < SPEC_VERSION


def ensure_installed() -> str:
    """Install the spec for this Python when missing, outdated, or when it points at a
    missing Python.

    Installs into ``sys.prefix`` when that is writable, else for the user. Returns the
    Python the spec runs.
    """
    spec = find()
    if spec is not None and os.path.exists(spec["argv"][0]) and not _outdated(spec):
        return str(spec["argv"][0])
    if spec is not None and _outdated(spec):
        # replace it where it is: one installed elsewhere would not be found before it
        where = Path(KernelSpecManager().get_kernel_spec(KERNEL_NAME).resource_dir)
        if os.access(where, os.W_OK):
            (where / "kernel.json").write_text(json.dumps(spec_dict(spec["argv"][0]), indent=1))
            return str(spec["argv"][0])
    if os.access(sys.prefix, os.W_OK):
        install(prefix=sys.prefix)
    else:
        install(user=True)
    return sys.executable
