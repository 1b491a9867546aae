"""Optuna's standard study plots, as HTML (plotly) and PNG (matplotlib), for MLflow and reports/.

PNG goes through Optuna's matplotlib backend, so no browser-based image exporter (kaleido) is
needed; the HTML files load plotly.js from a file next to them (``reports/``) or from its CDN
(MLflow artifacts, where the PNG is the offline copy).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import optuna.visualization as pv  # noqa: E402
import optuna.visualization.matplotlib as pm  # noqa: E402

PLOTS = ("optimization_history", "param_importances", "intermediate_values",
         "parallel_coordinate", "slice")


def _figure(result):
    """The matplotlib Figure behind what an Optuna matplotlib plot returns (Axes or an array)."""
    first = result.flat[0] if hasattr(result, "flat") else result
    return first.figure


def _kwargs(study: optuna.Study, name: str, target_names: list[str]) -> dict:
    """Two objectives: the pareto front uses both; the other plots show the first one."""
    if len(study.directions) == 1:
        return {}
    if name == "pareto_front":
        return {"target_names": target_names}
    return {"target": lambda t: t.values[0], "target_name": target_names[0]}


def write_plots(study: optuna.Study, folder: Path, plotly_js: str | bool = "directory",
                target_names: list[str] | None = None) -> dict[str, str]:
    """Write ``<plot>.html`` and ``<plot>.png`` for each of :data:`PLOTS` into ``folder``
    (and ``pareto_front`` for a two-objective study, whose other plots show the first one).

    Returns ``{plot: reason}`` for the plots that could not be drawn (e.g. parameter
    importances need two completed trials with at least one searched parameter).
    """
    folder.mkdir(parents=True, exist_ok=True)
    multi = len(study.directions) > 1
    names = target_names or [f"objective {i}" for i in range(len(study.directions))]
    plots = [*PLOTS, "pareto_front"] if multi else list(PLOTS)
    skipped: dict[str, str] = {}
    # The matplotlib backend is "experimental", and one-valued axes warn: neither helps a reader.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in plots:
            if multi and name == "intermediate_values":
                skipped[name] = "two-objective trials report no intermediate values"
                continue
            kwargs = _kwargs(study, name, names)
            try:
                getattr(pv, f"plot_{name}")(study, **kwargs).write_html(
                    folder / f"{name}.html", include_plotlyjs=plotly_js)
                fig = _figure(getattr(pm, f"plot_{name}")(study, **kwargs))
                fig.savefig(folder / f"{name}.png", dpi=100, bbox_inches="tight")
                plt.close(fig)
            except (ValueError, RuntimeError, ZeroDivisionError) as exc:
                skipped[name] = f"{type(exc).__name__}: {exc}"
                plt.close("all")
    return skipped
