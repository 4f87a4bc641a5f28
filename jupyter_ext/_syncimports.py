"""``DirectView.sync_imports()``: imports that happen locally and on the engines."""

from __future__ import annotations

import builtins
import sys
from types import FrameType, ModuleType
from typing import TYPE_CHECKING, Any

from kernel_engine.engine import ops

if TYPE_CHECKING:
    from ._views import DirectView


def _remote_bind(bindings: list[tuple[str, str, str | None]]) -> None:
    """On an engine: ``name = import_module(module)`` or ``name = module.attr``."""
    import importlib

    ns = ops._namespace()
    for name, module, attr in bindings:
        mod = importlib.import_module(module)
        ns[name] = getattr(mod, attr) if attr else mod


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
        self.before: dict[str, Any] = {}
        self.imports: list[tuple[str, tuple[str, ...]]] = []
        self._saved_import: Any = None

    def _namespace(self) -> dict[str, Any]:
        assert self.frame is not None
        return (
            self.frame.f_locals if self.frame.f_code.co_name != "<module>" else self.frame.f_globals
        )

    def __enter__(self) -> SyncImports:
        self.frame = sys._getframe(1)
        self.before = dict(self._namespace())
        self._saved_import = builtins.__import__
        saved = self._saved_import

        def hooked(
            name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0
        ) -> ModuleType:
            module: ModuleType = saved(name, globals, locals, fromlist, level)
            if level == 0 and sys._getframe(1) is self.frame:
                self.imports.append((name, tuple(fromlist or ())))
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

        Found from what was imported (not from what changed), so a module already imported
        here before the block is still imported on the engines; aliases (``as``) are the
        names now bound to the imported objects.
        """
        namespace = self._namespace()
        bindings: list[tuple[str, str, str | None]] = []
        for module_name, fromlist in self.imports:
            module = sys.modules.get(module_name)
            if module is None:
                continue
            wanted: list[tuple[Any, str, str | None]]
            if fromlist:
                wanted = [(getattr(module, a, None), module_name, a) for a in fromlist]
            else:
                top = module_name.split(".")[0]
                wanted = [(module, module_name, None), (sys.modules.get(top), top, None)]
            for value, mod, attr in wanted:
                if value is None:
                    continue
                names = [n for n, v in namespace.items() if v is value]
                bindings += [(n, mod, attr) for n in names if (n, mod, attr) not in bindings]
        return bindings
