"""One progress bar across a study's trials, wherever they run (this process or workers).

It reads the study's storage, not a local counter, so ``--workers N`` shows the same bar as
a single process: finished/target, the best value so far, and how many trials are running
or were pruned. Per-epoch lines stay behind ``--verbose``.
"""
from __future__ import annotations

import optuna
from tqdm import tqdm

from mnist_opt.study.objectives import is_multi, pick

State = optuna.trial.TrialState


class StudyProgress:
    def __init__(self, study: optuna.Study, total: int, enabled: bool, tolerance: float):
        self.study, self.total, self.tolerance = study, total, tolerance
        self.before = self._finished(study.get_trials(deepcopy=False))
        self.bar = tqdm(total=total, desc=study.study_name, unit="trial", disable=not enabled,
                        dynamic_ncols=True, leave=True)

    @staticmethod
    def _finished(trials) -> int:
        return sum(t.state in (State.COMPLETE, State.PRUNED) for t in trials)

    def refresh(self, *_: object) -> None:
        """Redraw from the storage; also usable as an Optuna ``callbacks=`` entry."""
        if self.bar.disable:
            return
        trials = self.study.get_trials(deepcopy=False)
        self.bar.n = min(self.total, self._finished(trials) - self.before)
        states = [t.state for t in trials]
        post = {"running": states.count(State.RUNNING), "pruned": states.count(State.PRUNED)}
        if State.COMPLETE in states:
            best, multi = pick(self.study, self.tolerance), is_multi(self.study)
            # two objectives: the trial the pick rule takes, not the most accurate one
            post = {"picked" if multi else "best": f"{best.values[0]:.4f} (#{best.number})",
                    **post}
            if multi:
                post["front"] = len(self.study.best_trials)
        self.bar.set_postfix(post, refresh=False)
        self.bar.refresh()

    def write(self, line: str) -> None:
        """A line above the bar (``print`` would tear it)."""
        self.bar.write(line) if not self.bar.disable else print(line, flush=True)

    def close(self) -> None:
        self.refresh()
        self.bar.close()
