"""Loading a hub dataset, or a local copy of it, with a clear error when the hub cannot be reached."""

from __future__ import annotations

import os
from collections.abc import Sequence

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk


_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}


class DatasetUnavailableError(RuntimeError):
    """The dataset could neither be loaded from the Hugging Face Hub nor from the given local path."""


def _download_hint(repo_id: str, config: str | None) -> str:
    where = f"./{repo_id.split('/')[-1]}"
    subset = f" (subset {config!r} is the folder {config}/ of the download)" if config else ""
    return (
        f"Download it where the Hub is reachable, e.g. `huggingface-cli download {repo_id} --repo-type dataset "
        f"--local-dir {where}`, copy that folder here and pass `local_path={where!r}`{subset}. `local_path` may also "
        "be a list of parquet/json/jsonl/csv files, or a folder written by `Dataset.save_to_disk`."
    )


def _load_files(files: Sequence[str]) -> Dataset:
    extensions = {os.path.splitext(f)[1].lower() for f in files}
    if len(extensions) != 1 or next(iter(extensions)) not in _FORMATS:
        raise DatasetUnavailableError(f"Local data files must share one of {sorted(_FORMATS)} extensions: {files}")
    return load_dataset(_FORMATS[extensions.pop()], data_files=list(files), split="train")


def load_split(repo_id: str, split: str, config: str | None = None, local_path=None) -> Dataset:
    """One split of `repo_id` (subset `config`), from the hub or from `local_path`.

    `local_path`: a downloaded copy of the dataset repository (a folder; a subset lives in its `config/` sub-folder
    when there is one), a folder written by `save_to_disk`, a data file, or a list of data files (all rows are taken).

    Raises:
        DatasetUnavailableError: naming the dataset and saying how to download it and pass `local_path`.
    """
    if local_path is not None:
        if isinstance(local_path, list | tuple):
            return _load_files([str(p) for p in local_path])
        path = str(local_path)
        if os.path.isfile(path):
            return _load_files([path])
        if not os.path.isdir(path):
            raise DatasetUnavailableError(f"local_path {path!r} for {repo_id} does not exist.")
        if any(
            os.path.exists(os.path.join(path, f)) for f in ("dataset_info.json", "dataset_dict.json", "state.json")
        ):
            loaded = load_from_disk(path)
            return loaded[split] if isinstance(loaded, DatasetDict) else loaded
        if config and os.path.isdir(os.path.join(path, config)):
            path, config = os.path.join(path, config), None
        try:
            return load_dataset(path, config, split=split)
        except Exception as exc:
            raise DatasetUnavailableError(
                f"Could not read split {split!r} of the local copy of {repo_id} at {path!r}: {exc}"
            ) from exc
    try:
        return load_dataset(repo_id, config, split=split)
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get(
            "HF_DATASETS_OFFLINE", "0"
        ) not in ("0", "")
        reason = (
            "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and it is not in the local cache"
            if offline
            else "the Hub could not be reached, or the name, subset or split is wrong"
        )
        raise DatasetUnavailableError(
            f"Could not load the dataset {repo_id!r}{f' (subset {config!r})' if config else ''}, split {split!r}: "
            f"{reason} ({type(exc).__name__}: {str(exc)[:200]}). " + _download_hint(repo_id, config)
        ) from exc
