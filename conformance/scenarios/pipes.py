"""Conformance scenarios: pipes."""
from ..dsl import *  # noqa: F401,F403
from ..scenario import scenario  # noqa: F401
