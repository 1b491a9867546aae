"""``mnist-opt check``: the study-file validation alone, without TensorFlow or MLflow, so
users can run it in their own CI; and ``--schema``, the JSON Schema for editors."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mnist_opt.errors import StudyFileError
from mnist_opt.study.config import (VERSION, InvalidStudyFile, known_studies, load_config,
                                    studies_dir)
from mnist_opt.study.space import check_enqueue


def _targets(names: list[str]) -> list[Path]:
    """Study files by name (``studies/NAME.yaml``; ``NAME.v2`` is a version of that file) or
    path; every shipped one for none."""
    if not names:
        return [studies_dir() / f"{name}.yaml" for name in known_studies()]
    return [Path(n) if n.endswith((".yaml", ".yml")) or "/" in n else _named(n) for n in names]


def _named(name: str) -> Path:
    path, version = studies_dir() / f"{name}.yaml", VERSION.fullmatch(name)
    if not path.exists() and version:
        return studies_dir() / f"{version['base']}.yaml"
    return path


def _check(path: Path) -> dict:
    result = {"study": path.stem, "path": str(path), "ok": False, "problems": []}
    if not path.exists():
        known = ", ".join(known_studies()) or "(none)"
        result["problems"] = [{"path": "(file)", "message": f"no such study file; known studies "
                                                            f"in {studies_dir()}: {known}"}]
        return result
    try:
        check_enqueue(load_config(path))  # search.enqueue against the space, too
        result["ok"] = True
    except InvalidStudyFile as exc:
        result["problems"] = [{"path": p.path, "message": p.message} for p in exc.problems]
    except StudyFileError as exc:  # unreadable, not YAML, not a mapping
        result["problems"] = [{"path": "(file)", "message": str(exc).split(": ", 1)[-1]}]
    return result


def cmd_check(args: argparse.Namespace) -> int:
    """Validate study files against the schema and the parameter table, running nothing
    (all shipped studies when none is named); exit 2 if any is invalid."""
    if args.schema:
        from mnist_opt.study.docs import json_schema

        print(json.dumps(json_schema(), indent=2))
        return 0
    results = [_check(path) for path in _targets(args.files)]
    bad = [r for r in results if not r["ok"]]
    if args.format == "json":
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"{'ok' if r['ok'] else 'INVALID':8} {r['path']}")
            for problem in r["problems"]:
                print(f"         {problem['path']}: {problem['message']}")
        print(f"{len(results)} study file{'s' * (len(results) != 1)} checked, {len(bad)} invalid")
    return 2 if bad else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="*", metavar="FILE|NAME",
                        help="study files or names (default: every study in studies/)")
    parser.add_argument("-f", "--format", choices=["table", "json"], default="table")
    parser.add_argument("--schema", action="store_true",
                        help="print the study file's JSON Schema (for editors) and exit")
