"""Stratified train/validation splits and subsets; the test set is never part of a split."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import train_test_split

from mnist_opt.data.idx import Dataset, load


@dataclass(frozen=True)
class Split:
    """Stratified train/validation arrays, scaled to float32 in [0, 1] with a channel axis."""
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


def to_float(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.float32) / 255.0)[..., None]


def stratified_subset(x: np.ndarray, y: np.ndarray, size: int | None, seed: int):
    """A stratified subset of ``size`` images, each class in its share of the whole (all of
    them when size is None or too large)."""
    if size is None or size >= len(y):
        return x, y
    x_sub, _, y_sub, _ = train_test_split(x, y, train_size=size, stratify=y, random_state=seed)
    return x_sub, y_sub


def fewer_training_images(whole: Split, size: int | None, seed: int) -> Split:
    """``whole`` with a stratified ``size`` of its training images (all when None or too
    large) and all of its validation images."""
    x, y = stratified_subset(whole.x_train, whole.y_train, size, seed)
    return Split(x, y, whole.x_val, whole.y_val)


def split(ds: Dataset, val_fraction: float, seed: int, train_subset: int | None = None) -> Split:
    """Stratified train/validation split of the official training set; the test set stays out.

    ``train_subset`` first draws a stratified subset of the training set, so both parts shrink.
    """
    x, y = stratified_subset(ds.x_train, ds.y_train, train_subset, seed)
    x_tr, x_val, y_tr, y_val = train_test_split(
        x, y, test_size=val_fraction, stratify=y, random_state=seed)
    return Split(to_float(x_tr), y_tr.astype(np.int64), to_float(x_val), y_val.astype(np.int64))
