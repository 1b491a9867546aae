"""The package's layers (setup.cfg's [importlinter] contracts) hold, the check would catch an
import that breaks them, and the read-only commands stay light (no TensorFlow, Keras, MLflow)."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("tensorflow", "keras", "mlflow")
# `lint-imports` as the console script runs it, with this interpreter (the venv's import-linter)
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
        "sys.exit(lint_imports_command())", "--no-cache", "--no-logo"]


def _lint(root: Path) -> subprocess.CompletedProcess:
    """lint-imports on the package and setup.cfg in ``root``: grimp imports the root package
    from the working directory first, and PYTHONPATH names only ``root`` as well."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(LINT, cwd=root, env=env, capture_output=True, text=True, timeout=300)


def _contracts() -> list[str]:
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return [cfg[s]["name"] for s in cfg.sections() if s.startswith("importlinter:contract:")]


def test_every_import_contract_is_kept():
    proc = _lint(ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    names = _contracts()
    assert len(names) >= 4  # layers, acyclic, light, leaves
    for name in names:
        assert f"{name} KEPT" in out, out
    assert f"Contracts: {len(names)} kept, 0 broken." in out, out


def test_an_import_inside_a_function_that_breaks_the_layers_is_caught(tmp_path):
    """A copy of the package with ``study`` importing ``cli`` lazily, inside a function."""
    shutil.copytree(ROOT / "mnist_opt", tmp_path / "mnist_opt",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "setup.cfg", tmp_path / "setup.cfg")
    space = tmp_path / "mnist_opt" / "study" / "space.py"
    planted = "    from mnist_opt.cli import main"
    space.write_text(space.read_text() + f"\n\ndef _planted():\n{planted}\n    return main\n")
    line = space.read_text().splitlines().index(planted) + 1  # a line the original lacks
    assert line > len((ROOT / "mnist_opt" / "study" / "space.py").read_text().splitlines())

    proc = _lint(tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    layers = next(n for n in _contracts() if n.startswith("layers:"))
    assert f"{layers} BROKEN" in out, out
    assert "mnist_opt.study is not allowed to import mnist_opt.cli" in out, out
    # the copy was analysed, not the package on sys.path: the report names the planted line
    assert f"mnist_opt.study.space -> mnist_opt.cli.main (l.{line})" in out, out


def test_a_cycle_through_an_import_inside_a_function_is_caught(tmp_path):
    """A copy in which the worker module imports the runner lazily, as it once did: the
    runner imports the workers, so the two form a cycle."""
    shutil.copytree(ROOT / "mnist_opt", tmp_path / "mnist_opt",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "setup.cfg", tmp_path / "setup.cfg")
    workers = tmp_path / "mnist_opt" / "search" / "workers.py"
    workers.write_text(workers.read_text() + "\n\ndef _planted():\n"
                       "    from mnist_opt.search.runner import run_study\n    return run_study\n")
    proc = _lint(tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    acyclic = next(n for n in _contracts() if "cycles" in n)
    assert f"{acyclic} BROKEN" in out, out
    # import-linter names the siblings relative to their package: .workers -> .runner
    assert ".workers -> .runner" in out, out


def _commands() -> set[str]:
    from mnist_opt.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


# Runs `python -m mnist_opt ARGV` (main() to its end, SystemExit included), then prints the
# heavy top-level packages in sys.modules as the last line of stdout.
PROBE = """\
import json, runpy, sys
argv, heavy = json.loads(sys.argv[1]), set(json.loads(sys.argv[2]))
sys.argv = ["mnist-opt", *argv]
code = 0
try:
    runpy.run_module("mnist_opt", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
print(json.dumps({"exit": code, "heavy": sorted(m for m in sys.modules if m.split(".")[0] in heavy)}))
"""


@pytest.mark.parametrize("argv", [["--help"], ["list"], ["list", "--format", "json"], ["check"]],
                         ids=" ".join)
def test_read_only_commands_import_neither_tensorflow_keras_nor_mlflow(argv, tmp_path):
    if argv[0] not in _commands() and not argv[0].startswith("-"):
        pytest.skip(f"no `mnist-opt {argv[0]}` command yet")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MNIST_OPT_STUDIES": str(ROOT / "studies")}
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv), json.dumps(HEAVY)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *output, last = proc.stdout.splitlines()
    report = json.loads(last)
    assert report["exit"] in (0, None), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report["heavy"] == [], f"mnist-opt {' '.join(argv)} imported {report['heavy']}"
    # and the command really ran (an early exit would import nothing too)
    text = "\n".join(output)
    if argv == ["--help"]:
        assert "usage: mnist-opt" in text and "study" in text
    elif argv[0] == "list":
        assert "mlp_tpe" in text and "cnn_gp" in text
