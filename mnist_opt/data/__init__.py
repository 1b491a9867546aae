"""Data: MNIST and Fashion-MNIST IDX files (read, checksum, download) and stratified splits.

Owns everything about images and labels; imports nothing of mnist_opt but ``errors``.
The test split is returned apart from the train/validation split, so only retrain and
evaluation ever touch it.
"""
from mnist_opt.data.idx import (CLASS_NAMES, COPY_NOTES, FILES, KNOWN_SHA256, MIRRORS,
                                TRAIN_IMAGES, Dataset, cache_root, data_dir, download, load,
                                parse_idx, provenance, read_idx_gz, sha256, verify)
from mnist_opt.data.split import Split, fewer_training_images, split, stratified_subset, to_float

__all__ = ["CLASS_NAMES", "COPY_NOTES", "FILES", "KNOWN_SHA256", "MIRRORS", "TRAIN_IMAGES",
           "Dataset", "Split", "cache_root", "data_dir", "download", "fewer_training_images",
           "load", "parse_idx",
           "provenance", "read_idx_gz", "sha256", "split", "stratified_subset", "to_float",
           "verify"]
