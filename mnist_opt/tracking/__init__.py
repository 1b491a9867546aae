"""Where results live: the Optuna storage (URLs, heartbeats, locks) and MLflow (experiments,
parent and nested runs, logged and registered models).

May import ``study`` and ``data``; never ``training``, ``search``, ``reporting`` or ``cli``.
``storage`` does not import MLflow, so reading a study stays light.
"""
