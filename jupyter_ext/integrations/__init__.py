"""Integrations with other parallel tools (dask)."""
