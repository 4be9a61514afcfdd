"""A small random LM-Diff base and its tokenizer, built locally and deterministically from a seed.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on a text corpus shipped with the
package (so any text still encodes), with the chat template of `model/chat_template.py`. Demos, the shipped
tasks and the tests all run on it; the same code paths serve a real checkpoint on disk.
"""

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ..model import LmDiffConfig, LmDiffForCausalLM
from ..model.chat_template import CHAT_TEMPLATE, ROLE_TOKENS
from ..model.convert import convert_llama_model
from ..outputs import atomic_output_dir
from .cache import cache_dir

CORPUS_FILE = Path(__file__).parent / "assets" / "tiny_corpus.txt"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", *ROLE_TOKENS]

# initializer_range 0.1, not Llama's 0.02: at hidden 256 a 0.02 init gives lm_head rows of norm ~0.3, so
# the frozen head of a random base cannot express a confident prediction and LoRA cannot fit the shipped
# tasks' answers (measured: loss 3.0 vs 0.002 after 300 steps on 64 QA pairs).
TINY_DIMS = {
    "initializer_range": 0.1,
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
}


def build_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Byte-level BPE like Llama 3/GPT-2, with BOS added to every encoded text as Llama does."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    bos_id = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=ROLE_TOKENS,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def corpus_lines() -> list[str]:
    return [line for line in CORPUS_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]


def build_tiny_base(
    out: str | Path,
    seed: int = 0,
    from_llama: bool = False,
    vocab_size: int = 2048,
    overwrite: bool = False,
    **dims,
) -> Path:
    """Write a tiny random LM-Diff checkpoint + tokenizer to `out`.

    from_llama: build a tiny random Llama and convert it (the path a real TinyLlama takes), instead of
    an LM-Diff initialised from scratch.
    """
    tokenizer = build_tokenizer(corpus_lines(), vocab_size)
    fields = {**TINY_DIMS, **dims}
    fields.update(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():  # the caller's random state is left as it was
        torch.manual_seed(seed)
        if from_llama:
            llama = LlamaForCausalLM(LlamaConfig(**fields)).eval()
            model = convert_llama_model(llama, seed=seed)
        else:
            model = LmDiffForCausalLM(LmDiffConfig(**fields))
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "tiny_base.json").write_text(json.dumps({"seed": seed, "from_llama": from_llama, **fields}, indent=2))
    return Path(out)


def tiny_base_dir(seed: int = 0, from_llama: bool = False) -> Path:
    """The cached tiny base for a seed, built on first use (under $LMDIFF_FT_CACHE or ~/.cache/lmdiff-ft)."""
    recipe = json.dumps(
        {"dims": TINY_DIMS, "corpus": hashlib.sha256(CORPUS_FILE.read_bytes()).hexdigest(), "v": 2}, sort_keys=True
    )
    tag = hashlib.sha256(recipe.encode()).hexdigest()[:10]
    directory = cache_dir() / f"tiny-{'llama-' if from_llama else ''}seed{seed}-{tag}"
    if not (directory / "config.json").exists():
        build_tiny_base(directory, seed=seed, from_llama=from_llama, overwrite=True)
    return directory
