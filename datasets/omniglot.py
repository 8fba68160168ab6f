"""Omniglot read straight from the official zip files (zipfile + Pillow; nothing unpacked, nothing downloaded).

Where the zips are: ``METASHRINK_OMNIGLOT_DIR`` if set, else ``../shared/data/omniglot`` next to the repository
(the minimal background splits used for development and tests), else an explicit ``directory``. The Omniglot
authors publish the zips at https://github.com/brendenlake/omniglot (``python/images_background.zip``,
``images_evaluation.zip``, and the minimal ``images_background_small1/2.zip``); point the setting at a folder
holding any of them. The zips are never copied into the repository.

Every ``images_*.zip`` of the folder is read (or the ``files`` given); classes are keyed by ALPHABET/characterNN
and de-duplicated across zips (Greek and Latin are in both minimal zips). Images are inverted: strokes are 255
(1.0 as float), background 0. The decoded, resized array is cached per process.
"""
from __future__ import annotations

import functools
import glob
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .upload import combine_image_collections, validate_image_zip

ENV_VAR = "METASHRINK_OMNIGLOT_DIR"
REPO_ROOT = Path(__file__).resolve().parent.parent


def default_directory() -> Path:
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    return (REPO_ROOT.parent / "shared" / "data" / "omniglot").resolve()


def zip_files(directory=None, files: Optional[Sequence[str]] = None) -> list:
    d = Path(directory) if directory else default_directory()
    if files:
        paths = [p if Path(p).is_absolute() else d / p for p in files]
    else:
        paths = sorted(glob.glob(str(d / "images_*.zip")))
    paths = [Path(p) for p in paths]
    missing = [str(p) for p in paths if not p.is_file()]
    if not paths or missing:
        raise FileNotFoundError(
            f"Omniglot zip files not found ({missing or str(d / 'images_*.zip')}). Download them from "
            f"https://github.com/brendenlake/omniglot (python/images_background.zip etc.) and set {ENV_VAR} "
            f"to their folder, or upload them as a dataset.")
    return paths


@functools.lru_cache(maxsize=4)
def _load(paths: tuple, image_size: Optional[int]) -> dict:
    colls = [validate_image_zip(Path(p).read_bytes(), Path(p).name, image_size=image_size, invert=True)
             for p in paths]
    coll = combine_image_collections(colls)
    out = coll.to_arrays()
    counts = {len(a) for a in coll.images}
    out["drawers"] = sorted(counts)
    out["images"].setflags(write=False)
    return out


def load_omniglot(directory=None, files: Optional[Sequence[str]] = None, image_size: Optional[int] = 28) -> dict:
    """``{"images": uint8 [characters, 20, S, S] (read-only, cached), "groups": [alphabet id], "class_names":
    ["Alphabet/characterNN"], "group_names": [alphabet]}``; ``image_size=None`` keeps 105x105."""
    paths = tuple(str(p.resolve()) for p in zip_files(directory, files))
    return _load(paths, image_size)


def loader(cfg: dict) -> dict:
    """The ``core.tasks`` source loader for ``{"family": "image_classes", "source": "omniglot", ...}``."""
    data = load_omniglot(cfg.get("data_dir"), cfg.get("files"), cfg.get("image_size") or None)
    return {**data, "images": np.array(data["images"])}  # a writable copy for torch.as_tensor
