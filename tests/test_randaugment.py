"""RandAugment's operations against Pillow (the library they come from), and the sampler."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps

from paperzoo.data import randaugment


def _image(seed: int, shape=(11, 13, 3), low: int = 0, high: int = 256) -> np.ndarray:
  return np.random.default_rng(seed).integers(low, high, shape, dtype=np.uint8)


def _ours(op, image: np.ndarray, *args) -> np.ndarray:
  out = op(jnp.asarray(image, jnp.float32), *args)
  return np.asarray(out).astype(np.uint8)


def _pil(image: np.ndarray) -> Image.Image:
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _back(image: Image.Image, channels: int) -> np.ndarray:
  array = np.asarray(image)
  return array[..., None] if channels == 1 else array


@pytest.mark.parametrize("name, enhancer", [("brightness", ImageEnhance.Brightness),
                                            ("color", ImageEnhance.Color),
                                            ("contrast", ImageEnhance.Contrast),
                                            ("sharpness", ImageEnhance.Sharpness)])
@pytest.mark.parametrize("factor", [0.1, 0.73, 1.0, 1.6])
@pytest.mark.parametrize("seed, low, high", [(0, 0, 256), (1, 60, 140)])
def test_enhancements_match_pillow(name, enhancer, factor, seed, low, high):
  image = _image(seed, low=low, high=high)
  expected = np.asarray(enhancer(_pil(image)).enhance(factor))
  got = _ours(getattr(randaugment, name), image, factor)
  diff = np.abs(got.astype(int) - expected.astype(int))
  assert diff.max() <= 1, (name, factor, diff.max())
  assert np.mean(diff == 0) > 0.97, (name, factor, np.mean(diff == 0))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("seed, low, high", [(2, 0, 256), (3, 90, 110), (4, 17, 18)])
def test_level_operations_match_pillow_exactly(channels, seed, low, high):
  image = _image(seed, (9, 14, channels), low, high)
  pil = _pil(image)
  # Pillow computes autocontrast's lut as x * scale - lo * scale in double precision, which
  # sometimes lands a hair below a level (the brightest pixel at 254): one grey level apart.
  stretched = _ours(randaugment.autocontrast, image).astype(int)
  assert np.abs(stretched - _back(ImageOps.autocontrast(pil), channels)).max() <= 1
  cases = [(randaugment.equalize, (), ImageOps.equalize(pil)),
           (randaugment.posterize, (5,), ImageOps.posterize(pil, 5)),
           (randaugment.posterize, (8,), ImageOps.posterize(pil, 8)),
           (randaugment.solarize, (178.5,), ImageOps.solarize(pil, 178.5)),
           (randaugment.solarize, (0.0,), ImageOps.solarize(pil, 0))]
  for op, args, expected in cases:
    np.testing.assert_array_equal(_ours(op, image, *args), _back(expected, channels),
                                  err_msg=f"{op.__name__}{args}")


def test_equalize_of_a_skewed_histogram_matches_pillow():
  # Most pixels dark, a few bright: the case where equalize moves levels the most.
  rng = np.random.default_rng(5)
  image = np.where(rng.random((16, 16, 3)) < 0.9, rng.integers(0, 30, (16, 16, 3)),
                   rng.integers(200, 256, (16, 16, 3))).astype(np.uint8)
  np.testing.assert_array_equal(_ours(randaugment.equalize, image),
                                np.asarray(ImageOps.equalize(_pil(image))))


@pytest.mark.parametrize("shear", [0.21, -0.13])
def test_shears_match_pillow_affine_nearest(shear):
  image = _image(6, (15, 17, 3))
  pil = _pil(image)
  # Pillow maps each output pixel centre (x, y) to the input (a x + b y + c, d x + e y + f).
  expected_x = pil.transform(pil.size, Image.AFFINE, (1, -shear, 0, 0, 1, 0), Image.NEAREST)
  expected_y = pil.transform(pil.size, Image.AFFINE, (1, 0, 0, -shear, 1, 0), Image.NEAREST)
  np.testing.assert_array_equal(_ours(randaugment.shear_x, image, shear), np.asarray(expected_x))
  np.testing.assert_array_equal(_ours(randaugment.shear_y, image, shear), np.asarray(expected_y))


@pytest.mark.parametrize("degrees", [9.0, -23.0])
def test_rotate_matches_pillow(degrees):
  image = _image(7, (15, 17, 3))
  expected = np.asarray(_pil(image).rotate(degrees, resample=Image.NEAREST))
  same = np.all(_ours(randaugment.rotate, image, degrees) == expected, axis=-1)
  assert np.mean(same) > 0.99, np.mean(same)  # float32 vs double at exact pixel edges


def test_rotate_quarter_turn_translate_and_identities():
  image = _image(8, (12, 12, 3))
  np.testing.assert_array_equal(_ours(randaugment.rotate, image, 90.0), np.rot90(image))
  np.testing.assert_array_equal(_ours(randaugment.rotate, image, 0.0), image)
  np.testing.assert_array_equal(_ours(randaugment.shear_x, image, 0.0), image)
  moved = _ours(randaugment.translate, image, 3.0, -2.0)
  np.testing.assert_array_equal(moved[:-2, 3:], image[2:, :-3])
  assert not moved[:, :3].any() and not moved[-2:].any()


def test_rand_augment_applies_one_listed_operation_per_draw():
  images = jnp.asarray(np.stack([_image(10 + i, (10, 10, 3)) for i in range(24)]))
  magnitude = 12
  out = np.asarray(randaugment.rand_augment(images, jax.random.key(0), num_ops=1,
                                            magnitude=magnitude))
  assert out.dtype == np.uint8 and out.shape == images.shape
  operations = randaugment._operations(magnitude, 10, 10)  # pylint: disable=protected-access
  used = set()
  for image, result in zip(np.asarray(images), out):
    matches = {name for name, op in zip(randaugment.OPS, operations) for sign in (-1.0, 1.0)
               if np.array_equal(_ours(functools.partial(op, s=sign), image), result)}
    assert matches, "the output is none of the operations"
    used |= matches
  assert len(used) >= 8  # 24 images draw many of the 14 operations


def test_rand_augment_is_a_function_of_the_key_and_jits():
  images = jnp.asarray(np.stack([_image(40 + i, (8, 9, 3)) for i in range(6)]))
  run = jax.jit(functools.partial(randaugment.rand_augment, num_ops=2, magnitude=9))
  a = run(images, jax.random.key(1))
  np.testing.assert_array_equal(run(images, jax.random.key(1)), a)
  np.testing.assert_array_equal(randaugment.rand_augment(images, jax.random.key(1)), a)
  assert not np.array_equal(run(images, jax.random.key(2)), a)
  np.testing.assert_array_equal(randaugment.rand_augment(images, jax.random.key(1), num_ops=0),
                                images)
  gray = jnp.asarray(_image(50, (4, 8, 8, 1)))
  assert randaugment.rand_augment(gray, jax.random.key(0)).shape == gray.shape


def test_rand_augment_rejects_what_it_cannot_take():
  with pytest.raises(ValueError, match=r"uint8 images \[B, H, W, 1 or 3\]"):
    randaugment.rand_augment(jnp.zeros((2, 8, 8, 3), jnp.float32), jax.random.key(0))
  with pytest.raises(ValueError, match="magnitude in"):
    randaugment.rand_augment(jnp.zeros((2, 8, 8, 3), jnp.uint8), jax.random.key(0),
                             magnitude=31)
