"""The server side of jupyter-px: the wire, engine kernels and the controller."""

__version__ = "0.1.0"
