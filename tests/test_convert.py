"""`lmdiff-ft convert` end to end: a tiny Llama on disk in, a loadable LM-Diff checkpoint out."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from lmdiff_ft.cli import main
from lmdiff_ft.modeling import LmDiffForCausalLM
from lmdiff_ft.tiny import build_tokenizer


@pytest.fixture
def llama_dir(tmp_path):
    directory = tmp_path / "llama"
    tiny_llama().save_pretrained(directory)
    build_tokenizer(["the moon and the stars", "apollo eleven"], vocab_size=300).save_pretrained(directory)
    return directory


@torch.no_grad()
def test_convert_writes_a_checkpoint_automodel_loads(llama_dir, tmp_path, capsys):
    out = tmp_path / "lmdiff"
    assert main(["convert", str(llama_dir), str(out)]) == 0
    assert "max |Δlogits|" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["model_type"] == "lmdiff"

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    llama = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    assert isinstance(model, LmDiffForCausalLM)
    tokens = torch.randint(0, 97, (2, 20))
    assert (model(tokens).logits - llama(tokens).logits).abs().max().item() <= 1e-5


def test_unknown_tensors_are_refused_then_dropped_on_request(llama_dir, tmp_path, capsys):
    weights = load_file(llama_dir / "model.safetensors")
    weights["model.layers.0.self_attn.lambda_q1"] = torch.zeros(16)
    save_file(weights, llama_dir / "model.safetensors", metadata={"format": "pt"})

    out = tmp_path / "out"
    assert main(["convert", str(llama_dir), str(out)]) == 2
    err = capsys.readouterr().err
    assert "model.layers.0.self_attn.lambda_q1" in err and "--drop-unknown" in err
    assert not out.exists()

    assert main(["convert", str(llama_dir), str(out), "--drop-unknown"]) == 0
    assert "dropped 1" in capsys.readouterr().out


@pytest.mark.parametrize(
    "setup, expected",
    [
        (lambda d: None, "no such directory"),
        (lambda d: (d.mkdir(), (d / "config.json").write_text('{"model_type": "gpt2"}')), "expected 'llama'"),
        (lambda d: (d.mkdir(), (d / "config.json").write_text("{oops")), "not valid JSON"),
        (lambda d: d.mkdir(), "no config.json"),
    ],
)
def test_bad_sources_give_one_line_and_exit_2(tmp_path, setup, expected):
    src = tmp_path / "src"
    setup(src)
    result = subprocess.run(
        [sys.executable, "-m", "lmdiff_ft", "convert", str(src), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": ""},
    )
    assert result.returncode == 2
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_pickle_only_checkpoint_is_refused(llama_dir, tmp_path, capsys):
    (llama_dir / "model.safetensors").rename(llama_dir / "pytorch_model.bin")
    assert main(["convert", str(llama_dir), str(tmp_path / "out")]) == 2
    assert "pickle files are not loaded" in capsys.readouterr().err
