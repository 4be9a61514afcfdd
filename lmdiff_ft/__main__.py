"""`python -m lmdiff_ft` (what `accelerate launch -m lmdiff_ft ...` runs)."""

import sys

from .cli import main

sys.exit(main())
