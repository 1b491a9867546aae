"""Reporting: a study's top trials, Optuna's plots, and the README results table.

May import ``training``, ``tracking``, ``study`` and ``data``; never ``search`` or ``cli``.
"""
