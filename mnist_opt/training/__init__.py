"""Training: the pure model builders, the one training loop and the one Keras callback, and
what uses them — retrain + test-set evaluation, the learning-rate range test, prediction.

May import ``study``, ``data`` and ``tracking``; never ``search``, ``reporting`` or ``cli``.
"""
