r"""Throughput of DiT's training step: images/s and model FLOPs utilization (MFU), with LiT (the
same DiT with linear attention) timed in the same run as the baseline.

  python -m experiments.benchmarks.dit_throughput            # DiT-tiny/4 on MNIST, the CPU recipe
  python -m experiments.benchmarks.dit_throughput --data=cifar10 --size=S --patch=2 --batch=256
      # DiT-S/2 on CIFAR-10, the GPU recipe (on a GPU host: launch/gpu.sh or
      # XLA_PYTHON_CLIENT_PREALLOCATE=false)
  python -m experiments.benchmarks.dit_throughput --objective=ddpm --baseline_mixer=""  # no LiT
  python -m experiments.benchmarks.dit_throughput --json=/tmp/dit_throughput.json

What is timed: one training step of `experiments/configs/dit.py:data=<data>,size=<size>,
patch=<patch>,objective=<objective>`, the trainer's own `paperzoo.train_state.TrainStep` (the
task's loss under `jax.value_and_grad`, the optax update and the EMA of the weights, the state
donated), on one device, with one batch of real training images already on the device: the
trainer's host-side batch assembly and its metric logging are not part of it, so this is the
step's own speed.
After compiling and `--warmup` steps, `--repeats` windows of `--steps` steps are timed (each
ends when the last step's outputs are ready); the median window gives images/s.

FLOPs per step: XLA's cost analysis of the compiled step (forward, backward and optimizer;
elementwise work included, so slightly above the matmul-only count of papers' MFU). MFU = those
FLOPs x steps/s / peak, where the peak is
  * on a GPU in PEAK_TFLOPS (matched by `device_kind`): the dense tensor-core peak of the
    precision the step's matmuls run at. DiT here computes in float32, and JAX's default matmul
    precision lets XLA run float32 matmuls on TF32 tensor cores, so the TF32 peak is the fair
    one (H100 SXM: 494.7 TFLOP/s); `--peak=bf16|fp32` picks another column (H100 SXM dense bf16
    989.4, fp32 non-tensor 66.9), and the bf16 fraction is printed beside it, since bf16 is
    what a tuned DiT would use;
  * on a CPU (or a GPU missing from the table): this machine's float32 matmul throughput,
    measured in the same run (the best of 20 products of two 1024x1024 matrices; 8192 on
    accelerators).
The printout says which peak was used.

Baseline (same run, same settings, `--baseline_mixer=linear`): LiT, the DiT whose token mixer is
linear attention; the ratio of the two images/s says what the mixer costs at this token count
(LiT's promise is linear cost in the tokens; at 64 tokens softmax attention is cheap).
"""

from __future__ import annotations

import json
from typing import Any, Callable

import jax
from absl import app
from absl import flags
from absl import logging

from experiments.benchmarks import machine
from experiments.configs import dit as dit_config

_DATA = flags.DEFINE_enum("data", "mnist", ["mnist", "cifar10"], "Training images.")
_SIZE = flags.DEFINE_string("size", "", "DiT size: tiny | S | B | L | XL ('' = tiny on MNIST, "
                            "narrowed to the CPU recipe's 4 x 96, S on CIFAR-10).")
_PATCH = flags.DEFINE_integer("patch", 0, "Patch size (0 = 4 on MNIST, 2 on CIFAR-10).")
_BATCH = flags.DEFINE_integer("batch", 0, "Images per step (0 = the config's: 64 MNIST, 256 "
                              "CIFAR-10).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per window.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed windows (the median is reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_OBJECTIVE = flags.DEFINE_string("objective", "", "ddpm | flow ('' = the config's: flow on "
                                 "MNIST, ddpm on CIFAR-10).")
_DEPTH = flags.DEFINE_integer("depth", 0, "Override the number of blocks (0 = the size's).")
_WIDTH = flags.DEFINE_integer("width", 0, "Override the hidden size (0 = the size's).")
_HEADS = flags.DEFINE_integer("heads", 0, "Override the number of heads (0 = the size's).")
_BASELINE = flags.DEFINE_string("baseline_mixer", "linear", "Token mixer of the baseline timed "
                                "in the same run ('linear' = LiT; '' = no baseline).")
_PEAK = flags.DEFINE_enum("peak", "auto", ["auto", "bf16", "tf32", "fp32"], "Which GPU peak "
                          "column MFU is computed against (auto: the precision the step runs "
                          "at).")
_JSON = flags.DEFINE_string("json", "", "Also write the results to this JSON file.")

# Dense peak TFLOP/s per device (NVIDIA data sheets; tensor cores without sparsity for bf16 and
# tf32, the CUDA cores for fp32). Matched in order: every substring must be in `device_kind`.
PEAK_TFLOPS: tuple[tuple[tuple[str, ...], str, dict[str, float]], ...] = (
    (("H100", "PCIe"), "H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    (("H100",), "H100 SXM", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (("H200",), "H200 SXM", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (("A100",), "A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
)


def gpu_peak(device_kind: str) -> tuple[str, dict[str, float]] | None:
  """(name, {precision: dense TFLOP/s}) of a known GPU, or None."""
  for needles, name, peaks in PEAK_TFLOPS:
    if all(n.lower() in device_kind.lower() for n in needles):
      return name, peaks
  return None


def matmul_precision() -> str:
  """The tensor-core precision float32 matmuls run at on a GPU under jax's current default
  matmul precision: fp32 when it asks for full precision, bf16 when it asks for bf16, else
  tf32 (the default lets XLA use TF32)."""
  setting = str(jax.config.jax_default_matmul_precision or "default").lower()
  if setting in ("highest", "float32", "f32_f32_f32"):
    return "fp32"
  if setting in ("bfloat16", "bf16_bf16_f32"):
    return "bf16"
  return "tf32"


def matmul_tflops(size: int, repeats: int = 20) -> float:
  """float32 matmul throughput of the default device in TFLOP/s (benchmarks.machine)."""
  return machine.matmul_gflops(size, repeats) / 1e3


def choose_peak(peak: str, measured_tflops: float) -> dict[str, Any]:
  """The peak MFU is computed against (module docstring), with a sentence saying which;
  `measured_tflops` (this device's float32 matmul throughput) serves where no peak is known."""
  device = jax.devices()[0]
  known = gpu_peak(device.device_kind) if device.platform == "gpu" else None
  if known is None:
    return {"tflops": measured_tflops, "bf16_tflops": None, "source": "measured",
            "text": f"the float32 matmul throughput of this {device.device_kind} measured now "
                    f"({1000 * measured_tflops:.0f} GFLOP/s)"
                    + ("" if device.platform == "cpu" else "; no data-sheet peak known for it")}
  name, peaks = known
  precision = matmul_precision() if peak == "auto" else peak
  return {"tflops": peaks[precision], "bf16_tflops": peaks["bf16"],
          "source": f"{name} {precision}",
          "text": f"{name} dense {precision} peak {peaks[precision]:.1f} TFLOP/s (data sheet; "
                  + ("float32 weights and activations under jax's default matmul precision "
                     "run on TF32 tensor cores" if peak == "auto" and precision == "tf32" else
                     "chosen by --peak" if peak != "auto" else
                     f"jax_default_matmul_precision={jax.config.jax_default_matmul_precision}")
                  + ")"}


def dit_config_for(*, data: str, size: str, patch: int, objective: str, mixer: str,
                   batch: int, depth: int = 0, width: int = 0, heads: int = 0):
  """`experiments/configs/dit.py` with these settings, and the batch size and model overrides."""
  arg = f"data={data},size={size},patch={patch},objective={objective},mixer={mixer}"
  config = dit_config.get_config(arg)
  if batch:
    config.train.batch_size = batch
  if depth:
    config.model.depth = depth
  if width:
    config.model.hidden_size = width
  if heads:
    config.model.num_heads = heads
  return config


def time_train_step(config: Any, *, steps: int, repeats: int, warmup: int) -> dict[str, Any]:
  """`machine.time_train_step` (module docstring), with the image's token count."""
  built = machine.build_train_step(config)
  row = machine.time_train_step(config, steps=steps, repeats=repeats, warmup=warmup,
                                built=built)
  height, width, _ = built["task"].image_shape
  patch = int(config.model.patch_size)
  return dict(row, tokens=(height // patch) * (width // patch))


def model_name(config: Any) -> str:
  from paperzoo.models import dit  # pylint: disable=g-import-not-at-top
  model = config.model
  depth, width, heads = dit.SIZES[model.size]
  depth, width, heads = (int(model.depth) or depth, int(model.hidden_size) or width,
                         int(model.num_heads) or heads)
  family = "LiT" if model.mixer == "linear" else "DiT"
  mixer = "" if model.mixer in ("attention", "linear") else f", mixer {model.mixer}"
  return f"{family}-{model.size}/{model.patch_size} ({depth} x {width}, {heads} heads{mixer})"


def run_benchmark(*, data: str = "mnist", size: str = "", patch: int = 0, batch: int = 0,
                  steps: int = 10, repeats: int = 3, warmup: int = 2, objective: str = "",
                  depth: int = 0, width: int = 0, heads: int = 0,
                  baseline_mixer: str = "linear", peak: str = "auto",
                  print_fn: Callable[[str], None] = print) -> dict[str, Any]:
  """Times DiT (and the baseline mixer) with these settings, prints the lines the module
  docstring describes and returns them as a dict."""
  device = jax.devices()[0]
  measured = matmul_tflops(1024 if device.platform == "cpu" else 8192)
  chosen_peak = choose_peak(peak, measured)
  print_fn(f"machine: {jax.device_count()} x {device.device_kind} ({device.platform}), jax "
           f"{jax.__version__}; float32 matmul {1000 * measured:.0f} GFLOP/s (measured now)")
  print_fn(f"peak used for MFU: {chosen_peak['text']}")
  settings = dict(data=data, size=size, patch=patch, objective=objective, batch=batch,
                  depth=depth, width=width, heads=heads)
  rows = []
  for mixer in ["attention"] + ([baseline_mixer] if baseline_mixer else []):
    config = dit_config_for(mixer=mixer, **settings)
    row = time_train_step(config, steps=steps, repeats=repeats, warmup=warmup)
    row.update(model=model_name(config), mixer=mixer, data=data,
               objective=config.task.objective,
               mfu=row["achieved_tflops"] / chosen_peak["tflops"],
               mfu_bf16=(row["achieved_tflops"] / chosen_peak["bf16_tflops"]
                         if chosen_peak["bf16_tflops"] else None))
    rows.append(row)
    print_fn(f"{row['model']} on {data}, {row['objective']}, {row['tokens']} tokens, "
             f"{row['num_params'] / 1e6:.2f}M parameters, batch {row['batch']}: "
             f"{row['images_per_second']:.1f} images/s ({1000 * row['step_seconds']:.1f} ms/step,"
             f" median of {repeats} x {steps} steps; compile {row['compile_seconds']:.1f} s)")
    print_fn(f"  {row['step_gflop']:.2f} GFLOP/step (XLA cost analysis: forward, backward, "
             f"optimizer) -> {1000 * row['achieved_tflops']:.1f} GFLOP/s = MFU "
             f"{100 * row['mfu']:.1f}% of the peak above"
             + (f" ({100 * row['mfu_bf16']:.2f}% of the dense bf16 peak)"
                if row["mfu_bf16"] is not None else ""))
  result = {"jax_version": jax.__version__, "device": device.device_kind,
            "platform": device.platform, "matmul_tflops": measured, "peak": chosen_peak,
            "rows": rows}
  if len(rows) == 2:
    dit_row, base = rows
    result["throughput_ratio"] = dit_row["images_per_second"] / base["images_per_second"]
    result["flop_ratio"] = dit_row["step_gflop"] / base["step_gflop"]
    print_fn(f"baseline {base['model']} ({baseline_mixer} mixer), same run: DiT / baseline "
             f"images/s = {result['throughput_ratio']:.2f}x; FLOPs per step "
             f"{result['flop_ratio']:.2f}x the baseline's")
  return result


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  result = run_benchmark(
      data=_DATA.value, size=_SIZE.value, patch=_PATCH.value, batch=_BATCH.value,
      steps=_STEPS.value, repeats=_REPEATS.value, warmup=_WARMUP.value,
      objective=_OBJECTIVE.value, depth=_DEPTH.value, width=_WIDTH.value, heads=_HEADS.value,
      baseline_mixer=_BASELINE.value, peak=_PEAK.value)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  app.run(main)
