"""binder/ followed the way Binder does, in a fresh virtualenv, then the quickstart run there.

Creates a virtualenv in ``tmp_path``, installs ``binder/requirements.txt`` from the
repository root (where its ``-e .`` resolves), runs ``binder/postBuild`` with the venv's
``bin`` first on ``PATH``, and executes ``notebooks/quickstart.ipynb`` with the venv's
Python through ``notebooks/run.py``. Jupyter's paths point at the venv and at empty
temporary folders, so every kernel spec used (``python3`` and ``jupyter-px-engine``) is
the fresh venv's own; nothing of this project's ``.venv`` or of the user's folders leaks
in. pip's cache keeps the install short (about 15 s on a warm machine).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from test_notebooks import ProcessWatcher

ROOT = Path(__file__).resolve().parent.parent
BINDER = ROOT / "binder"
ENGINE_SPEC = "jupyter-px-engine"


def tail(output: str, n: int = 60) -> str:
    kept = [line for line in output.splitlines() if "is ignored" not in line]
    return "\n".join(kept[-n:])


def run(cmd: list[str], env: dict[str, str], timeout: float) -> str:
    """Run ``cmd`` from the repository root; its output, or a test failure with its tail."""
    try:
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.output.decode(errors="replace") if isinstance(exc.output, bytes) else exc.output
        pytest.fail(f"{cmd} did not finish within {timeout} s:\n{tail(out or '')}")
    if proc.returncode != 0:
        pytest.fail(f"{cmd} exited with {proc.returncode}:\n{tail(proc.stdout)}")
    return proc.stdout


def isolated_env(venv: Path, tmp: Path) -> dict[str, str]:
    """This environment minus anything pointing at another Python or Jupyter setup."""
    drop = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "IPYTHONDIR", "CONDA")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(drop) and not k.startswith("JUPYTER")
    }
    main_venv = str(ROOT / ".venv")
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and not p.startswith(main_venv)]
    env["PATH"] = os.pathsep.join([str(venv / "bin"), *path])
    for name, folder in (
        ("JUPYTER_DATA_DIR", "jupyter-data"),
        ("JUPYTER_CONFIG_DIR", "jupyter-config"),
        ("JUPYTER_RUNTIME_DIR", "jupyter-runtime"),
        ("IPYTHONDIR", "ipython"),
    ):
        (tmp / folder).mkdir()
        env[name] = str(tmp / folder)
    env["JUPYTER_PATH"] = str(venv / "share" / "jupyter")
    env["JUPYTER_PLATFORM_DIRS"] = "1"
    return env


SHOW_SPECS = """\
import json
from jupyter_client.kernelspec import KernelSpecManager
specs = KernelSpecManager().get_all_specs()
print(json.dumps({n: [s["resource_dir"], s["spec"]["argv"]] for n, s in specs.items()}))
"""


@pytest.mark.timeout(600)
def test_binder_quickstart(tmp_path):
    assert os.access(BINDER / "postBuild", os.X_OK), "binder/postBuild must be executable"
    assert (BINDER / "postBuild").read_text().startswith("#!")
    venv = tmp_path / "venv"
    python = str(venv / "bin" / "python")
    try:
        with ProcessWatcher() as watcher:
            run([sys.executable, "-m", "venv", str(venv)], dict(os.environ), timeout=120)
            env = isolated_env(venv, tmp_path)
            run(
                [python, "-m", "pip", "install", "-q", "-r", "binder/requirements.txt"],
                env,
                timeout=300,
            )
            installed = run([str(BINDER / "postBuild")], env, timeout=60)
            assert str(venv / "share" / "jupyter" / "kernels" / ENGINE_SPEC) in installed

            # the kernel specs the venv sees are its own, with its own Python
            specs = json.loads(run([python, "-c", SHOW_SPECS], env, timeout=60))
            assert set(specs) == {"python3", ENGINE_SPEC}, specs
            for name, (folder, _) in specs.items():
                assert folder.startswith(str(venv)), (name, folder)
            assert specs[ENGINE_SPEC][1][0] == python

            executed = tmp_path / "quickstart.executed.ipynb"
            quickstart = ["notebooks/run.py", "notebooks/quickstart.ipynb", "--timeout", "60"]
            out = run([python, *quickstart, "--output", str(executed)], env, timeout=180)
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # about 300 MB
    assert not watcher.left, f"processes left behind: {watcher.left}"
    assert "cluster stopped: True" in out
    assert "quickstart.ipynb: ran in" in out

    nb = nbformat.read(executed, as_version=4)
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    engines = next(c for c in nb.cells if c.id == "engines")
    where = ast.literal_eval(engines.outputs[0].data["text/plain"])
    assert [e["python"] for e in where] == [python, python]  # engines run the venv's Python
