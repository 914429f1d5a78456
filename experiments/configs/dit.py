r"""DiT (Peebles & Xie 2023) class-conditional generation in pixel space, with a DDPM or a
flow-matching objective, and LiT (the linear diffusion transformer) as `mixer=linear`.

  # MNIST (28x28 padded to 32) on a CPU: DiT-tiny/4 with flow matching (rectified flow, SiT's
  # linear path, logit-normal training times), 1,800 steps: 97% of its samples class-correct
  python -m experiments.run --workdir=/tmp/dit_mnist \
      --config=experiments/configs/dit.py:data=mnist
  # the same with DDPM (eps prediction, learned variance, hybrid loss) and DDIM sampling
  python -m experiments.run --workdir=/tmp/dit_mnist_ddpm \
      --config=experiments/configs/dit.py:data=mnist,objective=ddpm
  # CIFAR-10 32x32, DiT-S/2 on a GPU (DiT's recipe: AdamW 1e-4, batch 256, EMA 0.9999, flips)
  python -m experiments.run --workdir=/tmp/dit_s2_cifar10 \
      --config=experiments/configs/dit.py:data=cifar10,size=S,patch=2
  # LiT: the same DiT with linear attention as its token mixer
  python -m experiments.run --workdir=/tmp/lit_s2_cifar10 \
      --config=experiments/configs/dit.py:data=cifar10,size=S,patch=2,mixer=linear

Arguments: data (mnist | cifar10), size (tiny | S | B | L | XL; "" = tiny on MNIST, S on
CIFAR-10), patch (0 = 4 on MNIST, 2 on CIFAR-10), objective (ddpm | flow; "" = flow on MNIST,
ddpm (DiT's) on CIFAR-10), mixer (attention |
linear (LiT) | any of paperzoo.layers.mixers; grid mixers see the patch grid), heads (0 = the
size's; LiT argues for few heads with linear attention), sampler ("" = ddim for ddpm on MNIST,
ddpm (DiT's 250 respaced steps) on CIFAR-10, euler for flow), sampling_steps (0 = the variant's),
guidance (0 = the variant's scale), steps (training steps, 0 = the variant's), time_sampling
(flow's training times: uniform | logit_normal; "" = logit_normal on MNIST, uniform (SiT's) on
CIFAR-10), seed, runlocal.

MNIST recipe (CPU): DiT-tiny/4 narrowed to 4 blocks of width 96 (an 8x8 token grid, 0.73M
parameters), flow matching with logit-normal training times (SD3's; with objective=ddpm:
learned variance and the hybrid loss), class dropout 0.1, AdamW lr 2e-3 (warmup 100 steps,
cosine to 0.1x), batch 64, EMA 0.995, 1,800 steps, validation every 500 steps over 4 timesteps;
then 50 samples per class with 25 Euler (flow) or DDIM (ddpm) steps and guidance 4, scored with
the reference MNIST classifier (paperzoo.generation.metrics), which `experiments.run` trains
first when it is missing. Logit-normal training times reach in 1,800 steps what uniform ones
(SiT's, `time_sampling=uniform`) need about 4,000 for. Results and their commands:
experiments/results/generation.md; the time-sampling comparison: generation_notes.md there.
CIFAR-10 recipe (GPU): DiT-S/2, AdamW lr 1e-4 with no
weight decay, batch 256, EMA 0.9999, horizontal flips, 200,000 steps, 250 respaced DDPM steps,
guidance 1.5 (DiT's FID setting), 1,000 samples per class.

runlocal: a 1-block width-16 DiT/8 on MNIST, two steps of batch 8, 2 evaluation timesteps, no
sample scoring (`samples_per_class=0`: no reference classifier needed; raise it and the
two-step runlocal reference classifier is trained first), 4 sampling steps for the pictures.
"""

from experiments.configs import common
from paperzoo.config import ConfigDict, base_config, parse_arg

DEFAULT_SAMPLERS = {"ddpm": "ddim", "flow": "euler"}


def get_config(arg: str | None = None) -> ConfigDict:
  arg = parse_arg(arg, data="mnist", size="", patch=0, objective="", mixer="attention",
                  heads=0, sampler="", sampling_steps=0, guidance=0.0, steps=0,
                  time_sampling="", seed=2021,
                  runlocal=False)
  if arg.data not in ("mnist", "cifar10"):
    raise ValueError(f"dit.py generates mnist or cifar10, got data={arg.data!r}")
  mnist = arg.data == "mnist"
  objective = arg.objective or ("flow" if mnist else "ddpm")
  if objective not in DEFAULT_SAMPLERS:
    raise ValueError(f"unknown objective {objective!r}; valid: {', '.join(DEFAULT_SAMPLERS)}")
  config = base_config()
  config.seed = arg.seed

  config.data = common.classification_data(arg.data)
  sampler = arg.sampler or ("ddpm" if not mnist and objective == "ddpm"
                            else DEFAULT_SAMPLERS[objective])
  config.task = ConfigDict({
      "name": "diffusion",
      "objective": objective,
      "num_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,  # DDPM's linear schedule
      "vlb_weight": 0.001,  # improved DDPM's lambda
      "image_size": 32,  # MNIST's 28x28 padded to 32
      "flip": not mnist,
      "eval_timesteps": 4 if mnist else 10,
      "sampler": sampler,
      "sampling_steps": arg.sampling_steps or (25 if mnist else 250),
      # flow: training times U(0, 1) (SiT) or logit-normal (SD3); validation is stratified.
      "flow_time_sampling": arg.time_sampling or ("logit_normal" if mnist else "uniform"),
      "ddim_eta": 0.0,
      "clip_denoised": True,
      "guidance_scale": arg.guidance or (4.0 if mnist else 1.5),
      "samples_per_class": 50 if mnist else 1000,
      "sample_batch_size": 250 if mnist else 1000,
      "sample_seed": 0,
      # FID's Inception weights (.npz; how to get them: paperzoo/generation/inception.py); a
      # path adds standard FID to the final metrics, "" = off (no such weights offline).
      "inception_weights": "",
      **common.reference_classifier(arg.data, runlocal=arg.runlocal),
  })

  size = arg.size or ("tiny" if mnist else "S")
  config.model = ConfigDict({
      **common.MIXER_DEFAULTS,
      "name": "dit", "size": size,
      # 0 keeps the size's value; the MNIST CPU model is tiny narrowed to fit 15 minutes.
      "depth": 4 if mnist and size == "tiny" else 0,
      "hidden_size": 96 if mnist and size == "tiny" else 0,
      "num_heads": arg.heads,
      "patch_size": arg.patch or (4 if mnist else 2),
      "learn_sigma": objective == "ddpm",  # flow matching predicts a velocity only
      "class_dropout_prob": 0.1,
      "mixer": arg.mixer,
      "mlp_ratio": 4.0,
      "init": "lecun",
  })

  config.train.batch_size = 64 if mnist else 256
  config.train.eval_batch_size = 400 if mnist else 1000
  config.train.num_steps = arg.steps or (1_800 if mnist else 200_000)
  config.train.eval_every_steps = 500 if mnist else 10_000
  config.train.patience = 0
  config.train.ema_decay = 0.995 if mnist else 0.9999
  config.train.log_every_steps = 50 if mnist else 500
  config.train.checkpoint_every_steps = 0 if mnist else 10_000
  config.optimizer.name = "adamw"
  config.optimizer.weight_decay = 0.0
  if mnist:
    config.optimizer.learning_rate = 2e-3
    config.optimizer.warmup_steps = 100
    config.optimizer.schedule = "cosine"
    config.optimizer.min_lr_ratio = 0.1
    config.optimizer.grad_clip_norm = 1.0
  else:
    config.optimizer.learning_rate = 1e-4
    config.optimizer.schedule = "constant"

  if arg.runlocal:
    common.runlocal(config)
    config.data = common.classification_data("mnist")
    config.task.update(flip=False, eval_timesteps=2, sampling_steps=4, samples_per_class=0,
                       sample_batch_size=16)
    config.model.update(size="tiny", depth=1, hidden_size=16, num_heads=2, patch_size=8)
  return config
