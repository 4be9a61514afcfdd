"""Choose a retention set against a base: ask it every candidate question and keep those it answers correctly.

    python tasks/data/retention/select_for_base.py smollm2-135m tasks/data/retention/smollm2_general.jsonl

A retention set measures what training breaks, so it holds only what the base knew: `retention_kept` is then the
share of it that survives. Questions are asked exactly as evaluation asks them (evaluation/retention.py).
"""

import argparse
import json
from pathlib import Path

from lmdiff_ft.base.loading import load_base
from lmdiff_ft.evaluation.retention import ask, contains_answer, load_retention_set

CANDIDATES = Path(__file__).with_name("candidates.jsonl")
MAX_NEW_TOKENS = 24  # the schema's default eval.retention_max_new_tokens

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("base", help="a named base or checkpoint directory")
parser.add_argument("out", type=Path)
args = parser.parse_args()

base = load_base(args.base, quantization="none")
rows = load_retention_set(CANDIDATES)
answers = ask(base.model, base.tokenizer, rows, MAX_NEW_TOKENS)
kept = [row for row, answer in zip(rows, answers, strict=True) if contains_answer(answer, row["answers"])]
for row, answer in zip(rows, answers, strict=True):
    print(f"{'ok  ' if row in kept else 'MISS'} {row['question']} -> {answer!r}")
args.out.write_text("".join(json.dumps(row) + "\n" for row in kept))
print(f"{len(kept)} of {len(rows)} candidates answered correctly by {args.base}: wrote {args.out}")
