"""``@view.remote`` and ``@view.parallel`` with real engines: IPython Parallel's arguments."""

from __future__ import annotations

import pytest

import jupyter_ext as jx


@pytest.mark.parametrize("kind", ["direct", "load-balanced"])
def test_parallel_return_exceptions(rc, kind):
    """``parallel(return_exceptions=True)``, an argument of IPython Parallel's
    ParallelFunction (it raised KeyError as an unknown view flag): a part that raised is
    joined as its error; ``pf.map`` gives each element that raised its error in place."""
    view = rc[:] if kind == "direct" else rc.load_balanced_view()

    def _inverses(xs):
        return [1 / x for x in xs]

    def _inverse(x):
        return 1 / x

    pf = view.parallel(block=True, return_exceptions=True)(_inverses)
    out = pf([1, 2, 0, 4])  # (two parts on two engines: [1, 2] and [0, 4])
    assert out[:2] == [1.0, 0.5] and len(out) == 3
    assert isinstance(out[2], jx.RemoteError) and out[2].ename == "ZeroDivisionError"
    mapped = view.parallel(block=True, return_exceptions=True)(_inverse).map([1, 0, 2, 4])
    assert mapped[0] == 1.0 and mapped[2:] == [0.5, 0.25]
    assert isinstance(mapped[1], jx.RemoteError)
    with pytest.raises(jx.RemoteError):  # (without it, the call fails)
        view.parallel(block=True)(_inverse).map([1, 0])
    with pytest.raises(TypeError, match="return_exceptions"):
        view.parallel(return_exceptions="yes")
