"""Retention: what an adapter breaks. General questions the base answers correctly, asked before and after training.

The held-out split measures what a run learns; this measures what it forgets ("LoRA Learns Less and Forgets Less",
Biderman et al., 2024). A retention file is JSONL with `question` and `answers` (accepted answers); a generation is
correct when it contains one of them as whole words, after the same normalisation as exact match. Questions are
asked as a user turn in the base's own chat template, with its default system prompt and no task template: the
base's general ability, not the task's. `retention_kept` is the share of the base's correct answers still
correct after training.
"""

import json
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from ..errors import UserError
from ..schema.task import EvalConfig
from .generation import generate_answers
from .metrics import normalize_answer

CORRECT_KEY = "retention_correct"  # the indices of the questions answered correctly (read back for "kept")


def load_retention_set(path: str | Path) -> list[dict]:
    """The questions and their accepted answers; one line naming the file and row for a bad one."""
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"eval.retention: cannot read {path} ({exc.__class__.__name__})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: row {number}: not valid JSON ({exc.msg})") from None
        answers = row.get("answers") if isinstance(row, dict) else None
        question = row.get("question") if isinstance(row, dict) else None
        if not isinstance(question, str) or not question.strip():
            raise UserError(f"{path}: row {number}: expected a non-empty string `question`")
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise UserError(f"{path}: row {number}: expected `answers`, a non-empty list of non-empty strings")
        rows.append({"question": question, "answers": answers})
    if not rows:
        raise UserError(f"{path}: no questions (expected JSONL rows with `question` and `answers`)")
    return rows


def contains_answer(prediction: str, answers: list[str]) -> bool:
    """'The capital is Paris.' contains 'paris'; 'Apollo 1' does not contain 'Apollo 11' (whole words)."""
    words = f" {normalize_answer(prediction)} "
    return any(f" {normalize_answer(answer)} " in words for answer in answers)


def ask(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[dict], max_new_tokens: int) -> list[str]:
    """Greedy answers to each question, asked as a user turn of the base's chat template."""
    prompts = [[{"role": "user", "content": row["question"]}] for row in rows]
    settings = EvalConfig(max_new_tokens=max_new_tokens)
    return generate_answers(model, tokenizer, prompts, settings, desc="retention questions")


def retention_metrics(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, settings: EvalConfig
) -> tuple[dict, list[dict]]:
    """`retention_accuracy` and the indices answered correctly; nothing when the task names no retention file."""
    if settings.retention is None:
        return {}, []
    rows = load_retention_set(settings.retention)
    answers = ask(model, tokenizer, rows, settings.retention_max_new_tokens)
    pairs = list(zip(rows, answers, strict=True))
    correct = [i for i, (row, answer) in enumerate(pairs) if contains_answer(answer, row["answers"])]
    samples = [
        {"split": "retention", "prompt": row["question"], "reference": " | ".join(row["answers"]), "answer": answer}
        for row, answer in pairs
    ]
    return {"retention_accuracy": len(correct) / len(rows), CORRECT_KEY: correct}, samples


def retention_kept(before: dict, after: dict) -> dict:
    """The share of the questions answered correctly before training that are still answered correctly after."""
    was_correct = set(before.get(CORRECT_KEY, []))
    if not was_correct or CORRECT_KEY not in after:
        return {}  # nothing the base knew to keep (a retention set should be chosen against the base)
    return {"retention_kept": len(was_correct & set(after[CORRECT_KEY])) / len(was_correct)}
