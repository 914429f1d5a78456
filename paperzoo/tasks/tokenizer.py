"""Tokenizer: learn to reconstruct images through a discrete bottleneck (VQ autoencoders such as
VAR's multi-scale tokenizer, `paperzoo.models.var_tokenizer`).

Data: any data set registered with kind "image" (e.g. mnist, cifar10; the classification
splits); labels are ignored. Pixels uint8 -> x / 127.5 - 1
in [-1, 1].

The model maps {"inputs": x} to a dict with at least "reconstruction" [B, H, W, C], "vq_loss"
(its codebook + commitment losses), "vq_loss_per_example" [B] (the same per image, so that
evaluation leaves out the padding of a last batch) and "codebook_usage"; "indices" (a list of
token maps) feeds the code-usage picture.

    loss = reconstruction + vq_loss,   reconstruction = mean (x_hat - x)^2 ("l2") or |x_hat - x|
                                       ("l1"), over pixels and channels

VAR trains its tokenizer with L1 + L2 + perceptual (LPIPS) + GAN losses; without pretrained
LPIPS weights and to keep CPU runs short, this task uses the pixel loss alone (L2 by default:
it is what PSNR measures).

Evaluation over a whole split (the reconstruction clipped to [-1, 1]):
  psnr            mean over images of 10 log10(2^2 / MSE_image) in dB (range [-1, 1], so it
                  equals the uint8 PSNR up to rounding; MSE floored at 1e-10)
  mse             mean squared error per pixel
  loss            mse (or the L1 error) + vq_loss, comparable to the training loss
  codebook_usage  the model's window statistic: the fraction of codes chosen within the last
                  `model.usage_window` training steps (read from the model's state; it does
                  not depend on the split)
Model selection: validation PSNR (max).

Final metrics (`final_metrics`, the trainer's optional hook; in results.json): the best
checkpoint's test PSNR of uint8-rounded reconstructions (`paperzoo.generation.metrics.psnr`) and
the exact test codebook usage, the fraction of codes some test token uses, in all and per scale.

Pictures: `reconstructions.png` (test inputs, each row followed by its reconstructions) and
`code_usage.png` + `code_usage.json` (how often each code is chosen over the whole test split,
per scale and in all, and the fraction of codes used).

Config keys (`config.task`):
  reconstruction_loss  (str, "l2")  "l2" | "l1"
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from paperzoo import plots
from paperzoo import sharding
from paperzoo.data import batches
from paperzoo.generation import metrics
from paperzoo.registry import DATASETS, TASKS

RECONSTRUCTION_LOSSES = ("l2", "l1")
_MIN_MSE = 1e-10  # PSNR of a perfect reconstruction is capped at 10 log10(4 / 1e-10) ~ 106 dB


def to_pixels(images: jax.Array) -> jax.Array:
  """uint8 [..] -> float32 in [-1, 1]."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(pixels: np.ndarray) -> np.ndarray:
  """float in [-1, 1] -> uint8 (clipped, rounded)."""
  return np.clip(np.round((np.asarray(pixels, np.float32) + 1.0) * 127.5), 0, 255).astype(
      np.uint8)


def per_image_psnr(reconstruction: jax.Array, target: jax.Array) -> jax.Array:
  """[B] PSNR in dB of images in [-1, 1] (peak-to-peak 2); the reconstruction is clipped."""
  error = jnp.clip(reconstruction, -1.0, 1.0) - target
  mse = jnp.mean(error.reshape(error.shape[0], -1) ** 2, axis=1)
  return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, _MIN_MSE))


@TASKS.register("tokenizer")
class TokenizerTask:
  """Reconstruct images through the model's quantized latents."""

  selection_metric = "psnr"
  selection_mode = "max"
  data_kinds = ("image",)

  def __init__(self, config: Any):
    load = DATASETS.get(config.data.name, kinds=self.data_kinds)
    self.reconstruction_loss = config.task.get("reconstruction_loss", "l2")
    if self.reconstruction_loss not in RECONSTRUCTION_LOSSES:
      raise ValueError(f"unknown task.reconstruction_loss {self.reconstruction_loss!r}; valid: "
                       f"{', '.join(RECONSTRUCTION_LOSSES)}")
    self.codebook_size = int(config.model.get("codebook_size", 0))
    self.data = load(config.data)
    self.splits = {"train": self.data.train, "val": self.data.val, "test": self.data.test}

  def model_kwargs(self) -> dict[str, Any]:
    return dict(input_shape=self.data.input_shape)

  def inputs(self, batch: dict[str, Any]) -> dict[str, jax.Array]:
    """What the model sees: {"inputs": pixels in [-1, 1]}."""
    return {"inputs": to_pixels(jnp.asarray(batch["inputs"]))}

  def _pixel_loss(self, reconstruction: jax.Array, target: jax.Array) -> jax.Array:
    error = reconstruction - target
    return jnp.mean(error ** 2) if self.reconstruction_loss == "l2" else jnp.mean(jnp.abs(error))

  def loss(self, model: Any, batch: dict[str, jax.Array], *, train: bool, rngs: Any
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    target = self.inputs(batch)["inputs"]
    outputs = model({"inputs": target}, train=train, rngs=rngs)
    reconstruction = outputs["reconstruction"]
    loss = self._pixel_loss(reconstruction, target) + outputs["vq_loss"]
    return loss, {"mse": jnp.mean((reconstruction - target) ** 2),
                  "vq_loss": outputs["vq_loss"],
                  "psnr": jnp.mean(per_image_psnr(reconstruction, target)),
                  "codebook_usage": outputs["codebook_usage"]}

  def eval_sums(self, model: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    target = self.inputs(batch)["inputs"]
    outputs = model({"inputs": target}, train=False, rngs=None)
    reconstruction = outputs["reconstruction"]
    mask = batch["mask"].astype(jnp.float32)
    error = jnp.clip(reconstruction, -1.0, 1.0) - target
    mse = jnp.mean(error.reshape(error.shape[0], -1) ** 2, axis=1)
    pixel = jnp.mean(jnp.abs(error).reshape(error.shape[0], -1), axis=1)
    count = jnp.sum(mask)
    return {"mse": jnp.sum(mse * mask), "l1": jnp.sum(pixel * mask),
            "psnr": jnp.sum(per_image_psnr(reconstruction, target) * mask),
            "vq_loss": jnp.sum(outputs["vq_loss_per_example"] * mask),
            "codebook_usage": outputs["codebook_usage"] * count, "count": count}

  def summarize(self, sums: dict[str, float]) -> dict[str, float]:
    count = sums["count"]
    pixel = sums["mse"] if self.reconstruction_loss == "l2" else sums["l1"]
    return {"psnr": sums["psnr"] / count, "mse": sums["mse"] / count,
            "loss": (pixel + sums["vq_loss"]) / count,
            "codebook_usage": sums["codebook_usage"] / count}

  def reconstruct_split(self, predict: Callable[[dict[str, Any]], Any], split: str = "test",
                        *, batch_size: int = 500) -> tuple[np.ndarray, list[np.ndarray]]:
    """uint8 reconstructions of every image of `split` and the token maps (a list per scale,
    empty if the model returns no "indices"); the last batch is padded, then cut."""
    images = self.splits[split].arrays["inputs"]

    def reconstruct(indices):
      outputs = predict(self.inputs({"inputs": images[indices]}))
      return outputs["reconstruction"], list(outputs.get("indices", []))

    reconstructions, token_maps = batches.map_batches(reconstruct, len(images), batch_size)
    return to_uint8(reconstructions), token_maps

  def code_usage(self, token_maps: list[np.ndarray]) -> dict[str, Any]:
    """How often each code occurs in `token_maps`, and the fraction of codes used (in all and
    per scale)."""
    size = self.codebook_size or int(max(m.max() for m in token_maps)) + 1
    per_scale = [np.bincount(m.ravel(), minlength=size) for m in token_maps]
    total = np.sum(per_scale, axis=0)
    return {"codebook_size": size, "usage": float(np.mean(total > 0)),
            "usage_per_scale": {str(m.shape[1]): float(np.mean(c > 0))
                                for m, c in zip(token_maps, per_scale)},
            "counts": total.tolist()}

  def final_metrics(self, predict: Callable[[dict[str, Any]], Any], workdir: pathlib.Path
                    ) -> dict[str, Any]:
    """Test-split scores of the best checkpoint: PSNR of the uint8 reconstructions and the
    codebook usage over every test token (exact, unlike the window statistic)."""
    del workdir
    reconstructions, token_maps = self.reconstruct_split(predict, "test")
    scores = {"test_psnr_uint8": metrics.psnr(reconstructions,
                                              self.data.test.arrays["inputs"])}
    if token_maps:
      usage = self.code_usage(token_maps)
      scores.update(test_codebook_usage=usage["usage"],
                    test_codebook_usage_per_scale=usage["usage_per_scale"])
    return scores

  def write_pictures(self, predict: Callable[[dict[str, Any]], Any], workdir: pathlib.Path, *,
                     num_examples: int = 16) -> list[pathlib.Path]:
    """Reconstructions next to their inputs, and how often each code is used (test split)."""
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top  (plots set Agg)
    images = self.data.test.arrays["inputs"]
    reconstructions, token_maps = self.reconstruct_split(predict, "test")
    shown = np.linspace(0, len(images) - 1, min(num_examples, len(images))).astype(np.int64)
    psnrs = [10 * np.log10(255.0 ** 2 / max(np.mean(
        (reconstructions[i].astype(np.float64) - images[i]) ** 2), _MIN_MSE)) for i in shown]
    columns = 8
    grid, titles = [], []
    for row in range(0, len(shown), columns):
      chunk = shown[row:row + columns]
      grid += [images[i] for i in chunk] + [reconstructions[i] for i in chunk]
      titles += [f"input {i}" for i in chunk] + [
          f"recon {psnrs[row + j]:.1f} dB" for j in range(len(chunk))]
    paths = [plots.image_grid(np.stack(grid), titles, workdir / "reconstructions.png",
                              columns=min(columns, len(shown)),
                              title=f"{self.data.name} test: inputs, then reconstructions")]
    if token_maps:
      paths += self._code_usage_pictures(self.code_usage(token_maps), workdir, plt)
    return paths

  def _code_usage_pictures(self, usage: dict[str, Any], workdir: pathlib.Path, plt: Any
                           ) -> list[pathlib.Path]:
    summary = dict(split="test", **usage)
    size = usage["codebook_size"]
    total = np.asarray(usage["counts"])
    json_path = workdir / "code_usage.json"
    if sharding.is_primary_process():
      json_path.write_text(json.dumps(summary, indent=1))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    order = np.argsort(-total)
    axes[0].bar(np.arange(size), total[order], width=1.0, color="tab:blue")
    axes[0].set_yscale("symlog")
    axes[0].set_xlabel("code (sorted by count)")
    axes[0].set_ylabel("tokens")
    axes[0].set_title(f"test tokens per code: {summary['usage']:.1%} of {size} codes used")
    sides = list(summary["usage_per_scale"])
    axes[1].bar(sides, [summary["usage_per_scale"][s] for s in sides], color="tab:orange")
    axes[1].set_xlabel("scale (side)")
    axes[1].set_ylabel("fraction of codes used")
    axes[1].set_ylim(0, 1)
    fig.tight_layout()
    return [plots.save_figure(fig, workdir / "code_usage.png"), json_path]
