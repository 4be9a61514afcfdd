"""Answers generated from prompts exactly as training rendered them, and the task's answer metrics on them."""

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..data.rows import REFERENCE_COLUMN, Prompt
from ..schema.task import EvalConfig
from .metrics import score

GENERATION_METRICS = ("exact_match", "f1", "rouge_l", "accuracy")


def prompt_of(row: dict):
    """What the model is asked: the prompt, or for `messages` rows every message before the last answer."""
    return row["prompt"] if "prompt" in row else row["messages"][:-1]


def render_prompt(prompt: Prompt, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids exactly as training saw the prompt: chat template with the generation prompt, or plain
    text with the tokenizer's special tokens (BOS)."""
    if isinstance(prompt, list):
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def generation_settings(
    tokenizer: PreTrainedTokenizerBase, max_new_tokens: int, sample: bool, temperature: float, top_p: float
) -> dict:
    """`generate`'s keywords for greedy decoding or nucleus sampling, all explicit, so that a base's own generation
    config (a top-k, a temperature) does not change how evaluation and the app decode."""
    return {
        "max_new_tokens": max_new_tokens,
        "do_sample": sample,
        "temperature": temperature if sample else None,
        "top_p": top_p if sample else None,
        "top_k": None,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list,
    settings: EvalConfig,
    batch_size: int = 16,
    seed: int = 0,
    desc: str = "generating",
) -> list[str]:
    """Batched, left-padded generation; returns the decoded new text of each prompt."""
    was_training = model.training
    model.eval()
    answers = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
        ids = [render_prompt(p, tokenizer) for p in prompts[start : start + batch_size]]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for x in ids])
        attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        torch.manual_seed(seed + start)
        output = model.generate(
            input_ids=input_ids.to(model.device),
            attention_mask=attention_mask.to(model.device),
            **generation_settings(
                tokenizer, settings.max_new_tokens, settings.do_sample, settings.temperature, settings.top_p
            ),
        )
        answers += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in output]
    model.train(was_training)
    return answers


def generation_metrics(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, rows: Dataset, settings: EvalConfig, split: str
) -> tuple[dict[str, float], list[dict]]:
    """The task's answer metrics on up to `settings.num_samples` (eval) / `train_samples` (train) rows."""
    limit = settings.num_samples if split == "eval" else settings.train_samples
    metrics = [m for m in settings.metrics if m in GENERATION_METRICS]
    if limit == 0 or not metrics or REFERENCE_COLUMN not in rows.column_names:
        return {}, []
    rows = rows.select(range(min(limit, len(rows))))
    prompts = [prompt_of(row) for row in rows]
    references = rows[REFERENCE_COLUMN]
    answers = generate_answers(model, tokenizer, prompts, settings, desc=f"{split} generations")
    results = {f"{split}_{m}": score(m, answers, references, settings.labels) for m in metrics}
    shown = zip(prompts[:5], references[:5], answers[:5], strict=True)
    samples = [{"prompt": p, "reference": r, "answer": a} for p, r, a in shown]
    return results, samples
