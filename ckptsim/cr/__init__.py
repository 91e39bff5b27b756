"""Checkpoint/restart over the model (Linux-CR semantics)."""
