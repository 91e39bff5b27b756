"""The live Linux backend (issue 4 onwards). Not implemented yet: nothing here checkpoints
real processes, and no tool claims to."""
