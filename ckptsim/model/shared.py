"""Reference-counted kernel objects.

``refs`` counts real references (fd slots, tasks, mappings, in-flight messages). Linux-CR's
leak detection compares it with the references a checkpoint found inside the checkpointed set.
"""
from __future__ import annotations


class Shared:
    """An object that several tasks or fds may reference."""

    def __init__(self) -> None:
        self.refs = 1

    def get(self):
        if self.refs <= 0:
            raise AssertionError(f"get() on released {type(self).__name__}")
        self.refs += 1
        return self

    def put(self, kernel) -> None:
        if self.refs <= 0:
            raise AssertionError(f"put() on released {type(self).__name__}")
        self.refs -= 1
        if self.refs == 0:
            self.release(kernel)

    def release(self, kernel) -> None:
        """Free what the object holds; runs once, when the last reference goes."""
