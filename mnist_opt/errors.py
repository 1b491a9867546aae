"""Errors a user can fix; the CLI prints their message alone and exits with status 2.

:class:`StudyFailedError` is not one of them: the input was valid, the search failed (1).
"""


class MnistOptError(Exception):
    """Bad input: ``str()`` says what is wrong and how to fix it."""


class StudyFileError(MnistOptError, ValueError):
    """A study file that is missing or invalid (file, field, allowed values)."""


class DataError(MnistOptError):
    """Missing, truncated or corrupt dataset files (the path and the checksum)."""


class RetrainError(MnistOptError):
    """No study, or no completed trial, to retrain or report on."""


class StorageError(MnistOptError):
    """An Optuna storage URL that is malformed or cannot be reached."""


class TrackingError(MnistOptError):
    """The MLflow tracking store cannot be opened or written."""


class PredictError(MnistOptError):
    """An image that cannot be read or holds no digit, or a model URI that cannot be loaded."""


class ServeError(MnistOptError):
    """No registered model (or no such version or alias of it) to serve, or no tracking store
    that holds one."""


class StudyFailedError(Exception):
    """The study stopped because its trials keep failing, or ended without success (a trial
    left RUNNING by a dead process): the CLI prints the summary and the last failure, exit 1.

    ``trial`` is the last failed trial (an Optuna ``FrozenTrial``), when there is one.
    """

    def __init__(self, message: str, trial: object | None = None) -> None:
        super().__init__(message)
        self.trial = trial
