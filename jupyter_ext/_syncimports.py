"""``DirectView.sync_imports()``: imports that happen locally and on the engines."""

from __future__ import annotations

import builtins
import dis
import itertools
import sys
from types import CodeType, FrameType, ModuleType
from typing import TYPE_CHECKING, Any

from kernel_engine.engine import ops

if TYPE_CHECKING:
    from ._views import DirectView


def _remote_bind(bindings: list[tuple[str, str, str | None]]) -> None:
    """On an engine: ``name = import_module(module)``, ``name = module.attr`` (the
    submodule ``module.attr`` if the module has no such attribute yet), or, for an attr
    of ``""``, ``import module`` binding its top-level package (``import a.b``)."""
    import importlib

    ns = ops._namespace()
    for name, module, attr in bindings:
        mod = importlib.import_module(module)
        if attr is None:
            ns[name] = mod
        elif not attr:
            ns[name] = importlib.import_module(module.split(".")[0])
        elif hasattr(mod, attr):
            ns[name] = getattr(mod, attr)
        else:  # (from a import b, b a submodule not imported there yet)
            ns[name] = importlib.import_module(f"{module}.{attr}")


def _stored_names(code: CodeType, offset: int, fromlist: bool) -> list[tuple[str, str | None]]:
    """What the import statement whose ``IMPORT_NAME`` is at ``offset`` binds: ``(name,
    attribute)`` pairs, read from the bytecode that follows it. The attribute is the name
    imported from the module (``from m import a as b``: ``("b", "a")``), None for the
    module itself, or ``"?"`` for a submodule reached through the import's own
    ``IMPORT_FROM`` chain (``import a.b as c``)."""
    after = itertools.dropwhile(lambda i: i.offset <= offset, dis.get_instructions(code))
    stored: list[tuple[str, str | None]] = []
    attr: str | None = None
    for ins in after:
        op = ins.opname
        if op == "IMPORT_STAR" or (op == "CALL_INTRINSIC_1" and "IMPORT_STAR" in ins.argrepr):
            return []  # (import *: not followed)
        if op == "IMPORT_FROM":
            attr = str(ins.argval) if fromlist else "?"
        elif op.startswith("STORE_"):
            stored.append((str(ins.argval), attr))
            attr = None
            if not fromlist:
                break
        elif op in ("SWAP", "COPY", "ROT_TWO") or (op == "POP_TOP" and not fromlist):
            continue
        else:
            break
    return stored


class SyncImports:
    """Context manager of :meth:`DirectView.sync_imports`.

    Imports run locally as usual (unless ``local=False``, which skips nothing but keeps
    IPython Parallel's signature); on leaving the block, every name the block bound to
    an imported module or to a name imported from one is bound on the engines too.
    """

    def __init__(self, view: DirectView, local: bool = True, quiet: bool = False):
        self.view = view
        self.local = local
        self.quiet = quiet
        self.frame: FrameType | None = None
        self.imports: list[tuple[str, tuple[str, ...], int]] = []
        self._saved_import: Any = None

    def _namespace(self) -> dict[str, Any]:
        assert self.frame is not None
        return (
            self.frame.f_locals if self.frame.f_code.co_name != "<module>" else self.frame.f_globals
        )

    def __enter__(self) -> SyncImports:
        self.frame = sys._getframe(1)
        self._saved_import = builtins.__import__
        saved = self._saved_import

        def hooked(
            name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0
        ) -> ModuleType:
            module: ModuleType = saved(name, globals, locals, fromlist, level)
            caller = sys._getframe(1)
            if level == 0 and caller is self.frame:
                self.imports.append((name, tuple(fromlist or ()), caller.f_lasti))
            return module

        builtins.__import__ = hooked
        return self

    def __exit__(self, *exc: Any) -> None:
        builtins.__import__ = self._saved_import
        if exc[0] is not None:
            return
        bindings = self._bindings()
        if not bindings:
            return
        if not self.quiet:
            names = ", ".join(f"{n} ({m}{'.' + a if a else ''})" for n, m, a in bindings)
            print(f"importing on engine(s): {names}")
        self.view._really_apply(_remote_bind, (bindings,), {}, block=True)

    def _bindings(self) -> list[tuple[str, str, str | None]]:
        """(name, module, attribute) for every name the block's imports bound.

        Read from each import statement's bytecode (the names it stores), so aliases
        (``as``) are found, a module already imported here before the block is still
        imported on the engines, and no other name that happens to hold the same object
        (``n = 2`` beside ``from errno import ENOENT``) is touched.
        """
        assert self.frame is not None
        code = self.frame.f_code
        bindings: list[tuple[str, str, str | None]] = []
        for module_name, fromlist, offset in self.imports:
            if module_name not in sys.modules:
                continue
            for name, attr in _stored_names(code, offset, bool(fromlist)):
                binding: tuple[str, str, str | None]
                if attr is None:  # (import a.b: binds a, a.b imported)
                    top = module_name.split(".")[0]
                    binding = (name, module_name, "") if top != module_name else (name, top, None)
                elif attr == "?":  # (import a.b as c: binds a.b)
                    binding = (name, module_name, None)
                else:
                    binding = (name, module_name, attr)
                if binding not in bindings:
                    bindings.append(binding)
        return bindings
