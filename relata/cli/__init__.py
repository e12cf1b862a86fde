"""The `relata` command: the lazy click group, settings options and docs, and the process
entry points (stream processor, workers)."""
