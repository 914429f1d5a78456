r"""Speed of the character language models: the training step against PyTorch, training speed
against the context length, and cached decoding against recomputation.

  python -m experiments.benchmarks.lm_speed                       # all three parts
  python -m experiments.benchmarks.lm_speed --parts=step --json=/tmp/lm_step.json
  python -m experiments.benchmarks.lm_speed --parts=length --lengths=256,1024,4096 \
      --plot=experiments/results/language_model/speed_vs_length.png

Parts (each prints its lines and a ratio measured in the same run):
  step    the training step of `experiments/configs/char_lm.py` (nanoGPT's CPU model, attention),
          the trainer's own `TrainStep` on one batch already on the device: forward (the loss),
          forward + backward (`value_and_grad`) and the whole step (with gradient clipping and
          AdamW), ms each, so the backward's and the optimizer's shares show; the step's
          FLOPs (XLA cost analysis) as a fraction of this machine's float32 matmul rate; and
          the same model in PyTorch (`torch_reference.char_lm_step_seconds`, when torch is
          installed; it is not a dependency): PyTorch ms / ours = how much faster we are; and
          where the step's time goes (`machine.profile_step`: XLA's operations timed by
          jax.profiler, summed by phase and jax operation).
  length  training characters per second of the cpu-size model with softmax attention (XLA's
          `jax.nn.dot_product_attention`, and "blocked", which skips the masked half), GLA and
          Lightning at contexts `--lengths` with `--tokens_per_step` characters per step (batch
          = tokens / length), so every point does the same work except the mixer's own
          length-dependent part; a plot with one line per mixer.
  decode  at a context of `--decode_length` (1,024) characters: one cached decoding step (KV
          cache for attention, recurrent state for the others; every step costs the same, as
          the cache has a fixed shape) against one full forward pass over the context (what
          generating without a cache costs per character), for each mixer.

Timings are medians of `--repeats` windows after warm-up; the machine's speed varies from day
to day, so only ratios within one run compare.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from absl import logging
from flax import nnx

from experiments import configs
from experiments.benchmarks import machine
from paperzoo import plots
from paperzoo.generation import decoding
from paperzoo.registry import MODELS, TASKS

PARTS = ("step", "length", "decode")
# (label, mixer, attention_impl) of the length part: softmax attention both as XLA's fused op
# and blocked (its masked half skipped), then the two linear-time mixers.
LENGTH_MIXERS = (("attention (xla)", "attention", "xla"),
                 ("attention (blocked)", "attention", "blocked"),
                 ("gla", "gla", "xla"), ("lightning", "lightning", "xla"))
DECODE_MIXERS = ("attention", "linear", "gla", "lightning", "mamba")
PROFILE_ROWS = 12  # of the step's profile, printed

def _median_seconds(fn: Callable[[], Any], *, repeats: int, steps: int) -> float:
  """Median over `repeats` windows of the seconds per call of `fn` (after one warm-up call)."""
  jax.block_until_ready(fn())
  windows = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      out = fn()
    jax.block_until_ready(out)
    windows.append((time.perf_counter() - start) / steps)
  return statistics.median(windows)


def _config(arg: str, **overrides: Any):
  config = configs.load("char_lm", arg)
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def step_part(arg: str, *, repeats: int, steps: int, use_torch: bool,
              print_fn: Callable[[str], None] = print) -> dict[str, Any]:
  """The training step, its forward and backward, and PyTorch's step (module docstring)."""
  config = _config(arg)
  built = machine.build_train_step(config)
  step_def, task, batch = built["step_def"], built["task"], built["batch"]
  params, extra = built["state"]["params"], built["state"]["extra"]
  key = jax.random.key(0)

  def loss(params, batch):
    model = step_def.merge(params, extra)
    return task.loss(model, batch, train=True, rngs=nnx.Rngs(dropout=key))[0]

  forward = jax.jit(loss)
  backward = jax.jit(jax.grad(loss))
  forward_seconds = _median_seconds(lambda: forward(params, batch), repeats=repeats,
                                    steps=steps)
  forward_backward_seconds = _median_seconds(lambda: backward(params, batch), repeats=repeats,
                                             steps=steps)
  # (last: the step donates the state, params included)
  row = machine.time_train_step(config, steps=steps, repeats=repeats, warmup=2, built=built)
  profile = machine.profile_step(built, steps=max(steps, 5))
  row.update(forward_seconds=forward_seconds, forward_backward_seconds=forward_backward_seconds)
  matmul = machine.matmul_gflops()
  row["matmul_gflops"] = matmul
  tokens = int(config.train.batch_size) * int(config.data.seq_len)
  row["tokens_per_second"] = tokens / row["step_seconds"]
  print_fn(f"step: {config.model.mixer} model, {row['num_params'] / 1e6:.2f}M parameters, "
           f"batch {config.train.batch_size} x {config.data.seq_len}: "
           f"{1e3 * row['step_seconds']:.1f} ms/step ({row['tokens_per_second']:.0f} chars/s); "
           f"forward {1e3 * row['forward_seconds']:.1f} ms, forward + backward "
           f"{1e3 * row['forward_backward_seconds']:.1f} ms, so backward "
           f"{1e3 * (row['forward_backward_seconds'] - row['forward_seconds']):.1f} ms and "
           f"clipping + AdamW {1e3 * (row['step_seconds'] - row['forward_backward_seconds']):.1f}"
           f" ms")
  print_fn(f"  {row['step_gflop']:.2f} GFLOP/step (XLA) -> {1e3 * row['achieved_tflops']:.0f} "
           f"GFLOP/s = {100 * row['achieved_tflops'] * 1e3 / matmul:.0f}% of this machine's "
           f"float32 matmul rate ({matmul:.0f} GFLOP/s, measured now)")
  if profile["rows"]:
    row["profile"] = profile
    products = sum(ms for _, op, ms, _ in profile["rows"] if op == "dot_general")
    print_fn(f"  where the time goes (jax.profiler, {profile['thunks_per_step']:.0f} XLA "
             f"operations a step, {profile['total_ms']:.1f} ms): matrix products "
             f"{products:.1f} ms, everything else {profile['total_ms'] - products:.1f} ms; the "
             f"largest by phase and jax operation:")
    for phase, op, ms, count in profile["rows"][:PROFILE_ROWS]:
      print_fn(f"    {phase:8s} {op:22s} {ms:6.2f} ms  ({count:.0f} operations)")
  if use_torch:
    try:
      from experiments.benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
      batches = [task.splits["train"].get_batch(
          np.random.default_rng(i).integers(0, len(task.splits["train"]),
                                            config.train.batch_size))
          for i in range(3 + repeats * steps)]
      torch_row = torch_reference.char_lm_step_seconds(config, task.data.vocab_size, batches)
    except ImportError:
      print_fn("  PyTorch: not installed (pip install torch==2.13.0 to compare)")
    else:
      row["torch"] = torch_row
      row["torch_ratio"] = torch_row["step"] / row["step_seconds"]
      print_fn(f"  PyTorch {torch_row['version']} ({torch_row['threads']} threads), same "
               f"model, same run: {1e3 * torch_row['step']:.1f} ms/step (forward "
               f"{1e3 * torch_row['forward']:.1f} ms) -> PyTorch's time / ours = "
               f"{row['torch_ratio']:.2f} (above 1: ours is faster)")
  return row


def length_part(lengths: list[int], tokens_per_step: int, *, repeats: int, steps: int,
                plot: str = "", arg: str = "", mixers=LENGTH_MIXERS,
                print_fn: Callable[[str], None] = print) -> dict[str, Any]:
  """Training characters/s against the context, per mixer (module docstring); `arg`: more
  char_lm.py arguments (e.g. runlocal, for a smoke test)."""
  rows = []
  for label, mixer, impl in mixers:
    for length in lengths:
      batch = max(tokens_per_step // length, 1)
      positions = "rotary" if mixer == "attention" else "none"
      config = _config(f"mixer={mixer},{arg}", **{"data.seq_len": length,
                                                   "train.batch_size": batch,
                                                   "model.positions": positions,
                                                   "model.attention_impl": impl})
      row = machine.time_train_step(config, steps=max(steps // 2, 1), repeats=repeats,
                                    warmup=1)
      row.update(mixer=label, length=length,
                 tokens_per_second=batch * length / row["step_seconds"])
      rows.append(row)
      print_fn(f"length: {label:19s} context {length:5d} x batch {batch:3d}: "
               f"{row['tokens_per_second']:8.0f} chars/s ({1e3 * row['step_seconds']:.0f} "
               "ms/step)")
  labels = [label for label, _, _ in mixers]
  for label in labels:
    mine = [r for r in rows if r["mixer"] == label]
    print_fn(f"  {label}: chars/s at {mine[-1]['length']} / at {mine[0]['length']} = "
             f"{mine[-1]['tokens_per_second'] / mine[0]['tokens_per_second']:.2f}")
  if plot:
    plots.lines_with_error_bars(
        {label: [(r["length"], r["tokens_per_second"], 0.0) for r in rows
                 if r["mixer"] == label] for label in labels}, plot,
        xlabel="context (characters)", ylabel="training characters / s",
        title=f"Training speed against context ({tokens_per_step} characters per step)",
        log_x=True)
    print_fn(f"  plot: {plot}")
  return {"rows": rows}


def decode_part(length: int, *, repeats: int, steps: int, arg: str = "",
                mixers=DECODE_MIXERS, print_fn: Callable[[str], None] = print
                ) -> dict[str, Any]:
  """A cached decoding step against a full forward pass at `length` (module docstring)."""
  rows = []
  for mixer in mixers:
    positions = "rotary" if mixer == "attention" else "none"
    config = _config(f"mixer={mixer},{arg}", **{"data.seq_len": length,
                                                "model.positions": positions})
    task = TASKS.get(config.task.name)(config)
    model = MODELS.get(config.model.name)(config.model, **task.model_kwargs(),
                                          rngs=nnx.Rngs(params=0))
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(np.random.default_rng(0).integers(
        0, task.data.vocab_size, (1, length)), jnp.int32)
    full = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
    full_seconds = _median_seconds(lambda: full(state, tokens), repeats=repeats, steps=steps)

    @jax.jit
    def step(state, cache, token):
      return nnx.merge(graphdef, state).step(token, cache, jnp.int32(length - 1))

    cache = jax.jit(lambda state: nnx.merge(graphdef, state).prefill(
        tokens[:, :length - 1], nnx.merge(graphdef, state).init_cache(1, length))[1])(state)
    step_seconds = _median_seconds(lambda: step(state, cache, tokens[:, -1]), repeats=repeats,
                                   steps=steps * 10)
    _, stats = decoding.generate(model, np.asarray(tokens[:, :length // 2]),
                                 max_new_tokens=length - length // 2, temperature=1.0,
                                 return_stats=True)
    row = {"mixer": mixer, "length": length, "full_forward_seconds": full_seconds,
           "cached_step_seconds": step_seconds, "speedup": full_seconds / step_seconds,
           "generate_tokens_per_second": stats.decode_tokens_per_second}
    rows.append(row)
    print_fn(f"decode: {mixer:9s} at {length}: cached step {1e3 * step_seconds:.2f} ms, full "
             f"forward {1e3 * full_seconds:.1f} ms -> {row['speedup']:.0f}x per character; "
             f"generate() {row['generate_tokens_per_second']:.0f} chars/s")
  return {"rows": rows}


def _define_flags() -> dict[str, Any]:
  """The command line's flags, defined only when this module runs as the program (other
  benchmarks define flags of the same names, and a test process may import several)."""
  return dict(
      parts=flags.DEFINE_list("parts", list(PARTS), f"Which parts: {', '.join(PARTS)}."),
      arg=flags.DEFINE_string("arg", "mixer=attention", "char_lm.py arguments of the step "
                              "part."),
      lengths=flags.DEFINE_list("lengths", ["256", "512", "1024", "2048", "4096"],
                                "Contexts of the length part."),
      tokens=flags.DEFINE_integer("tokens_per_step", 8192, "Characters per step (length "
                                  "part)."),
      decode_length=flags.DEFINE_integer("decode_length", 1024, "Context of the decode part."),
      repeats=flags.DEFINE_integer("repeats", 5, "Timed windows (the median is reported)."),
      steps=flags.DEFINE_integer("steps", 10, "Steps per timed window."),
      torch=flags.DEFINE_bool("torch", True, "Time the PyTorch model too (if installed)."),
      plot=flags.DEFINE_string("plot", "", "Where the length part's plot goes ('' = none)."),
      json=flags.DEFINE_string("json", "", "Also write the results to this JSON file."),
  )


def main(argv, flag):
  del argv
  logging.set_verbosity(logging.WARNING)
  value = {name: holder.value for name, holder in flag.items()}
  unknown = sorted(set(value["parts"]) - set(PARTS))
  if unknown:
    raise app.UsageError(f"unknown parts {unknown}; valid: {', '.join(PARTS)}")
  device = jax.devices()[0]
  print(f"machine: {jax.device_count()} x {device.device_kind} ({device.platform}), jax "
        f"{jax.__version__}")
  result: dict[str, Any] = {"jax_version": jax.__version__, "device": device.device_kind}
  if "step" in value["parts"]:
    result["step"] = step_part(value["arg"], repeats=value["repeats"], steps=value["steps"],
                               use_torch=value["torch"])
  if "length" in value["parts"]:
    result["length"] = length_part([int(x) for x in value["lengths"]], value["tokens"],
                                   repeats=value["repeats"], steps=value["steps"],
                                   plot=value["plot"])
  if "decode" in value["parts"]:
    result["decode"] = decode_part(value["decode_length"], repeats=value["repeats"],
                                   steps=value["steps"])
  if value["json"]:
    with open(value["json"], "w") as f:
      json.dump(result, f, indent=2, default=str)


if __name__ == "__main__":
  _FLAGS = _define_flags()
  app.run(lambda argv: main(argv, _FLAGS))
