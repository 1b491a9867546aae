"""Per-epoch metrics sent to MLflow without making training wait for the tracking server.

Light on purpose (MLflow only, no TensorFlow): the load bench's simulated workers use it too.
"""
from __future__ import annotations

import mlflow
from mlflow.utils.async_logging.run_operations import RunOperations


class BackgroundMetrics:
    """Metrics logged by MLflow's async-logging thread (``synchronous=False``): an epoch's
    end queues them and training goes on, instead of waiting for a round trip to the
    tracking server (20-60 ms each on the many-machine recipe's server, more under load:
    ``make bench-scale``). MLflow's own retries still apply in that thread.

    :meth:`wait` blocks until everything queued so far is logged and raises MLflow's error
    if any of it failed, so a trial never completes with its curves unsent or lost: the
    callback waits at the end of training and before a pruned trial stops.
    """

    def __init__(self, run_id: str | None = None):
        self.run_id = run_id  # None: the active run at each call
        self._pending: list[RunOperations] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        ops = mlflow.log_metrics(metrics, step=step, synchronous=False, run_id=self.run_id)
        if ops is not None:
            self._pending.append(ops)

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        for ops in pending:
            ops.wait()
