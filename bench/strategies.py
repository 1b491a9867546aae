"""Which search strategy should the shipped studies use? ``mnist-opt compare`` on their spaces.

    python bench/strategies.py                 # run or continue every comparison, then render
    python bench/strategies.py --only mlp_tpe  # one of them (resumable: rerun to continue)
    python bench/strategies.py --render        # only the README section, from the summaries

Each comparison is one ``mnist-opt compare`` command (printed, and recorded in its summary)
writing to ``bench/results/compare/NAME/`` (committed: ``summary.md``/``.json``, curves, the
repeats' study files and logs). The target is fixed here, before any repeat runs, so no
part of a comparison run in several sittings chooses it after looking at the data. Stop it
at any time (Ctrl-C): the rerun keeps the finished repeats and redoes the interrupted one.
The README's section between the strategies markers is generated from the summaries.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "compare"
README_START, README_END = "<!-- strategies:start -->", "<!-- strategies:end -->"

# The targets are fixed before these runs, a little under what each study's own 30-trial search
# reached in 8.4 and 4.7 minutes (README results table: best val 0.9823 and 0.9017) and, for
# Fashion, what make bench's 20-trial searches reached (0.8927-0.8982), so that a 5-minute
# search can reach them and the time to reach them tells strategies apart.
COMPARISONS = {
    "mlp_tpe": {"strategies": ["tpe+hyperband", "gp+hyperband", "random+hyperband", "tpe+none",
                               "random+none", "qmc+median"],
                "repeats": 5, "budget_seconds": 300, "workers": 2, "target": 0.978},
    "fashion_mlp_tpe": {"strategies": ["tpe+hyperband", "gp+hyperband", "random+none"],
                        "repeats": 5, "budget_seconds": 300, "workers": 2, "target": 0.89},
    # subset search + promotion (the study as written) against searching every training image
    # (issue 14): the same space, sampler, pruner, seeds and search seconds; promotion runs
    # after the budget on the repeat's clock, and --retrain scores each side on the test set.
    # The target is mlp_tpe's comparison's, fixed before this run.
    "mlp_promote": {"strategies": ["tpe+hyperband", "tpe+hyperband:full-data"],
                    "repeats": 3, "budget_seconds": 180, "workers": 2, "target": 0.978,
                    "retrain": True,
                    "note": "tpe+hyperband is the study as written: trials train on a "
                            "stratified 15,000 of the 54,000 training images, then its top 3 "
                            "are re-trained on all 54,000 for 12 epochs after the 180 s, on "
                            "the repeat's clock; tpe+hyperband:full-data trains every trial "
                            "on all 54,000 and promotes nothing. Both validate on the same "
                            "6,000 images."},
}
# What the comparison's TPE is: Optuna's TPESampler as the study builds it
TPE_NOTE = ("TPE is Optuna's `TPESampler` with its defaults (`multivariate=False`, "
            "`group=False`; `n_startup_trials` from the study file): every parameter, the "
            "per-layer ones included, is sampled from its own independent density, not "
            "grouped by the depth that makes it exist.")


def command(name: str, strategies: list[str] | None = None) -> list[str]:
    """The ``mnist-opt compare`` command of one comparison (or of some of its strategies: a
    part, whose report covers those)."""
    c = COMPARISONS[name]
    return ["mnist-opt", "compare", name, "--strategies", *(strategies or c["strategies"]),
            "--repeats", str(c["repeats"]), "--budget-seconds", str(c["budget_seconds"]),
            "--workers", str(c["workers"]), "--target", str(c["target"]),
            *(["--retrain"] if c.get("retrain") else []),
            "--out", str((RESULTS / name).relative_to(ROOT))]


def run(name: str, strategies: list[str] | None = None) -> int:
    argv = command(name, strategies)
    print("$", " ".join(argv), flush=True)
    return subprocess.run([sys.executable, "-m", "mnist_opt", *argv[1:]], cwd=ROOT).returncode


def reading(s: dict, alpha: float = 0.05) -> str:
    """What one comparison's numbers say, in words generated from them: the leaders, how many
    pairwise tests were significant (the summary's ``pairs``: each pair's p-values), and what
    that count means with this many pairs."""
    def ttt(row: dict) -> float:
        return math.inf if row["time_to_target_median"] is None else row["time_to_target_median"]

    rows, repeats = s["rows"], s["repeats"]
    pairs = len(rows) * (len(rows) - 1) // 2
    fastest, best = min(rows, key=ttt), max(rows, key=lambda r: r["final_best_median"] or 0)
    p_values = {q: [p[q] for p in s["pairs"] if p[q] is not None] for q in ("p_time", "p_final")}
    time_wins, final_wins = (sum(p < alpha for p in p_values[q]) for q in ("p_time", "p_final"))
    bonferroni, floor = alpha / max(pairs, 1), 2 / math.comb(2 * repeats, repeats)
    survive = sum(p < bonferroni for ps in p_values.values() for p in ps)
    lowest = "not reached" if math.isinf(ttt(fastest)) else f"{ttt(fastest):.1f} s"
    return (f"What the data says: the lowest median time to target is {fastest['strategy']}'s "
            f"({lowest}), the highest median final best {best['strategy']}'s "
            f"({best['final_best_median']:.4f}). Of the {pairs} pairs, {time_wins} differ "
            f"significantly in time to target and {final_wins} in final best at α = {alpha:g}, "
            f"each test on its own; if no strategy differed, about {alpha * pairs:.2g} of each "
            f"would by chance. Corrected for {pairs} tests (Bonferroni, p < {bonferroni:.2g}), "
            f"{survive} {'survives' if survive == 1 else 'survive'}" +
            (f": with {repeats} repeats a side no p can go below {floor:.2g}, so naming a "
             f"winner needs more repeats." if floor >= bonferroni else "."))


def section(summaries: list[dict]) -> str:
    """The README's strategies section: per comparison, its setup, table and verdict."""
    from mnist_opt.reporting.time_to_target import markdown_table

    parts = []
    for s in summaries:
        budget = s["budget"]
        spent = (f"{budget['seconds']} s" if budget.get("seconds") else
                 f"{budget['epochs']} epochs" if budget.get("epochs") else
                 f"{budget.get('trials')} trials")
        planned = len(COMPARISONS.get(s["study"], {}).get("strategies", s["rows"]))
        part = (f" (a part: {len(s['rows'])} of the {planned} planned; the others not run yet)"
                if len(s["rows"]) < planned else "")
        parts += [f"**{s['study']}**: {len(s['rows'])} strategies{part} × {s['repeats']} repeats, "
                  f"{spent} of search each, {s['workers']} worker processes per repeat, target "
                  f"validation accuracy {s['target']:.4f} ("
                  f"{'fixed before the run' if s['target_source'] == '--target' else s['target_source']}); "
                  f"ran {s.get('ran', s['date'])}, {s['machine']}; data: "
                  f"{s.get('data', 'not recorded')}; `{s['command']}`; details in "
                  f"[`{s['folder']}/summary.md`]({s['folder']}/summary.md).", "",
                  *([COMPARISONS[s["study"]]["note"], ""]
                    if "note" in COMPARISONS.get(s["study"], {}) else []),
                  markdown_table(s["rows"]).rstrip("\n"), "",
                  *[f"- {line}" for line in s["verdict"]], "", reading(s), ""]
    return "\n".join(["", TPE_NOTE, "", *parts])


def render() -> int:
    from mnist_opt.errors import MnistOptError
    from mnist_opt.textblocks import replace_between

    summaries = []
    for name in COMPARISONS:
        path = RESULTS / name / "summary.json"
        if path.exists():
            summary = json.loads(path.read_text())
            summary["folder"] = str(path.parent.relative_to(ROOT))
            summaries.append(summary)
        else:
            print(f"{path}: not run yet (python bench/strategies.py --only {name})")
    if not summaries:
        return 0
    try:
        replace_between(ROOT / "README.md", README_START, README_END, section(summaries))
    except MnistOptError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"updated README.md from {len(summaries)} comparison(s)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(COMPARISONS))
    parser.add_argument("--strategies", nargs="+", metavar="STRATEGY",
                        help="run a part: only these of the comparison's strategies (with one "
                             "--only NAME); the report and README then cover the part")
    parser.add_argument("--render", action="store_true", help="only rewrite the README section")
    args = parser.parse_args()
    if args.strategies:
        if not args.only or len(args.only) != 1:
            parser.error("--strategies needs one --only NAME")
        unknown = set(args.strategies) - set(COMPARISONS[args.only[0]]["strategies"])
        if unknown:
            parser.error(f"{', '.join(sorted(unknown))}: not among {args.only[0]}'s strategies "
                         f"{', '.join(COMPARISONS[args.only[0]]['strategies'])}")
    if not args.render:
        for name in args.only or COMPARISONS:
            code = run(name, args.strategies)
            if code != 0:
                return code
    return render()


if __name__ == "__main__":
    sys.exit(main())
