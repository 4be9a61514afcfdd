"""What a training run shows before it trains: exactly which tokens the loss sees (SFT), and the rendered pairs
(DPO). Silent masking bugs are the top complaint about SFT tools."""

from collections import Counter
from collections.abc import Iterator

from datasets import Dataset
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from ..data.sources import SOURCE_COLUMN
from ..evaluation.likelihood import completion_token_ids

IGNORE_INDEX = -100


def marked_tokens(input_ids: list[int], labels: list[int], tokenizer) -> Text:
    """The example as text, trained tokens highlighted (green, underlined), masked ones dim."""
    text = Text()
    for token_id, label in zip(input_ids, labels, strict=True):
        piece = tokenizer.decode([token_id])
        text.append(piece, style="bold green underline" if label != IGNORE_INDEX else "dim")
    return text


def print_label_preview(examples: list[dict], tokenizer, console: Console) -> None:
    """Show exactly which tokens the loss sees: silent masking bugs are the top complaint about SFT tools."""
    for i, example in enumerate(examples):
        ids, labels = example["input_ids"], example["labels"]
        trained = sum(label != IGNORE_INDEX for label in labels)
        console.rule(f"example {i + 1}: {trained} trained / {len(ids)} tokens")
        console.print(marked_tokens(ids, labels, tokenizer))
        trained_text = tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])
        console.print(f"[bold]trained on:[/bold] {escape(repr(trained_text))}")


def packed_examples(prepared: Dataset) -> Iterator[dict]:
    """The examples inside TRL's packed rows, cut apart at their `seq_lengths`; unpacked rows as they are."""
    for row in prepared:
        if "seq_lengths" not in row:
            yield row
            continue
        start = 0
        for length in row["seq_lengths"]:
            yield {key: row[key][start : start + length] for key in ("input_ids", "labels")}
            start += length


def print_pair_preview(rows: Dataset, tokenizer, console: Console) -> None:
    """Two rendered pairs with the token counts the trainer will see, and totals for the split."""
    counts = []
    for i, row in enumerate(rows):
        prompt_ids, chosen_ids = completion_token_ids(row["prompt"], row["chosen"], tokenizer)
        _, rejected_ids = completion_token_ids(row["prompt"], row["rejected"], tokenizer)
        counts.append((len(prompt_ids), len(chosen_ids), len(rejected_ids)))
        if i < 2:
            sizes = f"prompt {len(prompt_ids)} / chosen {len(chosen_ids)} / rejected {len(rejected_ids)} tokens"
            console.rule(f"pair {i + 1}: {sizes}")
            console.print(f"[dim]{escape(tokenizer.decode(prompt_ids))}[/dim]")
            console.print(f"[bold green]chosen:[/bold green] {escape(repr(tokenizer.decode(chosen_ids)))}")
            console.print(f"[bold red]rejected:[/bold red] {escape(repr(tokenizer.decode(rejected_ids)))}")
    totals = [sum(c[k] for c in counts) for k in range(3)]
    longest = max(p + max(c, r) for p, c, r in counts)
    console.print(
        f"train split: {len(counts)} pairs, tokens prompt {totals[0]:,} / chosen {totals[1]:,} / rejected "
        f"{totals[2]:,}; longest pair {longest} tokens"
    )


def print_mix(train_rows: Dataset, eval_rows: Dataset, console: Console) -> None:
    """With several sources: how many train and eval rows each one gives (weights repeat or drop rows)."""
    if SOURCE_COLUMN not in train_rows.column_names:
        return
    train_names, eval_names = list(train_rows[SOURCE_COLUMN]), list(eval_rows[SOURCE_COLUMN])
    train, held_out = Counter(train_names), Counter(eval_names)
    for name in dict.fromkeys(train_names + eval_names):
        line = f"  {name}: {held_out[name]} eval rows"  # a data.eval source
        if train[name]:
            share = 100 * train[name] / len(train_rows)
            line = f"  {name}: {train[name]} train rows ({share:.0f}% of the mix), {held_out[name]} eval rows"
        console.print(line, soft_wrap=True)  # one line per source, however long its path
