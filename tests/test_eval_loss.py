"""One eval loss: an adapter's loss on a split is the same number wherever it is reported (SFT's after, DPO's SFT
metrics before training, `lmdiff-ft eval`), since all three call `evaluation.likelihood.loss_metrics`."""

import pytest
import torch
from datasets import Dataset
from test_dpo import dpo_body, pairs
from test_sft import QA_BODY, write_jsonl, write_task
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmdiff_ft.commands.eval import evaluate_models
from lmdiff_ft.evaluation.likelihood import answer_nll
from lmdiff_ft.recipes.dpo import run_dpo
from lmdiff_ft.recipes.sft import run_sft
from lmdiff_ft.schema.load import load_task


@pytest.mark.slow
def test_sft_dpo_and_eval_report_one_eval_loss(tmp_path, tiny_base_path):
    write_jsonl(tmp_path / "qa.jsonl", [{"question": f"Q{i}?", "answer": f"A{i}"} for i in range(16)])
    sft_task = load_task(write_task(tmp_path, tiny_base_path, QA_BODY, name="sft"))
    sft = run_sft(sft_task)
    adapter = str(tmp_path / "runs" / "sft")

    write_jsonl(tmp_path / "pairs.jsonl", pairs(8))
    write_jsonl(tmp_path / "heldout.jsonl", pairs(4, offset=100))
    dpo_task = load_task(write_task(tmp_path, tiny_base_path, dpo_body(adapter), name="dpo"), ["train.max_steps=1"])
    dpo = run_dpo(dpo_task)

    evaluated = evaluate_models(sft_task, [adapter])[adapter]
    after_sft = sft["after"]["eval_loss"]
    assert after_sft < sft["before"]["eval_loss"]  # a trained adapter, not the base: the numbers can differ
    assert dpo["before"]["sft_eval_loss"] == pytest.approx(after_sft, rel=1e-6)
    assert evaluated["eval_loss"] == pytest.approx(after_sft, rel=1e-6)
    assert evaluated["eval_perplexity"] == pytest.approx(sft["after"]["eval_perplexity"], rel=1e-6)


def test_a_text_rows_eval_loss_is_the_language_model_loss_on_all_of_it(tiny_base_path):
    """`text` rows are scored on every token after BOS, as training trains them: the model's own LM loss."""
    model = AutoModelForCausalLM.from_pretrained(tiny_base_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_path)
    text = "The Moon orbits the Earth."
    ids = torch.tensor([tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]])
    with torch.no_grad():
        expected = model(input_ids=ids, labels=ids).loss.item()
    assert answer_nll(model, tokenizer, Dataset.from_list([{"text": text}])) == pytest.approx(expected, rel=1e-5)
