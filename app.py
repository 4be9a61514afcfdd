"""`python app.py [RUN_DIR ...] [--host H] [--port P] [--share] ...`: the adapter comparison app, the same as
`lmdiff-ft app` (see `lmdiff-ft app --help`). Offline and without analytics unless the environment says otherwise."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is imported, so before lmdiff_ft
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from lmdiff_ft.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["app", *sys.argv[1:]]))
