"""Pairwise judgements of two columns' answers, appended one JSON line each."""

import json
import threading
from collections import Counter
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from ..errors import UserError
from .settings import GenerationSettings

VOTES = ("left better", "right better", "tie", "both bad")


class VoteLog:
    """Pairwise judgements, one JSON line each, appended to `<data dir>/votes.jsonl`."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / "votes.jsonl"
        self._lock = threading.Lock()

    def record(
        self, vote: str, prompt: str, settings: GenerationSettings, left: dict, right: dict, prompt_format: str
    ) -> dict:
        """`left`/`right`: {"column", "label", "output"}. Returns the line written."""
        if vote not in VOTES:
            raise UserError(f"unknown vote {vote!r}; expected one of {', '.join(VOTES)}")
        line = {
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "vote": vote,
            "prompt": prompt,
            "prompt_format": prompt_format,
            "settings": asdict(settings),
            "left": left,
            "right": right,
        }
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
        return line

    def tally(self) -> list[list]:
        """One row per (left, right) pair: the pair, then the count of each vote."""
        if not self.path.is_file():
            return []
        counts: dict[tuple[str, str], Counter] = {}
        for text in self.path.read_text(encoding="utf-8").splitlines():
            line = json.loads(text)
            pair = (line["left"]["column"], line["right"]["column"])
            counts.setdefault(pair, Counter())[line["vote"]] += 1
        return [[*pair, *(count[v] for v in VOTES)] for pair, count in counts.items()]
