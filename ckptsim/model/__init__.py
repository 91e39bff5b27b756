"""The deterministic reference model of the kernel state checkpoint/restart deals with."""
