"""Scores that need no generation, from the log-likelihood of given answers: the eval loss of a split (one function
wherever it is reported), and DPO's held-out preference accuracy and reward margins."""

import math

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from ..data.rows import Prompt
from .generation import prompt_of, render_prompt


def completion_token_ids(prompt: Prompt, completion, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) as the model sees them: chat-rendered, or plain text + EOS."""
    prompt_ids = render_prompt(prompt, tokenizer)
    if isinstance(prompt, list):
        full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        return prompt_ids, full_ids[len(prompt_ids) :]
    return prompt_ids, tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


@torch.no_grad()
def completion_logprobs(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list, completions: list, batch_size: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each completion given its prompt, and its token count."""
    was_training = model.training
    model.eval()
    sums, counts = [], []
    for start in range(0, len(prompts), batch_size):
        pairs = [
            completion_token_ids(p, c, tokenizer)
            for p, c in zip(prompts[start : start + batch_size], completions[start : start + batch_size], strict=True)
        ]
        width = max(len(p) + len(c) for p, c in pairs)
        ids = torch.full((len(pairs), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        scored = torch.zeros((len(pairs), width), dtype=torch.bool)
        for i, (p, c) in enumerate(pairs):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            mask[i, : len(p) + len(c)] = 1
            scored[i, len(p) : len(p) + len(c)] = True
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float().cpu()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        sums.append((logprobs * scored[:, 1:]).sum(-1))
        counts.append(scored[:, 1:].sum(-1))
    model.train(was_training)
    return torch.cat(sums), torch.cat(counts)


def preference_logprobs(model, tokenizer, rows: Dataset) -> dict[str, torch.Tensor]:
    prompts = rows["prompt"]
    chosen, _ = completion_logprobs(model, tokenizer, prompts, rows["chosen"])
    rejected, _ = completion_logprobs(model, tokenizer, prompts, rows["rejected"])
    return {"chosen": chosen, "rejected": rejected}


def preference_metrics(policy: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], beta: float) -> dict:
    """Held-out preference accuracy of the policy and of the reference, and the DPO implicit-reward margin."""
    margins = beta * ((policy["chosen"] - reference["chosen"]) - (policy["rejected"] - reference["rejected"]))
    return {
        "preference_accuracy": (policy["chosen"] > policy["rejected"]).float().mean().item(),
        "reference_preference_accuracy": (reference["chosen"] > reference["rejected"]).float().mean().item(),
        "reward_margin": margins.mean().item(),
        "reward_accuracy": (margins > 0).float().mean().item(),
    }


def scored_part(row: dict) -> tuple[Prompt, object]:
    """(prompt, answer) of an SFT row as the eval loss scores it: the completion, the final turn of a conversation,
    or all of a `text` row's text (after the tokenizer's BOS, as training sees it)."""
    if "text" in row:
        return "", row["text"]
    if "completion" in row:
        return row["prompt"], row["completion"]
    return prompt_of(row), row["messages"][-1:]


def answer_nll(model, tokenizer, rows: Dataset) -> float:
    """Mean negative log-likelihood per answer token, over the whole split."""
    prompts, answers = zip(*(scored_part(row) for row in rows), strict=True)
    sums, counts = completion_logprobs(model, tokenizer, list(prompts), list(answers))
    return (-sums.sum() / counts.sum()).item()


def loss_metrics(model, tokenizer, rows: Dataset, split_name: str = "eval") -> dict[str, float]:
    """The eval loss of a model (with its active adapter) on a split, and its perplexity: the one computation behind
    SFT's before/after, DPO's SFT metrics and `lmdiff-ft eval`, so the same adapter and split give one number.
    Token-weighted over the split, where a trainer's evaluate() averages per batch and depends on batch size."""
    loss = answer_nll(model, tokenizer, rows)
    return {f"{split_name}_loss": loss, f"{split_name}_perplexity": math.exp(min(loss, 50.0))}
