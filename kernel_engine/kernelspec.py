"""Install and find the engine kernel spec (``jupyter-px-engine``); enable the server
extension (:mod:`jupyter_ext.serverextension`) and install the JupyterLab extension
(``jupyter-px``) where it is installed."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from jupyter_core.paths import (
    SYSTEM_CONFIG_PATH,
    SYSTEM_JUPYTER_PATH,
    jupyter_config_dir,
    jupyter_data_dir,
)

KERNEL_NAME = "jupyter-px-engine"
SPEC_VERSION = 3
"""Bumped when the spec changes, so an installed older one is replaced (2: CurveZMQ;
3: engines forked from a template, :mod:`kernel_engine.provisioner`)."""
SERVER_EXTENSION = "jupyter_ext.serverextension"
SERVER_CONFIG_FILE = "jupyter_px.json"
LABEXTENSION = "jupyter-px"
"""The JupyterLab extension's name: its folder under ``share/jupyter/labextensions``."""


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
            # engines forked from a template that has imported ipykernel (quick to start,
            # pages shared); the plain local launch when that cannot be
            "kernel_provisioner": {"provisioner_name": "jupyter-px-fork"},
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


def _jupyter_root(kind: str, user: bool, prefix: str | None) -> Path:
    """Jupyter's ``config`` or ``data`` folder: the user's, an environment's (``prefix``)
    or the system's, as ``jupyter ... --user/--sys-prefix`` choose them."""
    if user:
        return Path(jupyter_config_dir() if kind == "config" else jupyter_data_dir())
    if prefix is not None:
        return Path(prefix) / ("etc" if kind == "config" else "share") / "jupyter"
    return Path((SYSTEM_CONFIG_PATH if kind == "config" else SYSTEM_JUPYTER_PATH)[0])


def server_config_dir(user: bool = False, prefix: str | None = None) -> Path:
    """The ``jupyter_server_config.d`` folder that ``install`` with these arguments uses."""
    return _jupyter_root("config", user, prefix) / "jupyter_server_config.d"


def enable_server_extension(user: bool = False, prefix: str | None = None) -> str:
    """Enable the cluster REST API in Jupyter servers; returns the config file written.

    Writes ``jupyter_px.json`` in :func:`server_config_dir` (keeping whatever else a file
    already there holds); leaves the file untouched when it already enables the extension.
    """
    path = server_config_dir(user, prefix) / SERVER_CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict):
        config = {}
    app = config.setdefault("ServerApp", {})
    if not isinstance(app, dict):
        app = config["ServerApp"] = {}
    extensions = app.setdefault("jpserver_extensions", {})
    if not isinstance(extensions, dict):
        extensions = app["jpserver_extensions"] = {}
    if extensions.get(SERVER_EXTENSION) is True and path.is_file():
        return str(path)
    extensions[SERVER_EXTENSION] = True
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return str(path)


def labextension_source() -> Path | None:
    """The built JupyterLab extension in a source tree (``jupyter_ext/labextension``), or
    None when ``jupyter_ext`` was installed from a wheel: the wheel installed it already.

    Found without importing ``jupyter_ext``.
    """
    spec = importlib.util.find_spec("jupyter_ext")
    for location in (spec and spec.submodule_search_locations) or []:
        source = Path(location) / "labextension"
        if (source / "package.json").is_file():
            return source
    return None


def labextensions_dir(user: bool = False, prefix: str | None = None) -> Path:
    """The ``labextensions`` folder that :func:`install_labextension` with these arguments
    uses."""
    return _jupyter_root("data", user, prefix) / "labextensions"


def install_labextension(user: bool = False, prefix: str | None = None) -> str | None:
    """Make JupyterLab load the ``jupyter-px`` extension; returns its folder, or None when
    there is nothing to install (a wheel install put it in the environment already).

    In a source tree (an editable install, which installs no data files) the folder is a
    symbolic link to the built extension, so a rebuild is seen at once; a copy where links
    cannot be made. Whatever was at the destination is replaced.
    """
    source = labextension_source()
    if source is None:
        return None
    dest = labextensions_dir(user, prefix) / LABEXTENSION
    if dest.is_symlink() and dest.resolve() == source.resolve():
        return str(dest)
    if dest.is_symlink() or dest.is_file():
        dest.unlink()
    elif dest.is_dir():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        dest.symlink_to(source.resolve(), target_is_directory=True)
    except OSError:
        shutil.copytree(source, dest)
    return str(dest)


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
