"""RandAugment (Cubuk et al., 2020) on the device, traceable under `jit`.

Each image gets `num_ops` operations, each drawn uniformly from the 14 of `OPS` and applied at
the one shared `magnitude`; signed operations (shears, translations, rotation, the four
enhancements) take either sign with probability 1/2. The magnitude is a bin of 0..30, and each
operation's strength at bin m is the one of torchvision's `RandAugment` (31 bins, the default
magnitude 9): shear m / 30 * 0.3, translation int(m / 30 * 150 / 331 * size) pixels, rotation
m degrees, enhancement factor 1 +- m / 30 * 0.9, posterize to 8 - round(m / 7.5) bits, solarize
at or above 255 (1 - m / 30).

The photometric operations are Pillow's `ImageOps` / `ImageEnhance` (the library the paper's
operations come from), to within one grey level (tests/test_randaugment.py checks them against
Pillow): enhancements blend with a degenerate image (black, the luma image, the mean luma, the
3x3 smoothed image) and truncate; `autocontrast` stretches each channel's [min, max] to
[0, 255]; `equalize` is Pillow's histogram equalization. Geometric operations map each output
pixel's centre back through the inverse transform and take the nearest source pixel, filling
with 0 where it falls outside (torchvision's default). Images are uint8 [B, H, W, C] with C 3
(RGB) or 1; they are augmented before normalization, as integer pixels.

    images = rand_augment(images, key, num_ops=2, magnitude=9)
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness",
       "color", "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize")
MAX_MAGNITUDE = 30  # torchvision's 31 magnitude bins


# ---------------------------------------------------------------------------------------------
# Photometric operations on one float32 image [H, W, C] holding integers in 0..255.
# ---------------------------------------------------------------------------------------------
def _blend(degenerate: jax.Array, image: jax.Array, factor: jax.Array) -> jax.Array:
  """Pillow's Image.blend on 8-bit images: degenerate + factor (image - degenerate), clipped
  to [0, 255] and truncated."""
  return jnp.floor(jnp.clip(degenerate + factor * (image - degenerate), 0.0, 255.0))


def _luma(image: jax.Array) -> jax.Array:
  """Pillow's RGB -> L conversion (ITU-R 601-2 in 16-bit fixed point, rounded), [H, W, 1]."""
  if image.shape[-1] == 1:
    return image
  r, g, b = (image[..., i].astype(jnp.int32) for i in range(3))
  return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(jnp.float32)[..., None]


def brightness(image: jax.Array, factor: jax.Array) -> jax.Array:
  return _blend(jnp.zeros_like(image), image, factor)


def color(image: jax.Array, factor: jax.Array) -> jax.Array:
  return _blend(jnp.broadcast_to(_luma(image), image.shape), image, factor)


def contrast(image: jax.Array, factor: jax.Array) -> jax.Array:
  mean = jnp.floor(jnp.mean(_luma(image)) + 0.5)
  return _blend(jnp.full_like(image, mean), image, factor)


def sharpness(image: jax.Array, factor: jax.Array) -> jax.Array:
  """Blends with Pillow's SMOOTH filter (3x3 kernel 1 1 1 / 1 5 1 / 1 1 1, sum 13, rounded),
  which leaves the border pixels as they are."""
  padded = jnp.pad(image, ((1, 1), (1, 1), (0, 0)))
  height, width = image.shape[:2]
  window_sum = sum(padded[dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3))
  smooth = jnp.floor((window_sum + 4.0 * image) / 13.0 + 0.5)
  interior = jnp.zeros((height, width, 1), bool).at[1:-1, 1:-1].set(True)
  return _blend(jnp.where(interior, smooth, image), image, factor)


def posterize(image: jax.Array, bits: int) -> jax.Array:
  mask = (0xFF << (8 - bits)) & 0xFF
  return (image.astype(jnp.int32) & mask).astype(jnp.float32)


def solarize(image: jax.Array, threshold: float) -> jax.Array:
  return jnp.where(image >= threshold, 255.0 - image, image)


def autocontrast(image: jax.Array) -> jax.Array:
  """Pillow's ImageOps.autocontrast (no cutoff): each channel's [lo, hi] -> [0, 255],
  truncated; a constant channel stays as it is."""
  lo = jnp.min(image, axis=(0, 1), keepdims=True)
  hi = jnp.max(image, axis=(0, 1), keepdims=True)
  scale = 255.0 / jnp.maximum(hi - lo, 1.0)
  stretched = jnp.clip(jnp.floor((image - lo) * scale), 0.0, 255.0)
  return jnp.where(hi > lo, stretched, image)


def equalize(image: jax.Array) -> jax.Array:
  """Pillow's ImageOps.equalize, per channel: with `step` = (pixels - the count of the
  brightest level present) // 255, level i maps to (step // 2 + pixels below i) // step (at
  most 255); a channel with one level, or step 0, stays as it is."""
  levels = image.astype(jnp.int32)

  def channel(values: jax.Array) -> jax.Array:
    counts = jnp.bincount(values.reshape(-1), length=256)
    brightest = 255 - jnp.argmax(counts[::-1] > 0)
    step = (values.size - counts[brightest]) // 255
    below = jnp.cumsum(counts) - counts
    lut = jnp.minimum((step // 2 + below) // jnp.maximum(step, 1), 255)
    return jnp.where(step > 0, lut[values], values)

  return jax.vmap(channel, in_axes=-1, out_axes=-1)(levels).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# Geometric operations: inverse mapping of pixel centres, nearest neighbour, fill 0.
# ---------------------------------------------------------------------------------------------
def _resample(image: jax.Array, source_of: Callable) -> jax.Array:
  """out[i, j] = image[floor(y), floor(x)] for (x, y) = source_of(j + 0.5, i + 0.5), or 0."""
  height, width = image.shape[:2]
  ys, xs = jnp.meshgrid(jnp.arange(height) + 0.5, jnp.arange(width) + 0.5, indexing="ij")
  src_x, src_y = source_of(xs, ys)
  col, row = jnp.floor(src_x).astype(jnp.int32), jnp.floor(src_y).astype(jnp.int32)
  inside = (col >= 0) & (col < width) & (row >= 0) & (row < height)
  picked = image[jnp.clip(row, 0, height - 1), jnp.clip(col, 0, width - 1)]
  return jnp.where(inside[..., None], picked, 0.0)


def shear_x(image: jax.Array, shear: jax.Array) -> jax.Array:
  """x' = x + shear * y about the top-left corner (torchvision's centre [0, 0])."""
  return _resample(image, lambda x, y: (x - shear * y, y))


def shear_y(image: jax.Array, shear: jax.Array) -> jax.Array:
  return _resample(image, lambda x, y: (x, y - shear * x))


def translate(image: jax.Array, dx: jax.Array, dy: jax.Array) -> jax.Array:
  """Moves the content by (dx, dy) whole pixels (right, down)."""
  return _resample(image, lambda x, y: (x - dx, y - dy))


def rotate(image: jax.Array, degrees: jax.Array) -> jax.Array:
  """Rotates the content counter-clockwise (as seen) by `degrees` about the image centre."""
  height, width = image.shape[:2]
  cx, cy = width / 2.0, height / 2.0
  cos, sin = jnp.cos(jnp.deg2rad(degrees)), jnp.sin(jnp.deg2rad(degrees))
  return _resample(image, lambda x, y: (cx + (x - cx) * cos - (y - cy) * sin,
                                        cy + (x - cx) * sin + (y - cy) * cos))


# ---------------------------------------------------------------------------------------------
# RandAugment.
# ---------------------------------------------------------------------------------------------
def _operations(magnitude: int, height: int, width: int) -> list[Callable]:
  """OPS as functions (image, sign) -> image at this magnitude bin."""
  fraction = magnitude / MAX_MAGNITUDE
  shear = 0.3 * fraction
  shift_x = float(int(fraction * 150.0 / 331.0 * width))
  shift_y = float(int(fraction * 150.0 / 331.0 * height))
  enhance = 0.9 * fraction
  bits = 8 - int(round(magnitude / (MAX_MAGNITUDE / 4)))
  threshold = 255.0 * (1.0 - fraction)
  by_name = {
      "identity": lambda im, s: im,
      "shear_x": lambda im, s: shear_x(im, s * shear),
      "shear_y": lambda im, s: shear_y(im, s * shear),
      "translate_x": lambda im, s: translate(im, s * shift_x, 0.0),
      "translate_y": lambda im, s: translate(im, 0.0, s * shift_y),
      "rotate": lambda im, s: rotate(im, s * float(magnitude)),
      "brightness": lambda im, s: brightness(im, 1.0 + s * enhance),
      "color": lambda im, s: color(im, 1.0 + s * enhance),
      "contrast": lambda im, s: contrast(im, 1.0 + s * enhance),
      "sharpness": lambda im, s: sharpness(im, 1.0 + s * enhance),
      "posterize": lambda im, s: posterize(im, bits),
      "solarize": lambda im, s: solarize(im, threshold),
      "autocontrast": lambda im, s: autocontrast(im),
      "equalize": lambda im, s: equalize(im),
  }
  return [by_name[name] for name in OPS]


def rand_augment(images: jax.Array, key: jax.Array, *, num_ops: int = 2, magnitude: int = 9
                 ) -> jax.Array:
  """RandAugment of a uint8 batch [B, H, W, C] (module docstring); returns uint8."""
  if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != jnp.uint8:
    raise ValueError(f"rand_augment expects uint8 images [B, H, W, 1 or 3], got "
                     f"{images.dtype} {images.shape}")
  if not 0 <= magnitude <= MAX_MAGNITUDE or num_ops < 0:
    raise ValueError(f"rand_augment needs magnitude in [0, {MAX_MAGNITUDE}] and num_ops >= 0, "
                     f"got magnitude={magnitude}, num_ops={num_ops}")
  batch, height, width, _ = images.shape
  operations = _operations(magnitude, height, width)
  op_key, sign_key = jax.random.split(key)
  chosen = jax.random.randint(op_key, (batch, num_ops), 0, len(OPS))
  signs = jnp.where(jax.random.bernoulli(sign_key, 0.5, (batch, num_ops)), 1.0, -1.0)

  # Under vmap each lax.switch evaluates all 14 operations and selects one per image: cheap at
  # CIFAR's 32x32 (about 19 ms for a batch of 128 on 2 CPU cores), and branch-free on a GPU.
  def one_image(image, ops, op_signs):
    for i in range(num_ops):
      image = jax.lax.switch(ops[i], operations, image, op_signs[i])
    return image

  out = jax.vmap(one_image)(images.astype(jnp.float32), chosen, signs)
  return out.astype(jnp.uint8)

