"""The error of a checkpoint or export that cannot be read or trusted, in a module of its own so that the
run-directory readers and the safe DCP loader both raise it without a cycle."""


class CheckpointError(RuntimeError):
    pass
