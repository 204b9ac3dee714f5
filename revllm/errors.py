"""User-facing errors: the CLI prints them as one line and exits nonzero (no traceback)."""

from __future__ import annotations

import json
from pathlib import Path


class RevLLMError(Exception):
    """Bad input or a refused operation. The message names the problem and, where possible, the fix."""


class CheckpointError(RevLLMError):
    """A checkpoint is missing, incomplete or corrupted; it is refused, never half-loaded."""


def read_json(path, missing: str, error: type[RevLLMError] = RevLLMError):
    """Parse a JSON file that revllm wrote; a missing or corrupted file is a one-line ``error``."""
    path = Path(path)
    if not path.is_file():
        raise error(missing)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is corrupted ({getattr(e, 'msg', None) or e.reason})") from None
