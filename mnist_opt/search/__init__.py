"""The search: sampler and pruner factories, the objective, the runner that brings a study to
its target, parallel worker processes and the progress bar.

May import every layer below it (``reporting``, ``training``, ``tracking``, ``study``,
``data``); only ``cli`` imports it.
"""
