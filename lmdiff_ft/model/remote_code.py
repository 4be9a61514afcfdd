"""Checkpoints that load without this package: `save_pretrained` also writes LM-Diff's code beside the weights
and an `auto_map` in config.json, so that `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`
works where `lmdiff_ft` is not installed (an evaluation harness, a serving stack, a colleague's machine).

With the package installed nothing changes: `lmdiff_ft.model` registers the classes with the Auto classes, and
transformers prefers registered classes to remote code unless `trust_remote_code=True` is passed.

The checkpoint's folder is flat (transformers copies a remote model's files and their `from .x import` siblings
into one module folder), so the modeling file's two imports from `integrations/` are rewritten to siblings.
"""

from pathlib import Path

HERE = Path(__file__).parent
IN_PACKAGE = (HERE.parent / "integrations").is_dir()  # False when this file is itself a checkpoint's remote code

# file in the checkpoint -> where it comes from in the package
SHIPPED = {
    "configuration_lmdiff.py": HERE / "configuration_lmdiff.py",
    "modeling_lmdiff.py": HERE / "modeling_lmdiff.py",
    "remote_code.py": HERE / "remote_code.py",
    "lmdiff_transformers.py": HERE.parent / "integrations" / "transformers.py",
    "lmdiff_bitsandbytes.py": HERE.parent / "integrations" / "bitsandbytes.py",
}
FLAT_IMPORTS = {
    "from ..integrations.transformers import": "from .lmdiff_transformers import",
    "from ..integrations.bitsandbytes import": "from .lmdiff_bitsandbytes import",
}
AUTO_MAP = {
    "AutoConfig": "configuration_lmdiff.LmDiffConfig",
    "AutoModel": "modeling_lmdiff.LmDiffModel",
    "AutoModelForCausalLM": "modeling_lmdiff.LmDiffForCausalLM",
    "AutoModelForSequenceClassification": "modeling_lmdiff.LmDiffForSequenceClassification",
    "AutoModelForQuestionAnswering": "modeling_lmdiff.LmDiffForQuestionAnswering",
    "AutoModelForTokenClassification": "modeling_lmdiff.LmDiffForTokenClassification",
}


def write_remote_code(directory: str | Path) -> None:
    """Write the files `AUTO_MAP` names (and what they import) into a checkpoint directory."""
    for name, source in SHIPPED.items():
        text = (source if IN_PACKAGE else HERE / name).read_text()
        for package_import, sibling_import in FLAT_IMPORTS.items():
            text = text.replace(package_import, sibling_import)
        (Path(directory) / name).write_text(text)
