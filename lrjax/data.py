"""Input pipelines: CIFAR-10 through TFDS + ``tf.data``, and an offline digits dataset.

Batches are dicts of NumPy arrays: ``image`` ``(B, 32, 32, 3)`` float32 (per-channel mean/std
normalised), ``label`` ``(B,)`` int32 and, for evaluation, ``mask`` ``(B,)`` bool (False on the
padding of the last batch, so every example is evaluated exactly once).

Training streams are seeded and deterministic, and each process reads its own part of the split
(``tfds.split_for_jax_process``). TensorFlow is hidden from GPUs: JAX owns the accelerators.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
from collections.abc import Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

tf.config.set_visible_devices([], "GPU")

__all__ = ["DataError", "Dataset", "load_dataset", "DATASETS", "CIFAR10_MEAN", "CIFAR10_STD",
           "NORMALISATION"]

# Per-channel statistics of the CIFAR-10 training images (0..255 scale), as the authors normalised.
CIFAR10_MEAN = (125.307, 122.950, 113.865)
CIFAR10_STD = (62.993, 62.089, 66.705)

DATASETS = ("cifar10", "digits", "imagenet2012")

# Colour order and normalisation matching the pretrained weights in use (0..255 scale).
NORMALISATION = {
    "torchvision": {"bgr": False, "mean": (123.675, 116.28, 103.53),
                    "std": (58.395, 57.12, 57.375)},
    "caffe": {"bgr": True, "mean": (103.939, 116.779, 123.68), "std": (1.0, 1.0, 1.0)},
    "keras": {"bgr": True, "mean": (103.939, 116.779, 123.68), "std": (1.0, 1.0, 1.0)},
}


class DataError(RuntimeError):
    """A dataset that cannot be read (missing files, no network to download them)."""


@dataclasses.dataclass
class Dataset:
    """A dataset ready for training: its splits as ``tf.data`` pipelines plus what they hold."""

    name: str
    num_classes: int
    image_size: int
    num_train: int  # examples in this process's share of the training split
    num_test: int  # examples in this process's share of the test split
    train_source: tf.data.Dataset  # unbatched (image uint8/float 0..255, label)
    test_source: tf.data.Dataset
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    bgr: bool = False  # reverse RGB -> BGR before normalising (Caffe / Keras weights)
    eval_resize: int | None = None  # resize the short side to this, then centre-crop
    train_crop: str = "pad"  # "pad" (CIFAR: optional pad-4 crop+flip), "resize", "scale"
    # (process index, process count) when train_source holds the whole training split and each
    # process takes its rows of every global batch (in-memory data: the batches, and so the
    # run, are the same for any number of processes); None: train_source is this process's
    # share already (TFDS's split_for_jax_process)
    batch_shard: tuple[int, int] | None = None

    def train_batches(self, batch_size: int, *, seed: int, augment: bool = False,
                      start_batch: int = 0) -> Iterator[dict]:
        """Endless, shuffled, seeded training batches (``drop_remainder``), pass after pass.

        Pass ``p`` over the data is shuffled with ``seed + p``, so the stream depends only on
        ``seed``; ``start_batch`` resumes it at that many batches from the start, exactly where an
        uninterrupted run would be.
        """
        index, count = self.batch_shard or (0, 1)
        size = int(self.train_source.cardinality()) if self.batch_shard else self.num_train
        global_batch = batch_size * count if self.batch_shard else batch_size
        per_pass = size // global_batch
        if per_pass < 1:
            raise ValueError(f"batch size {batch_size} exceeds the {self.num_train} training "
                             "examples")
        data_pass, skip = divmod(start_batch, per_pass)
        while True:
            ds = self.train_source.shuffle(size, seed=seed + data_pass,
                                           reshuffle_each_iteration=False)
            ds = ds.skip(skip * global_batch)
            if self.batch_shard:  # this process's rows of each global batch, before any work
                ds = ds.enumerate().filter(
                    lambda i, _: (i % global_batch) // batch_size == index).map(lambda i, e: e)
            ds = ds.map(self._train_fn(augment, seed + data_pass), num_parallel_calls=1)
            ds = ds.batch(batch_size, drop_remainder=True).take(per_pass - skip).prefetch(2)
            ds = ds.with_options(_deterministic())
            yield from tfds.as_numpy(ds)
            data_pass, skip = data_pass + 1, 0

    def test_batches(self, batch_size: int) -> Iterator[dict]:
        """Every test example once, in order; the last batch padded and masked."""
        ds = self.test_source.map(self._eval_fn(), num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(batch_size).prefetch(2).with_options(_deterministic())
        for batch in tfds.as_numpy(ds):
            n = batch["label"].shape[0]
            mask = np.ones((batch_size,), bool)
            if n < batch_size:
                pad = batch_size - n
                batch = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])
                         for k, v in batch.items()}
                mask[n:] = False
            batch["mask"] = mask
            yield batch

    def as_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """A whole split as ``(images (N, H, W, 3) float32, labels (N,) int32)`` with the
        evaluation preprocessing, in order (for small datasets: digits, tests)."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
        fn = self._eval_fn()
        source = (self.train_source.map(lambda index, example: fn(*example))
                  if split == "train" else self.test_source.map(fn))
        images, labels = [], []
        for batch in tfds.as_numpy(source.batch(1024).with_options(_deterministic())):
            images.append(batch["image"])
            labels.append(batch["label"])
        return np.concatenate(images), np.concatenate(labels)

    def _normalise(self, image):
        image = tf.cast(image, tf.float32)
        if self.bgr:
            image = image[..., ::-1]
        return (image - tf.constant(self.mean)) / tf.constant(self.std)

    def _eval_fn(self):
        def fn(image, label):
            if self.eval_resize is not None:
                image = _resize_short_side(image, self.eval_resize)
                image = _center_crop(image, self.image_size)
            return {"image": self._normalise(image), "label": tf.cast(label, tf.int32)}
        return fn

    def _train_fn(self, augment: bool, seed: int):
        size = self.image_size

        def fn(index, example):  # index: position in the split (seeds the augmentation)
            image, label = example
            key = tf.stack([tf.cast(seed, tf.int64), index])
            k1, k2 = tf.unstack(tf.random.experimental.stateless_split(key, 2))
            if self.train_crop == "scale":  # scale augmentation: random area and aspect ratio
                image = _random_resized_crop(image, size, k1)
                image = tf.image.stateless_random_flip_left_right(image, seed=k2)
                return {"image": self._normalise(image), "label": tf.cast(label, tf.int32)}
            if self.train_crop == "resize":  # the authors' solver: short side, random crop, flip
                image = _resize_short_side(image, self.eval_resize)
                image = tf.image.stateless_random_crop(image, (size, size, 3), seed=k1)
                image = tf.image.stateless_random_flip_left_right(image, seed=k2)
                return {"image": self._normalise(image), "label": tf.cast(label, tf.int32)}
            image = self._normalise(image)
            if augment:
                padded = tf.pad(image, [[4, 4], [4, 4], [0, 0]])
                image = tf.image.stateless_random_crop(padded, (size, size, 3), seed=k1)
                image = tf.image.stateless_random_flip_left_right(image, seed=k2)
            return {"image": image, "label": tf.cast(label, tf.int32)}

        return fn


def _resize_short_side(image, short: int):
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    scale = tf.cast(short, tf.float32) / tf.minimum(h, w)
    new = tf.cast(tf.round(tf.stack([h * scale, w * scale])), tf.int32)
    new = tf.maximum(new, short)
    return tf.image.resize(tf.cast(image, tf.float32), new, method="bilinear", antialias=True)


def _center_crop(image, size: int):
    shape = tf.shape(image)
    top, left = (shape[0] - size) // 2, (shape[1] - size) // 2
    return image[top:top + size, left:left + size, :]


def _random_resized_crop(image, size, seed):
    begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), tf.zeros((0, 0, 4)), seed=seed, min_object_covered=0.08,
        aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    image = tf.slice(image, begin, crop)
    return tf.image.resize(tf.cast(image, tf.float32), (size, size), method="bilinear",
                           antialias=True)


def _deterministic() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    options.threading.private_threadpool_size = 2
    return options


def _count(ds: tf.data.Dataset) -> int:
    n = int(ds.cardinality())
    if n >= 0:
        return n
    return int(ds.reduce(np.int64(0), lambda x, _: x + 1))


# where a TFDS download goes first (its GCS mirror) and CIFAR-10's own host: reachable in
# seconds or not at all (no retry storm before the error)
DOWNLOAD_HOSTS = (("storage.googleapis.com", 443), ("www.cs.toronto.edu", 443))


def network_reachable(hosts=DOWNLOAD_HOSTS, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to any of ``hosts`` opens within ``timeout`` seconds each."""
    for host, port in hosts:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return True
        except OSError:
            continue
    return False


def _tfds_splits(name: str, data_dir: str | None, download: bool, how_to_get: str,
                 needs_network: bool = True):
    """This process's share of the train and test/validation splits of a TFDS dataset.

    A dataset that is not prepared is downloaded only when the network answers within seconds
    (``needs_network``); a failed download removes the folders it created."""
    root = data_dir or tfds.core.constants.DATA_DIR
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        if download and not builder.is_prepared():
            if needs_network and not network_reachable():
                raise OSError("not prepared there, and the network is unreachable (no "
                              "connection to " + ", ".join(h for h, _ in DOWNLOAD_HOSTS) + ")")
            created = [p for p in (os.path.join(root, name), os.path.join(root, "downloads"))
                       if not os.path.exists(p)]  # what a failed download must not leave
            try:
                builder.download_and_prepare()
            except BaseException:
                for path in created:
                    shutil.rmtree(path, ignore_errors=True)
                raise
        splits = {}
        for split in ("train", "validation" if name == "imagenet2012" else "test"):
            ds = builder.as_dataset(split=tfds.split_for_jax_process(split), shuffle_files=False,
                                    read_config=tfds.ReadConfig(shuffle_seed=0))
            splits[split] = ds.map(lambda ex: (ex["image"], ex["label"]))
    except Exception as e:  # TFDS raises assorted types for missing data / no network
        detail = str(e).splitlines()[0] if str(e) else ""
        raise DataError(
            f"{name} is not available in data_dir="
            f"{data_dir or tfds.core.constants.DATA_DIR!r} ({type(e).__name__}: {detail}). "
            f"{how_to_get}") from None
    return list(splits.values())


def _tfds_cifar10(data_dir: str | None, download: bool) -> Dataset:
    train, test = _tfds_splits(
        "cifar10", data_dir, download,
        "On a machine with network access run `python -c \"import tensorflow_datasets as tfds; "
        "tfds.builder('cifar10', data_dir=DIR).download_and_prepare()\"` and pass "
        "--config.data_dir=DIR here, or use --config.dataset=digits to run offline.")
    train, test = train.cache(), test.cache()
    return Dataset("cifar10", 10, 32, _count(train), _count(test),
                   train.enumerate(), test, CIFAR10_MEAN, CIFAR10_STD)


def _tfds_imagenet(data_dir: str | None, image_size: int, resize: int, normalisation: str,
                   scale_augment: bool) -> Dataset:
    if normalisation not in NORMALISATION:
        raise ValueError(f"unknown normalisation {normalisation!r}; choose from "
                         f"{sorted(NORMALISATION)}")
    manual = f"{data_dir or tfds.core.constants.DATA_DIR}/downloads/manual"
    train, val = _tfds_splits(
        "imagenet2012", data_dir, True,
        "ImageNet needs a manual download: get ILSVRC2012_img_train.tar and "
        f"ILSVRC2012_img_val.tar from image-net.org, put them in {manual}/ and run again (TFDS "
        "then prepares the dataset, once, in data_dir).", needs_network=False)
    norm = NORMALISATION[normalisation]
    return Dataset("imagenet2012", 1000, image_size, _count(train), _count(val),
                   train.enumerate(), val, norm["mean"], norm["std"], bgr=norm["bgr"],
                   eval_resize=resize, train_crop="scale" if scale_augment else "resize")


def _digits(test_fraction: float = 0.25) -> Dataset:
    """scikit-learn's bundled 8x8 digits, upsampled to 32x32x3, fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32) * (255.0 / 16.0)  # 0..255
    images = np.repeat(np.repeat(images, 4, axis=1), 4, axis=2)  # 32x32, nearest
    images = np.repeat(images[..., None], 3, axis=-1)
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=0)
    mean = tuple(float(m) for m in x_train.mean(axis=(0, 1, 2)))  # of the whole split
    std = tuple(float(s) + 1e-6 for s in x_train.std(axis=(0, 1, 2)))
    # every process holds the training split and takes its rows of each global batch; the test
    # split is sharded (evaluation sums over processes)
    pi, pc = jax.process_index(), jax.process_count()
    x_test, y_test = x_test[pi::pc], y_test[pi::pc]
    train = tf.data.Dataset.from_tensor_slices((x_train, y_train))
    test = tf.data.Dataset.from_tensor_slices((x_test, y_test))
    return Dataset("digits", 10, 32, len(y_train) // pc, len(y_test), train.enumerate(), test,
                   mean, std, batch_shard=(pi, pc) if pc > 1 else None)


def load_dataset(name: str, *, data_dir: str | None = None, download: bool = True,
                 image_size: int = 224, resize: int = 256, normalisation: str = "torchvision",
                 scale_augment: bool = False) -> Dataset:
    """Load ``"cifar10"`` (TFDS), ``"digits"`` (offline, scikit-learn) or ``"imagenet2012"``.

    ImageNet options: training crops ``image_size`` from images whose short side is resized to
    ``resize`` (or, with ``scale_augment``, a random-area crop), with a random flip; evaluation
    resizes the short side to ``resize`` and centre-crops ``image_size``. ``normalisation`` picks the
    colour order and statistics of the weights in use (``torchvision``, ``caffe``, ``keras``).

    Raises:
      ValueError: unknown dataset name or normalisation.
      DataError: the data is missing and cannot be fetched; the message says how to get it.
    """
    if name == "cifar10":
        return _tfds_cifar10(data_dir, download)
    if name == "digits":
        return _digits()
    if name == "imagenet2012":
        return _tfds_imagenet(data_dir, image_size, resize, normalisation, scale_augment)
    raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")
