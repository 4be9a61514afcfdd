"""Evaluation before and after training: loss/perplexity through the trainer, and answer metrics from
greedy (or sampled) generations compared with the reference answers."""

import math

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .data import REFERENCE_COLUMN
from .metrics import score
from .tasks import EvalConfig

GENERATION_METRICS = ("exact_match", "f1", "rouge_l", "accuracy")


def prompt_of(row: dict):
    """What the model is asked: the prompt, or for `messages` rows every message before the last answer."""
    return row["prompt"] if "prompt" in row else row["messages"][:-1]


def render_prompt(prompt, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids exactly as training saw the prompt: chat template with the generation prompt, or plain
    text with the tokenizer's special tokens (BOS)."""
    if isinstance(prompt, list):
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


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
            max_new_tokens=settings.max_new_tokens,
            do_sample=settings.do_sample,
            temperature=settings.temperature if settings.do_sample else None,
            top_p=settings.top_p if settings.do_sample else None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
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


def loss_metrics(trainer, split_name: str = "eval") -> dict[str, float]:
    """Loss on the answer tokens of the eval split (the trainer's own masking) and its perplexity."""
    loss = trainer.evaluate()["eval_loss"]
    return {f"{split_name}_loss": loss, f"{split_name}_perplexity": math.exp(min(loss, 50.0))}


def completion_token_ids(prompt, completion, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
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


def answer_nll(model, tokenizer, rows: Dataset) -> float:
    """Mean negative log-likelihood per answer token: the SFT eval loss, computed outside a trainer."""
    prompts = [prompt_of(row) for row in rows]
    answers = [row["completion"] if "completion" in row else row["messages"][-1:] for row in rows]
    sums, counts = completion_logprobs(model, tokenizer, prompts, answers)
    return (-sums.sum() / counts.sum()).item()


def evaluate_models(task, adapter_dirs: list[str]) -> dict[str, dict[str, float]]:
    """`lmdiff-ft eval`: the base and each adapter on the task's data, one base in memory for all."""
    from .adapters import load_adapter
    from .dpo import prepare_pairs
    from .loading import load_base
    from .train import prepare_rows

    base = load_base(task.base.path, task.quantization, task.dtype, task.base.convert_from_llama, task.base.seed)
    tokenizer = base.tokenizer
    model = base.model
    names = ["base"]
    for i, directory in enumerate(adapter_dirs):
        model = load_adapter(model, directory, base.fingerprint, adapter_name=f"adapter{i}")
        names.append(directory)

    def score_current() -> dict[str, float]:
        if task.preference is not None:
            _, pairs = prepare_pairs(task)
            logprobs = preference_logprobs(model, tokenizer, pairs)
            return {"preference_accuracy": (logprobs["chosen"] > logprobs["rejected"]).float().mean().item()}
        train_rows, eval_rows = prepare_rows(task)
        loss = answer_nll(model, tokenizer, eval_rows)
        results = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}
        for rows, split in ((eval_rows, "eval"), (train_rows, "train")):
            results.update(generation_metrics(model, tokenizer, rows, task.eval, split)[0])
        return results

    results = {}
    for i, name in enumerate(names):
        if i == 0 and len(names) > 1:
            with model.disable_adapter():
                results[name] = score_current()
        else:
            if i > 0:
                model.set_adapter(f"adapter{i - 1}")
            results[name] = score_current()
    return results
