"""Import TensorFlow without its start-up noise (absl, oneDNN, CUDA lines on a CPU machine).

``TF_CPP_MIN_LOG_LEVEL`` does not silence the lines TensorFlow 2.21 writes before absl's
logging starts, so the import (and the first device query, which prints the cuInit error)
runs with file descriptor 2 pointed at a temporary file. The captured text is shown when the
import fails, or always with ``MNIST_OPT_TF_LOGS=1``.
"""
from __future__ import annotations

import os
import sys
import tempfile


def import_tensorflow():
    """Import and return ``tensorflow``, quietly unless ``MNIST_OPT_TF_LOGS=1``."""
    if "tensorflow" in sys.modules or os.environ.get("MNIST_OPT_TF_LOGS") == "1":
        import tensorflow as tf

        return tf
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()  # prints the cuInit line on machines without CUDA
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    tf.get_logger().setLevel("ERROR")  # retracing notices and the like
    return tf
