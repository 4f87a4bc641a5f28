"""The task of futures.ipynb's executor comparison (seed 003).

It lives in a module, not in the notebook, so that every executor can run it:
``ProcessPoolExecutor`` cannot send functions defined interactively in a notebook.
"""

import numpy
from numpy.linalg import norm


def task(n):
    """Generates a 1xN array and computes its 2-norm"""
    A = numpy.ones(n)
    return norm(A, 2)
