"""The study file: its schema, the parameter table, loading and checking, the search space
(``trial.suggest_*`` calls, the grid, the baseline) and the rule that picks a study's best trial.

Imports nothing of mnist_opt but ``errors``, and neither TensorFlow, Keras nor MLflow, so
``mnist-opt list`` and ``mnist-opt check`` answer at once.
"""
