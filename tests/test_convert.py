"""`lmdiff-ft convert` end to end: a tiny Llama on disk in, a loadable LM-Diff checkpoint out."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from lmdiff_ft.base.loading import load_base
from lmdiff_ft.base.tiny import build_tokenizer
from lmdiff_ft.cli import main
from lmdiff_ft.errors import UserError
from lmdiff_ft.model import LmDiffForCausalLM


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
        (lambda d: None, "no such file or directory"),
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


def test_a_gguf_quantization_block_left_in_a_safetensors_checkpoint_is_dropped(llama_dir, tmp_path):
    """A GGUF-loaded Llama's state dict saved as safetensors keeps `quantization_config: {quant_method: gguf}` in its
    config although its tensors are full precision; neither the conversion nor the converted base keeps it."""
    config = json.loads((llama_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gguf", "gguf_file": "model.Q4_1.gguf", "dequantize": False}
    (llama_dir / "config.json").write_text(json.dumps(config))
    out = tmp_path / "lmdiff"
    assert main(["convert", str(llama_dir), str(out)]) == 0
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_an_already_quantized_base_is_one_line_on_every_loading_command(tiny_base_path, tmp_path, capsys):
    base = tmp_path / "prequantized"
    shutil.copytree(tiny_base_path, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    for command in (["inspect", str(base)], ["merge", str(base), str(tmp_path), str(tmp_path / "m")]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "already quantized" in err and "'bitsandbytes'" in err
    with pytest.raises(UserError, match="already quantized"):
        load_base(str(base))

    config["quantization_config"] = {"quant_method": "gguf"}  # full-precision tensors: loads, without the block
    (base / "config.json").write_text(json.dumps(config))
    loaded = load_base(str(base), quantization="nf4", with_tokenizer=False)
    assert loaded.model.is_loaded_in_4bit and loaded.model.config.quantization_config.quant_method == "bitsandbytes"


def test_gguf_sources_are_checked_before_loading(tmp_path, capsys):
    (tmp_path / "model.gguf").write_bytes(b"not a gguf file")
    assert main(["convert", str(tmp_path), str(tmp_path / "out"), "--gguf-file", "other.gguf"]) == 2
    assert "no GGUF file 'other.gguf' in it (found: model.gguf)" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "model.gguf"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot read it as a GGUF model" in err
