"""paperzoo: transformer-family papers as runnable, config-driven JAX/Flax experiments.

    import paperzoo
    results = paperzoo.train_and_evaluate(config, "/tmp/run")

where `config` is a ConfigDict, e.g. the one `experiments/configs/itransformer.py` builds. The
library never imports the experiment layer: configs, grids and command lines live there.
"""

from flax import nnx

from paperzoo.trainer import train_and_evaluate

# paperzoo's layers name their weights' axes logically ("embed", "mlp", ...); paperzoo.sharding
# maps the names to mesh axes. Flax's eager sharding would read them as mesh axis names instead,
# and would demand a mesh just to build a model in a notebook, so it is off.
nnx.use_eager_sharding(False)

__all__ = ["train_and_evaluate"]
__version__ = "0.1.0"
