"""The project around the code: CI runs what the README says, and the package ships its types."""

from __future__ import annotations

import os
import re

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)


def read(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as file:
        return file.read()


def test_ci_runs_the_readme_test_command() -> None:
    readme_commands = re.findall(r"```bash\n(.*?)\n```", read("README.md"), flags=re.S)
    (test_command,) = [command for command in readme_commands if "pytest" in command]
    assert test_command in read(".ci/run").splitlines()


def test_the_package_is_typed() -> None:
    assert os.path.exists(os.path.join(ROOT, "src", "normlog", "py.typed"))
