"""On-device image augmentation: pure JAX functions of (images, key), traceable under `jit`.

Each function draws every example's randomness from the one `key` it is given, so a batch's
augmentation is a function of that key alone: the classification task derives it from
(seed, step), and a resumed run replays exactly the same crops and flips.

    x = random_flip(random_crop(images, crop_key, padding=4), flip_key)

Images are [B, H, W, C] (any dtype; the task augments them after normalizing). `padding` is a
Python value: mark it static when jitting `random_crop` directly. RandAugment, which works on
uint8 pixels, is `paperzoo.data.randaugment`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check_batch(images: jax.Array, name: str) -> None:
  if images.ndim != 4:
    raise ValueError(f"{name} expects images [B, H, W, C], got shape {images.shape}")


def random_crop(images: jax.Array, key: jax.Array, *, padding: int = 4) -> jax.Array:
  """Pads each image with `padding` zeros on every side and crops a random H x W window.

  Each example's window offset (dy, dx) is uniform on {0, ..., 2 * padding}^2, i.e. the image is
  translated by up to `padding` pixels each way, the uncovered border filled with zeros (the
  channel mean, when applied after `normalize`).
  """
  _check_batch(images, "random_crop")
  if padding < 0:
    raise ValueError(f"padding={padding} must be >= 0")
  if padding == 0:
    return images
  batch, height, width, channels = images.shape
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  offsets = jax.random.randint(key, (batch, 2), 0, 2 * padding + 1)

  def crop(image, offset):
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

  # vmap turns the per-example dynamic_slice into one gather over the batch.
  return jax.vmap(crop)(padded, offsets)


def random_flip(images: jax.Array, key: jax.Array) -> jax.Array:
  """Mirrors each image left-right (the W axis) with probability 1/2, independently."""
  _check_batch(images, "random_flip")
  flip = jax.random.bernoulli(key, 0.5, (images.shape[0],))
  return jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)


def mixup(images: jax.Array, labels_onehot: jax.Array, key: jax.Array, *, alpha: float
          ) -> tuple[jax.Array, jax.Array]:
  """mixup (Zhang et al., 2018): lam * (x, y) + (1 - lam) * (x, y)[perm].

  One lam ~ Beta(alpha, alpha) for the batch (as in the paper's reference code) and a random
  permutation of the batch as partners. `labels_onehot` are float [B, K] targets (possibly
  smoothed); images must be float. Returns the mixed images and targets.
  """
  if alpha <= 0:
    raise ValueError(f"alpha={alpha} must be > 0")
  lam_key, perm_key = jax.random.split(key)
  lam = jax.random.beta(lam_key, alpha, alpha).astype(images.dtype)
  perm = jax.random.permutation(perm_key, images.shape[0])
  mixed_images = lam * images + (1 - lam) * images[perm]
  lam_y = lam.astype(labels_onehot.dtype)
  mixed_labels = lam_y * labels_onehot + (1 - lam_y) * labels_onehot[perm]
  return mixed_images, mixed_labels
