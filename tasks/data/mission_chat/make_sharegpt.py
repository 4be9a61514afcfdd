"""mission_type's rows as ShareGPT conversations (`conversations: [{from, value}]`), the chat format most Hub
datasets use: a system turn, the description as the human's question, the label as gpt's answer. It gives
tasks/nasa_qa_mixed.yaml a second source in a second format. Rerun after editing mission_type:

    python tasks/data/mission_chat/make_sharegpt.py
"""

import json
from pathlib import Path

HERE = Path(__file__).parent
LABELS = "planetary, astrophysics, heliophysics, earth_science, human_spaceflight"
SYSTEM = f"Name the kind of NASA mission with one of: {LABELS}."


def conversation(row: dict) -> dict:
    return {
        "conversations": [
            {"from": "system", "value": SYSTEM},
            {"from": "human", "value": f"What kind of mission is this? {row['description']}"},
            {"from": "gpt", "value": row["label"]},
        ]
    }


for split in ("train", "eval"):
    rows = (HERE.parent / "mission_type" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    lines = [json.dumps(conversation(json.loads(line)), ensure_ascii=False) for line in rows if line.strip()]
    (HERE / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
