"""The ``mnist-opt`` command line, on top of everything; nothing imports it.

Commands that only read (``--help``, ``list``, ``check``) import neither TensorFlow, Keras
nor MLflow: the heavy layers are imported inside the commands that need them.
"""
from mnist_opt.cli.main import main

__all__ = ["main"]
