"""Language modelling: next-token prediction on text, and the recall probes MQAR and passkey.

Registered as task "language_model"; it takes data sets of kind "text"
(`paperzoo.data.text`: tinyshakespeare, mqar, passkey), whose examples are
{"inputs", "targets", "weights"} [B, T] (and "depth_bin" [B] for passkey). The model is called
as `model(inputs, train=..., rngs=...)` on int32 tokens [B, T] and returns logits
[B, T, vocab]; it is built with `vocab_size` and `max_length` (= the data's seq_len).

Loss: the weighted mean of the token cross-entropies, sum_t w_t nll_t / sum_t w_t over the
batch, computed in float32 whatever the logits' dtype. Training metric: token accuracy on the
weighted tokens.

Evaluation over a whole split (padded examples count for nothing: the token weights are
multiplied by `batch["mask"]`):
  loss           nats per weighted token
  bits_per_char  loss / ln 2 (character data; `bits_per_token` for token data such as mqar)
  accuracy       top-1 accuracy of the weighted tokens
  probes (mqar, passkey) also:
  sequence_accuracy   the fraction of examples whose weighted tokens are all right (every
                      query of an MQAR example; the whole 5-letter passkey)
  accuracy_depth_<b>  passkey: sequence accuracy of the examples in depth bin b (NaN for a bin
                      without examples)
Model selection: validation `loss` (min) on text; `accuracy` (max) on the probes. On
tinyshakespeare the validation split is also the reported split, as in nanoGPT (its
`selection` in results.json says so).

After training (`final_metrics`), for character data that is not a probe: `num_samples`
samples of `sample_length` characters are drawn from the best checkpoint
(`paperzoo.workdir.load_best_model`) by `paperzoo.generation.decoding.generate`, each after
`sample_prompt`, and written to `samples.txt`; returned: {"samples_file", "prefill_seconds",
"decode_seconds" (the prompt's parallel pass and the step loop, compilation excluded),
"decode_tokens_per_second" (new tokens of all samples, decoded together as one batch, per
second of the step loop)}. Text with passkeys mixed into training (tinyshakespeare's
`passkey_fraction`) also returns "passkey_accuracy" and "passkey_accuracy_depth_<b>": the whole
key's accuracy on the data set's `passkey_probe` (passkeys in held-out text). Probes and
`num_samples=0` return {} (or only the passkey scores).

Pictures: text data, `loss_by_position.png` (the mean validation NLL at each position of the
window: how much the context helps); passkey data (test split) and text with passkeys in
training (its probe), `passkey_depth.png` (sequence accuracy by depth bin).

Config keys (`config.task`):
  num_samples    (int, 2)      samples drawn at the end (0: none)
  sample_length  (int, 500)    new characters per sample
  sample_prompt  (str, "\\n")   the text each sample continues (its characters must be in the
                               vocabulary; ignored for token data)
  temperature    (float, 1.0)  logits / temperature before filtering
  top_k          (int, 0)      keep the k most likely tokens (0: all)
  top_p          (float, 0.0)  nucleus mass (0: off)
  sample_seed    (int, 0)      the sampling seed
"""

from __future__ import annotations

import math
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from paperzoo import plots
from paperzoo import sharding
from paperzoo import workdir as workdir_lib
from paperzoo.data import batches
from paperzoo.registry import DATASETS, TASKS


@jax.jit
def _token_scores(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """NLL [B, T] (float32) and correctness [B, T] (float32) of `logits` for `targets`."""
  targets = targets.astype(jnp.int32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return nll, (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)


@TASKS.register("language_model")
class LanguageModelTask:
  """Predict each target token of a text data set (module docstring)."""

  data_kinds = ("text",)

  def __init__(self, config: Any):
    get = config.task.get
    self.config = config
    self.data = DATASETS.get(config.data.name, kinds=self.data_kinds)(config.data)
    self.splits = {"train": self.data.train, "val": self.data.val, "test": self.data.test}
    self.selection = self.data.selection
    self.probe = bool(self.data.probe)
    self.num_depth_bins = int(self.data.num_depth_bins)
    self.characters = self.data.vocab is not None
    # Text is selected on its loss; a probe on whether it recalls (its loss can keep falling on
    # positions it already gets right).
    self.selection_metric, self.selection_mode = (("accuracy", "max") if self.probe
                                                  else ("loss", "min"))
    self.num_samples = int(get("num_samples", 2))
    self.sample_length = int(get("sample_length", 500))
    self.sample_prompt = str(get("sample_prompt", "\n"))
    self.temperature = float(get("temperature", 1.0))
    self.top_k = int(get("top_k", 0))
    self.top_p = float(get("top_p", 0.0))
    self.sample_seed = int(get("sample_seed", 0))
    if self.num_samples < 0 or self.sample_length < 1:
      raise ValueError(f"task.num_samples={self.num_samples} must be >= 0 and "
                       f"task.sample_length={self.sample_length} >= 1")
    if self.top_k < 0 or not 0.0 <= self.top_p <= 1.0 or not self.temperature > 0:
      raise ValueError(f"need task.top_k >= 0, 0 <= task.top_p <= 1 and task.temperature > 0; "
                       f"got {self.top_k}, {self.top_p}, {self.temperature}")
    if self.samples_drawn:
      if not self.sample_prompt:
        raise ValueError("task.sample_prompt is empty: samples need at least one character "
                         "to continue (nanoGPT's is '\\n')")
      try:
        self.data.encode(self.sample_prompt)  # fail now, not after training
      except ValueError as error:
        raise ValueError(f"task.sample_prompt={self.sample_prompt!r}: {error}") from None
    train = config.get("train")
    self.eval_batch_size = int(train.get("eval_batch_size", 256)) if train else 256

  @property
  def samples_drawn(self) -> bool:
    """Whether final_metrics draws samples: character text (not a probe), num_samples > 0."""
    return self.characters and not self.probe and self.num_samples > 0

  def model_kwargs(self) -> dict[str, Any]:
    return {"vocab_size": int(self.data.vocab_size), "max_length": int(self.data.seq_len)}

  # ------------------------------------------------------------------------------------------
  # Loss and evaluation.
  # ------------------------------------------------------------------------------------------
  def _scores(self, model: Any, batch: dict[str, jax.Array], *, train: bool, rngs: Any
              ) -> tuple[jax.Array, jax.Array]:
    logits = model(jnp.asarray(batch["inputs"]).astype(jnp.int32), train=train, rngs=rngs)
    return _token_scores(logits, jnp.asarray(batch["targets"]))

  def loss(self, model: Any, batch: dict[str, jax.Array], *, train: bool, rngs: Any
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    nll, correct = self._scores(model, batch, train=train, rngs=rngs)
    weights = jnp.asarray(batch["weights"], jnp.float32)
    total = jnp.maximum(jnp.sum(weights), 1.0)  # (a batch without a weighted token adds 0)
    loss = jnp.sum(nll * weights) / total
    return loss, {"loss": loss, "accuracy": jnp.sum(correct * weights) / total}

  def eval_sums(self, model: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    nll, correct = self._scores(model, batch, train=False, rngs=None)
    mask = jnp.asarray(batch["mask"], jnp.float32)
    token_weights = jnp.asarray(batch["weights"], jnp.float32)
    weights = token_weights * mask[:, None]
    sums = {"nll": jnp.sum(nll * weights), "weight": jnp.sum(weights),
            "correct": jnp.sum(correct * weights)}
    if self.probe:
      scored = token_weights > 0
      # An example counts once it has a weighted token; it is right when all of them are.
      counted = mask * jnp.any(scored, axis=1).astype(jnp.float32)
      right = jnp.all((correct > 0) | ~scored, axis=1).astype(jnp.float32) * counted
      sums.update(sequences=jnp.sum(counted), sequences_correct=jnp.sum(right))
      if self.num_depth_bins:
        depth = jnp.asarray(batch["depth_bin"])
        for b in range(self.num_depth_bins):
          in_bin = (depth == b).astype(jnp.float32)
          sums[f"depth_{b}_count"] = jnp.sum(counted * in_bin)
          sums[f"depth_{b}_correct"] = jnp.sum(right * in_bin)
    return sums

  def summarize(self, sums: dict[str, float]) -> dict[str, float]:
    weight = float(sums["weight"])
    loss = float(sums["nll"]) / weight if weight else math.nan
    summary = {"loss": loss,
               ("bits_per_char" if self.characters else "bits_per_token"): loss / math.log(2),
               "accuracy": float(sums["correct"]) / weight if weight else math.nan}
    if self.probe:
      summary["sequence_accuracy"] = _ratio(sums["sequences_correct"], sums["sequences"])
      for b in range(self.num_depth_bins):
        summary[f"accuracy_depth_{b}"] = _ratio(sums[f"depth_{b}_correct"],
                                                sums[f"depth_{b}_count"])
    return summary

  # ------------------------------------------------------------------------------------------
  # Samples.
  # ------------------------------------------------------------------------------------------
  def final_metrics(self, predict: Callable[..., Any], workdir: pathlib.Path
                    ) -> dict[str, Any]:
    """Samples of the best checkpoint in `samples.txt` and the decoding speed, and for text
    with passkeys in training the passkey accuracy in held-out text by depth (module
    docstring); {} for probes, token data or num_samples=0."""
    metrics = {}
    if self.data.passkey_probe is not None:
      accuracy, counts, overall = self.passkey_by_depth(predict, self.data.passkey_probe)
      metrics["passkey_accuracy"] = overall
      metrics.update({f"passkey_accuracy_depth_{b}": float(a) for b, a in enumerate(accuracy)})
    if not self.samples_drawn:
      return metrics
    from paperzoo.generation import decoding  # pylint: disable=g-import-not-at-top
    workdir = pathlib.Path(workdir)
    model, _ = workdir_lib.load_best_model(workdir, config=self.config, task=self)
    prompt = np.tile(self.data.encode(self.sample_prompt)[None], (self.num_samples, 1))
    tokens, stats = decoding.generate(model, prompt.astype(np.int32),
                                      max_new_tokens=self.sample_length,
                                      temperature=self.temperature, top_k=self.top_k,
                                      top_p=self.top_p, seed=self.sample_seed,
                                      return_stats=True)
    settings = (f"temperature {self.temperature:g}, top_k {self.top_k}, top_p {self.top_p:g}, "
                f"seed {self.sample_seed}")
    texts = [f"--- sample {i} ({settings}) ---\n{self.data.decode(row)}"
             for i, row in enumerate(tokens)]
    if sharding.is_primary_process():
      (workdir / "samples.txt").write_text("\n\n".join(texts) + "\n")
    return {**metrics, "samples_file": "samples.txt",
            "prefill_seconds": round(stats.prefill_seconds, 4),
            "decode_seconds": round(stats.decode_seconds, 3),
            "decode_tokens_per_second": self.num_samples * stats.decode_tokens_per_second}

  # ------------------------------------------------------------------------------------------
  # Pictures.
  # ------------------------------------------------------------------------------------------
  def token_scores(self, predict: Callable[..., Any], dataset: Any) -> dict[str, np.ndarray]:
    """Per token of every example of `dataset` (a split): "nll", "correct", "weights" [N, T],
    and its per-example arrays (e.g. "depth_bin" [N])."""

    def score(indices: np.ndarray) -> dict[str, Any]:
      batch = dataset.get_batch(indices)
      nll, correct = _token_scores(predict(batch.pop("inputs")), jnp.asarray(batch.pop("targets")))
      return dict(batch, nll=nll, correct=correct)

    return batches.map_batches(score, len(dataset), self.eval_batch_size, shrink=True)

  def write_pictures(self, predict: Callable[..., Any], workdir: pathlib.Path
                     ) -> list[pathlib.Path]:
    """`loss_by_position.png` for text, `passkey_depth.png` for passkey data and for text with
    passkeys in training (module docstring)."""
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top  (plots set Agg)
    workdir = pathlib.Path(workdir)
    if not self.probe:
      scores = self.token_scores(predict, self.splits["val"])
      per_position = (np.sum(scores["nll"] * scores["weights"], axis=0)
                      / np.maximum(np.sum(scores["weights"], axis=0), 1.0))
      mean = np.sum(scores["nll"] * scores["weights"]) / np.sum(scores["weights"])
      fig, ax = plt.subplots(figsize=(7, 4))
      ax.plot(np.arange(1, len(per_position) + 1), per_position, color="tab:blue")
      ax.axhline(mean, color="tab:gray", linestyle="--", label=f"mean {mean:.4f}")
      ax.set_xlabel("position in the window (tokens of context seen)")
      ax.set_ylabel("validation loss (nats per token)")
      ax.set_title(f"{self.data.name}: validation loss by position")
      ax.grid(alpha=0.3)
      ax.legend()
      fig.tight_layout()
      pictures = [plots.save_figure(fig, workdir / "loss_by_position.png")]
      if self.data.passkey_probe is not None:
        accuracy, counts, _ = self.passkey_by_depth(predict, self.data.passkey_probe)
        pictures.append(_plot_passkey(
            accuracy, counts, workdir / "passkey_depth.png",
            f"passkeys in {self.data.name} validation text, seq_len {self.data.seq_len}"))
      return pictures
    if not self.num_depth_bins:
      return []
    accuracy, counts, _ = self.passkey_by_depth(predict, self.splits["test"])
    return [_plot_passkey(accuracy, counts, workdir / "passkey_depth.png",
                          f"{self.data.name} test, seq_len {self.data.seq_len}")]

  def passkey_by_depth(self, predict: Callable[..., Any], dataset: Any
                       ) -> tuple[np.ndarray, np.ndarray, float]:
    """Whole-key accuracy of passkey examples by depth bin, their counts, and overall."""
    scores = self.token_scores(predict, dataset)
    scored = scores["weights"] > 0
    right = np.all((scores["correct"] > 0) | ~scored, axis=1) & np.any(scored, axis=1)
    bins = np.arange(getattr(dataset, "num_bins", self.num_depth_bins))
    counts = np.array([np.sum(scores["depth_bin"] == b) for b in bins])
    accuracy = np.array([right[scores["depth_bin"] == b].mean() if counts[b] else np.nan
                         for b in bins])
    return accuracy, counts, float(right.mean()) if len(right) else math.nan


def _plot_passkey(accuracy: np.ndarray, counts: np.ndarray, path: pathlib.Path,
                  title: str) -> pathlib.Path:
  """Bars of passkey accuracy by depth bin, each labelled with its value and count."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top  (plots set Agg)
  bins = np.arange(len(accuracy))
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.bar(bins, np.nan_to_num(accuracy), color="tab:orange")
  for b in bins:  # the value and the count, readable even where a bar is 0
    ax.text(b, np.nan_to_num(accuracy[b]) + 0.02, f"{accuracy[b]:.0%} of {counts[b]}",
            ha="center", fontsize=8)
  ax.set_xticks(bins, [f"{b / len(bins):.0%}-{(b + 1) / len(bins):.0%}" for b in bins])
  ax.set_xlabel("depth of the key line in the filler")
  ax.set_ylabel("passkey accuracy (whole key)")
  ax.set_ylim(0, 1.1)
  ax.set_title(f"{title} ({int(counts.sum())} examples)")
  ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  return plots.save_figure(fig, path)


def _ratio(numerator: float, denominator: float) -> float:
  return float(numerator) / float(denominator) if float(denominator) else math.nan
