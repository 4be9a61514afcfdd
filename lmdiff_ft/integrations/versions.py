"""The libraries whose internals this package works around, and whether the installed ones are in the range tested.

The ranges live in one place, pyproject.toml's dependencies: each upper bound is the next release that the suite
has not passed on. pip keeps a plain install inside them; a user who upgrades past them on purpose gets one line
per library from `lmdiff-ft`, instead of a workaround that silently stops matching the library's code.
"""

import os
from importlib.metadata import PackageNotFoundError, requires, version

from packaging.requirements import Requirement

# Every library that a module of lmdiff_ft/integrations/ patches or reads the source of.
WORKED_AROUND = ("transformers", "trl", "peft", "accelerate", "bitsandbytes")


def tested_ranges() -> dict[str, str]:
    """Library name → the version specifier pyproject.toml declares (empty when lmdiff-ft is not installed)."""
    try:
        declared = [Requirement(line) for line in requires("lmdiff-ft") or []]
    except PackageNotFoundError:
        return {}
    return {r.name: _lower_bound_first(r) for r in declared if r.name in WORKED_AROUND and r.marker is None}


def _lower_bound_first(requirement: Requirement) -> str:
    """'>=5.24,<5.25', as pyproject.toml writes it (packaging orders the parts its own way)."""
    return ",".join(sorted(map(str, requirement.specifier), key=lambda part: not part.startswith(">")))


def untested_versions() -> list[str]:
    """One line per worked-around library whose installed version lies outside its tested range; none when
    `LMDIFF_FT_ALLOW_UNTESTED=1` says the user knows (as `.ci/run --latest` does)."""
    if os.environ.get("LMDIFF_FT_ALLOW_UNTESTED") == "1":
        return []
    lines = []
    for name, specifier in tested_ranges().items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            continue  # pip reports a missing dependency itself; the import that needs it fails with its name
        if not Requirement(f"{name}{specifier}").specifier.contains(installed, prereleases=True):
            lines.append(
                f"{name} {installed} is outside the range lmdiff-ft was tested with ({specifier}); "
                f"if something misbehaves, install a tested one: pip install '{name}{specifier}'"
            )
    return lines
