"""The engine: an ipykernel kernel with a task lane."""
