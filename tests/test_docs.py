"""The published numbers: every marked block of README.md and docs/*.md is what `docs/render.py` makes of the
committed result files, so a number cannot drift from its source; and the README stays short."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_renderer():
    spec = importlib.util.spec_from_file_location("render", ROOT / "docs" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rendered_docs_match_the_result_files(capsys):
    assert load_renderer().main(["--check"]) == 0, capsys.readouterr().err


def test_every_block_is_published_somewhere():
    render = load_renderer()
    used = {match["name"] for path in render.DOCUMENTS for match in render.BLOCK.finditer(path.read_text())}
    assert used == set(render.BLOCKS)


def test_the_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
