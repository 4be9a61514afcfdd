"""Checkpoints that load where lmdiff_ft is not installed (`trust_remote_code=True`), and without remote code where
it is."""

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch
from conftest import randomize_lmdiff_parameters, tiny_lmdiff_config
from transformers import AutoModelForCausalLM

from lmdiff_ft.model import LmDiffForCausalLM
from lmdiff_ft.model.remote_code import AUTO_MAP, SHIPPED

# Run in the venv: load with remote code, compare with what the package computed, generate, save and load again.
WITHOUT_PACKAGE = """
import importlib.util, sys, torch
from transformers import AutoModelForCausalLM
assert importlib.util.find_spec("lmdiff_ft") is None, "this venv must not see lmdiff_ft"
checkpoint, expected = sys.argv[1], torch.load(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
with torch.no_grad():
    logits = model(**expected["batch"]).logits
    tokens = model.generate(**expected["batch"], max_new_tokens=5, do_sample=False, pad_token_id=0)
torch.testing.assert_close(logits, expected["logits"], atol=1e-6, rtol=0)
assert torch.equal(tokens, expected["tokens"])
model.save_pretrained(checkpoint + "-again")
again = AutoModelForCausalLM.from_pretrained(checkpoint + "-again", trust_remote_code=True).eval()
with torch.no_grad():
    torch.testing.assert_close(again(**expected["batch"]).logits, logits, atol=0, rtol=0)
print("remote code OK")
"""


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    torch.manual_seed(0)
    model = LmDiffForCausalLM(tiny_lmdiff_config()).eval()
    randomize_lmdiff_parameters(model)
    model.save_pretrained(tmp_path / "model")
    tokens = torch.randint(3, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0
    batch = {"input_ids": tokens, "attention_mask": mask}
    with torch.no_grad():
        expected = {
            "batch": batch,
            "logits": model(**batch).logits,
            "tokens": model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=0),
        }
    torch.save(expected, tmp_path / "expected.pt")
    return tmp_path / "model"


def test_the_checkpoint_carries_its_code_and_the_package_still_loads_its_own_classes(checkpoint):
    assert json.loads((checkpoint / "config.json").read_text())["auto_map"] == AUTO_MAP
    assert all((checkpoint / name).is_file() for name in SHIPPED)
    for name in SHIPPED:  # only siblings and installed libraries: nothing from the package, nothing from above
        imports = [line.split() for line in (checkpoint / name).read_text().splitlines() if line.startswith("from ")]
        assert all(not words[1].startswith("..") and not words[1].startswith("lmdiff_ft") for words in imports)
    model = AutoModelForCausalLM.from_pretrained(checkpoint)  # no trust_remote_code: the registered class
    assert type(model) is LmDiffForCausalLM


def venv_without_the_package(path: Path) -> Path:
    """A venv that sees this interpreter's installed packages (torch, transformers, ...) but not lmdiff_ft: the
    site-packages folders are added as plain paths, whose .pth files (an editable install's finder) are not run."""
    venv.create(path, with_pip=False)
    site_dirs = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    (next(path.glob("lib/python*/site-packages")) / "installed.pth").write_text("\n".join(site_dirs) + "\n")
    return path / "bin" / "python"


@pytest.mark.slow
def test_a_venv_without_the_package_loads_the_checkpoint_with_remote_code(checkpoint, tmp_path):
    python = venv_without_the_package(tmp_path / "venv")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    done = subprocess.run(
        [str(python), "-c", WITHOUT_PACKAGE, str(checkpoint), str(tmp_path / "expected.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "remote code OK" in done.stdout
