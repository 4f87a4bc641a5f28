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


def test_parallel_chunksize_on_a_direct_view_is_ignored_with_a_warning(rc):
    """As IPython Parallel's: ``chunksize`` means nothing to a DirectView (one part per
    engine), so it warns and is ignored (pf.map raised TypeError: DirectView.map has no
    chunksize)."""
    with pytest.warns(UserWarning, match="chunksize is ignored on a DirectView"):
        pf = rc[:].parallel(block=True, chunksize=2)(lambda xs: [2 * x for x in xs])
    assert pf([1, 2, 3]) == [2, 4, 6]
    assert pf.map([[1], [2, 3], []]) == [[2], [4, 6], []]  # (one call per element)
    lpf = rc.load_balanced_view().parallel(block=True, chunksize=2)(lambda x: x + 1)
    assert lpf.map(range(5)) == [1, 2, 3, 4, 5]


def test_parallel_ordered_false_on_a_direct_view(rc):
    """``parallel(ordered=False)`` on a DirectView: pf.map iterates in the order the
    engines finish (it raised TypeError: DirectView.map has no ordered)."""
    import time

    pf = rc[:].parallel(block=False, ordered=False)(lambda x: time.sleep(x) or x)
    ar = pf.map([1.0, 0.0])  # (engine 0 sleeps 1 s, engine 1 none)
    assert list(ar) == [0.0, 1.0]


def test_chunksize_takes_any_integral_and_refuses_the_rest_naming_it(rc):
    """A numpy integer is a chunksize as an int is (``operator.index``; it was refused);
    a bool, a float, zero or a negative number are refused with an error naming it."""
    np = pytest.importorskip("numpy")
    view = rc.load_balanced_view()
    assert view.map_sync(abs, [-1, -2, -3], chunksize=np.int64(2)) == [1, 2, 3]
    assert len(view.map(abs, range(5), chunksize=np.int32(2))) == 5
    assert list(view.imap(abs, [-1, -2, -3], chunksize=np.int64(2))) == [1, 2, 3]
    pf = view.parallel(block=True, chunksize=np.int64(2))(lambda xs: [len(xs)] * len(xs))
    assert pf(range(5)) == [2, 2, 2, 2, 1]
    assert list(view.executor.map(abs, [-1, -2, -3], chunksize=np.int64(2))) == [1, 2, 3]
    calls = [
        lambda size: view.map(abs, [1], chunksize=size),
        lambda size: view.parallel(chunksize=size),
        lambda size: jx.ParallelFunction(view, abs, chunksize=size),
        lambda size: view.executor.map(abs, [1], chunksize=size),
    ]
    for call in calls:
        for bad in (True, np.True_, 2.0, "2"):
            with pytest.raises(TypeError, match="chunksize must be an int"):
                call(bad)
        for bad in (0, -1, np.int64(0)):
            with pytest.raises(ValueError, match="chunksize must be between 1"):
                call(bad)
