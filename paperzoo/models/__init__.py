"""Model zoo. Importing this package registers every model in `paperzoo.registry.MODELS`.

Forecasting models share one contract:
  `Model(config.model, *, seq_len, pred_len, num_variates, num_time_features, rngs)` and
  `model(batch, *, train, rngs=None) -> [B, pred_len, num_variates]`.
"""

from __future__ import annotations

from paperzoo.models import dlinear, itransformer  # noqa: F401  (registers the models)
