"""Data sets for metashrink: Omniglot from its official zips and validated user uploads.

Importing this package registers the ``omniglot`` and ``dataset`` sources with ``core.tasks`` (core/ itself
imports only torch, numpy and the standard library, so data is injected through that registry).
"""
from core.tasks import register_source

from . import omniglot, upload
from .omniglot import load_omniglot
from .registry import dataset_loader, register_dataset, unregister_dataset
from .upload import (ImageCollection, RegressionCollection, UploadError, combine_image_collections,
                     validate_image_zip, validate_regression, validate_upload)

register_source("omniglot", omniglot.loader)
register_source("dataset", dataset_loader)

__all__ = ["load_omniglot", "ImageCollection", "RegressionCollection", "UploadError", "combine_image_collections",
           "validate_image_zip", "validate_regression", "validate_upload", "register_dataset",
           "unregister_dataset", "dataset_loader", "omniglot", "upload"]
