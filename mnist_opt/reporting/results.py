"""The results table (README): each study's search and its retrained test accuracy, from MLflow.

Nothing here is typed by hand: the figures are read back from the runs that ``mnist-opt
study`` and ``mnist-opt retrain --seeds K`` logged, and the published reference from the
study file.
"""
from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from mnist_opt.tracking import runs as tracking
from mnist_opt.study.config import StudyConfig, find_study, known_studies
from mnist_opt.textblocks import replace_between

START, END = "<!-- results:start -->", "<!-- results:end -->"


def _runs(client: MlflowClient, experiment_id: str, kind: str) -> list:
    return client.search_runs([experiment_id], f"tags.`mnist_opt.kind` = '{kind}'",
                              order_by=["attributes.start_time DESC"])


def study_row(client: MlflowClient, cfg: StudyConfig) -> dict | None:
    """The latest finished retrain of ``cfg`` and the search it came from; None if never retrained."""
    exp = client.get_experiment_by_name(cfg.name)
    if exp is None:
        return None
    retrains = [r for r in _runs(client, exp.experiment_id, "retrain")
                if r.info.status == "FINISHED" and "test_accuracy" in r.data.metrics]
    if not retrains:
        return None
    best = retrains[0]
    studies = [r for r in _runs(client, exp.experiment_id, "study") if "n_complete" in r.data.metrics]
    latest = studies[0] if studies else None
    metrics = latest.data.metrics if latest else {}
    # search time of this version of the study file only (a changed file is a new search)
    digest = latest.data.tags.get("mnist_opt.config_digest") if latest else None
    studies = [r for r in studies if r.data.tags.get("mnist_opt.config_digest") == digest]
    # search.promote re-trains after the study run closed, in a run of its own: its time is
    # part of the search (a subset search is cheap only before it)
    since = min((r.info.start_time for r in studies), default=0)
    promote_s = sum((r.info.end_time - r.info.start_time) / 1000
                    for r in _runs(client, exp.experiment_id, "promote")
                    if r.info.status == "FINISHED" and r.info.end_time and
                    r.info.start_time >= since)
    return {
        "study": cfg.name, "dataset": cfg.dataset, "model": cfg.model,
        "sampler": cfg.search.sampler, "pruner": cfg.search.pruner,
        "complete": int(metrics.get("n_complete", 0)), "pruned": int(metrics.get("n_pruned", 0)),
        "search_s": sum(r.data.metrics.get("wall_s", 0.0) for r in studies) + promote_s,
        "promote_s": promote_s,
        "retrain_s": (best.info.end_time - best.info.start_time) / 1000,
        "epochs": float(best.data.params.get("epochs", 0)),  # 2.5: a fractional max_epochs
        "seeds": int(best.data.params.get("seeds", 1)),
        "val": best.data.metrics.get("best_val_accuracy", float("nan")),
        "test": best.data.metrics["test_accuracy"],
        "std": best.data.metrics.get("test_accuracy_std", 0.0),
        "baseline": best.data.metrics.get("baseline_test_accuracy"),
        "reference": cfg.reference.test_accuracy if cfg.reference else None,
        "source": cfg.reference.source if cfg.reference else "",
    }


def collect(names: list[str] | None = None) -> list[dict]:
    tracking.configure()
    client = MlflowClient()
    rows = [study_row(client, find_study(name)) for name in names or known_studies()]
    return [row for row in rows if row]


HEAD = ("| study | data / model | sampler + pruner | trials (complete/pruned) | search | "
        "retrain | best val | baseline (1 seed) | **test** (mean ± std) | published | beaten |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n")


def _line(r: dict) -> str:
    ref = f"{r['reference']:.1%} ({r['source']})" if r["reference"] else "—"
    test = (f"**{r['test']:.2%} ± {r['std']:.2%}**" if r["seeds"] > 1
            else f"**{r['test']:.2%}** (1 seed)")
    beaten = "—" if r["reference"] is None else ("yes" if r["test"] >= r["reference"] else "no")
    return (f"| {r['study']} | {r['dataset']} {r['model']} | {r['sampler']} + {r['pruner']} | "
            f"{r['complete'] + r['pruned']} ({r['complete']}/{r['pruned']}) | "
            f"{r['search_s'] / 60:.1f} min"
            + (f" (promotion {r['promote_s'] / 60:.1f})" if r.get("promote_s") else "")
            + f" | {r['seeds']}× {r['epochs']:g} ep, "
            f"{r['retrain_s'] / 60:.1f} min | {r['val']:.4f} | "
            f"{'—' if r['baseline'] is None else format(r['baseline'], '.2%')} | "
            f"{test} | {ref} | {beaten} |")


def markdown(rows: list[dict], kept: dict[str, str] | None = None,
             order: list[str] | None = None) -> str:
    """The table: a line per row, and the ``kept`` lines (study → its line as the README had
    it), in ``order`` of study names (rows first-come otherwise)."""
    lines = {r["study"]: _line(r) for r in rows}
    lines.update({name: line for name, line in (kept or {}).items() if name not in lines})
    names = [n for n in (order or []) if n in lines] + [n for n in lines if n not in (order or [])]
    return HEAD + "\n".join(lines[n] for n in names) + "\n"


def kept_lines(path: Path, fresh: set[str], known: list[str]) -> dict[str, str]:
    """The lines ``path``'s table has for known studies that this MLflow store has no retrain
    of: a store without the runs behind a line (another machine's, a cleaned ``mlruns/``)
    keeps it as the command wrote it then, rather than dropping it."""
    text = path.read_text()
    if START not in text or END not in text:
        return {}
    block = text.split(START, 1)[1].split(END, 1)[0]
    out = {}
    for line in block.splitlines():
        name = line.strip().strip("|").split("|")[0].strip() if line.startswith("|") else ""
        if name in known and name not in fresh:
            out[name] = line
    return out


def update_file(path: Path, table: str) -> None:
    """Replace the text between the results markers in ``path`` (the README) with ``table``."""
    replace_between(path, START, END, table)
