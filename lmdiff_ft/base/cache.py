"""Where bases built or converted on this machine are kept."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """$LMDIFF_FT_CACHE, else ~/.cache/lmdiff-ft."""
    return Path(os.environ.get("LMDIFF_FT_CACHE", Path.home() / ".cache" / "lmdiff-ft"))
