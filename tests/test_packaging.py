"""The project around the code: CI runs what the README says, and the package ships its types."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

from helpers import requires

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


def _sources() -> dict[str, ast.Module]:
    package = os.path.join(ROOT, "src", "normlog")
    trees = {}
    for directory, _, files in os.walk(package):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                relative = os.path.relpath(path, package).replace(os.sep, "/")
                trees[relative] = ast.parse(read(os.path.join("src", "normlog", relative)))
    return trees


# which folder of normlog may import each framework (Lightning and the Trainer are torch's)
FRAMEWORKS = {
    "torch": ("torch/", "keras/_torch.py"),  # Keras 3 on torch: the model is an nn.Module, an update a torch step
    "lightning": ("torch/",),
    "pytorch_lightning": ("torch/",),
    "transformers": ("torch/",),
    "accelerate": ("torch/",),
    "keras": ("keras/",),
    "tensorflow": ("keras/",),
    "jax": ("jax/", "keras/_jax.py"),  # Keras 3 on the JAX backend computes its statistics with jax.numpy
    "optax": ("jax/",),
}


def test_only_a_frameworks_own_package_imports_it() -> None:
    # the rule a newcomer can check with grep: torch only under normlog/torch/, Keras and
    # TensorFlow only under normlog/keras/, JAX under normlog/jax/
    wrong = []
    for path, tree in _sources().items():
        typing_only = {  # `if TYPE_CHECKING:` imports are for the type checker, never run
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
            for inner in ast.walk(node)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                modules = [node.module or ""]
            else:
                continue
            for module in modules:
                folders = FRAMEWORKS.get(module.split(".")[0])
                if folders is not None and not path.startswith(folders):
                    wrong.append(f"{path}: import {module}")
    assert wrong == []


def test_no_file_uses_another_files_private_names() -> None:
    # a name with a leading underscore stays in its file; modules with one are package-internal
    wrong = []
    for path, tree in _sources().items():
        modules = set()  # names bound to normlog modules in this file
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("normlog"):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        # `from normlog import _rows` imports a module; `from normlog._x import _y` a private name
                        package = os.path.join(ROOT, "src", *node.module.split("."), alias.name)
                        if not (os.path.isdir(package) or os.path.exists(package + ".py")):
                            wrong.append(f"{path}: from {node.module} import {alias.name}")
                        else:
                            modules.add(alias.asname or alias.name)
            elif isinstance(node, ast.Import):
                modules.update(alias.asname or alias.name for alias in node.names if alias.name.startswith("normlog"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                base = node.value
                if isinstance(base, ast.Name) and base.id in modules:
                    wrong.append(f"{path}: {base.id}.{node.attr}")
    assert wrong == []


def test_requires_python_is_what_the_code_runs_on() -> None:
    # vermin reads the syntax and the standard library the code uses, and names the oldest
    # Python that has them all (zip(strict=...) is 3.10's)
    requires("vermin")
    (minimum,) = re.findall(r'requires-python = ">=(3\.\d+)"', read("pyproject.toml"))
    vermin = [sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())"]
    result = subprocess.run(
        [*vermin, "-q", "--no-tips", "--violations", f"-t={minimum}-", "src/normlog"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    older = subprocess.run(
        [*vermin, "-q", "--no-tips", "--violations", f"-t=3.{int(minimum[2:]) - 1}-", "src/normlog"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert older.returncode != 0, "the code also runs on an older Python: lower requires-python"
