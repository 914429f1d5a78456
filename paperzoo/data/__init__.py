"""Data sets: files on disk (never downloaded) and the loaders registered in `DATASETS`.

Importing this package registers every data set, which is what `DATASETS.get` relies on. Each
is registered with the kind of data it holds (`paperzoo.registry.DATA_KINDS`):
`DATASETS.names(["image"])` lists the image data sets.
"""

from __future__ import annotations

import importlib
import pkgutil

from paperzoo.data import classification, forecasting
from paperzoo.data.files import DataFileError, data_dir, data_file
from paperzoo.data.forecasting import (ForecastingData, WindowDataset, load_custom_csv, load_ett,
                                       load_forecasting, time_features)

__all__ = [
    "DataFileError", "ForecastingData", "WindowDataset", "classification",
    "data_dir", "data_file", "forecasting", "load_custom_csv", "load_ett", "load_forecasting",
    "time_features",
]

# Every module here is imported with the package, so a module that registers a data set is one
# new file, with no list to edit.
for _module in pkgutil.iter_modules(__path__):
  importlib.import_module(f"{__name__}.{_module.name}")
