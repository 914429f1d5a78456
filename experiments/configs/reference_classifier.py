r"""The reference classifier of the generation metrics: a small CNN on MNIST or CIFAR-10.

Generated images are scored with this classifier (the accuracy of class-conditional samples,
and the Frechet distance in its feature space; `paperzoo.generation.metrics`). One run per data
set, in `cache_dir("reference_classifiers")/<data>`, is shared by every generation run on it;
`experiments.run` trains it there the first time a config that scores samples needs it
(`experiments.prerequisites`). The same run by hand:

  python -m experiments.run --workdir=$HOME/.cache/paperzoo/reference_classifiers/mnist \
      --config=experiments/configs/reference_classifier.py:data=mnist
  python -m experiments.run --workdir=$HOME/.cache/paperzoo/reference_classifiers/cifar10 \
      --config=experiments/configs/reference_classifier.py:data=cifar10

Arguments: data (mnist | cifar10), epochs (0: the data set's default), seed, runlocal (two
steps on MNIST, for smoke tests).

Model (`paperzoo.models.reference_cnn`): MNIST two stages of widths (16, 32) and 128 features;
CIFAR-10 three stages (32, 64, 128) and 256 features, dropout 0.3. Recipe: AdamW, learning rate
2e-3, 100 warmup steps then cosine decay, weight decay 1e-4, batch 128, gradient clipping at 1;
random crop (padding 2 on MNIST, 4 and a horizontal flip on CIFAR-10); model selection on the
validation split (10% of the training images); MNIST 15 epochs, CIFAR-10 40 epochs.
"""

from experiments.configs import common
from paperzoo.config import ConfigDict, base_config, parse_arg

DATA_SETS = ("mnist", "cifar10")


def get_config(arg: str | None = None) -> ConfigDict:
  arg = parse_arg(arg, data="mnist", epochs=0, seed=2021, runlocal=False)
  if arg.data not in DATA_SETS:
    raise ValueError(f"reference_classifier.py trains on {' or '.join(DATA_SETS)}, got "
                     f"data={arg.data!r}")
  cifar = arg.data == "cifar10"
  config = base_config()
  config.seed = arg.seed
  config.model = ConfigDict({
      "name": "reference_cnn",
      "channels": (32, 64, 128) if cifar else (16, 32),
      "hidden": 256 if cifar else 128,
      "dropout": 0.3 if cifar else 0.0,
  })
  config.data = common.classification_data(arg.data)
  config.task = common.classification_task(crop_padding=4 if cifar else 2, flip=cifar)
  config.train.batch_size = 128
  config.train.eval_batch_size = 500
  config.train.num_epochs = arg.epochs or (40 if cifar else 15)
  config.train.patience = 0
  config.train.log_every_steps = 50
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 2e-3
  config.optimizer.weight_decay = 1e-4
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 100
  config.optimizer.grad_clip_norm = 1.0
  if arg.runlocal:
    common.runlocal_classification(config)
    if cifar:  # runlocal_classification moved the data to MNIST: use the MNIST model
      config.model.update(channels=(16, 32), hidden=128, dropout=0.0)
  return config
