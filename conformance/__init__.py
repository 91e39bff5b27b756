"""The C/R conformance suite: backend-neutral scenarios, a runner, and the backends."""
