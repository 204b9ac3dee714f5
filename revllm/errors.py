"""User-facing errors: the CLI prints them as one line and exits nonzero (no traceback)."""


class RevLLMError(Exception):
    """Bad input or a refused operation. The message names the problem and, where possible, the fix."""


class CheckpointError(RevLLMError):
    """A checkpoint is missing, incomplete or corrupted; it is refused, never half-loaded."""
