"""ckptsim: a checkpoint/restart toolkit after Linux-CR (2010), with a reference model."""

__version__ = "0.1.0"
