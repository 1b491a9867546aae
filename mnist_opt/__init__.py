"""mnist_opt: Optuna + Keras + MLflow hyperparameter searches on MNIST and Fashion-MNIST."""
import os

# TensorFlow's C++ start-up chatter (oneDNN, CUDA probing) hides the progress people came for.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

__version__ = "0.1.0"
