"""`lmdiff-ft eval`: the base and each adapter on a task's data, side by side, one base in memory for all."""

from ..adapters.known_base import load_adapter
from ..base.loading import load_base
from ..data.rows import prepare_pairs, prepare_rows
from ..evaluation.generation import generation_metrics
from ..evaluation.likelihood import loss_metrics, preference_logprobs
from ..evaluation.retention import CORRECT_KEY, retention_kept, retention_metrics
from ..schema.task import Task


def evaluate_models(task: Task, adapter_dirs: list[str]) -> dict[str, dict[str, float]]:
    """`lmdiff-ft eval`: the base and each adapter on the task's data, one base in memory for all: the numbers a
    run's metrics.json holds before and after training, with "kept" measured against the base."""
    b = task.base
    base = load_base(b.path, task.quantization, task.dtype, b.convert_from_llama, b.seed, plain_llama=b.plain_llama)
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
        results = loss_metrics(model, tokenizer, eval_rows)
        for rows, split in ((eval_rows, "eval"), (train_rows, "train")):
            results.update(generation_metrics(model, tokenizer, rows, task.eval, split)[0])
        return results | retention_metrics(model, tokenizer, task.eval)[0]

    results = {}
    for i, name in enumerate(names):
        if i == 0 and len(names) > 1:
            with model.disable_adapter():
                results[name] = score_current()
        else:
            if i > 0:
                model.set_adapter(f"adapter{i - 1}")
            results[name] = score_current()
    for name in names[1:]:
        results[name] |= retention_kept(results["base"], results[name])
    for scores in results.values():
        scores.pop(CORRECT_KEY, None)
    return results
