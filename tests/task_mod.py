"""The seed's task module: a function that process, thread and cluster executors all run."""

import numpy
from numpy.linalg import norm


def task(n):
    """Generates a 1xN array and computes its 2-norm."""
    A = numpy.ones(n)
    return norm(A, 2)
