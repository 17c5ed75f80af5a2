"""Checkpoint parameters as a chunked Zarr array ``float32 [run, ckpt, param]``.

One chunk holds one run's whole block, so each writer owns the chunks it writes: concurrent shards
never touch the same object, which is the only safe way to write Zarr concurrently on object storage.
"""

from __future__ import annotations

import hashlib

import numpy as np
import zarr
from zarr.errors import ContainsArrayError
from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper
from zarr.storage import FsspecStore, LocalStore

from storage.store import Store


def _zarr_store(store: Store, *parts: str, read_only: bool = False):
    if store.is_local:
        return LocalStore(store.path(*parts), read_only=read_only)
    # the store's own filesystem instance, so zarr uses the credentials open_store checked (a new
    # instance from the URL would come from fsspec's cache, with whatever credentials it was first
    # made with, and an asynchronous s3fs instance leaves its HTTP session unclosed when dropped)
    fs = AsyncFileSystemWrapper(store.fs, asynchronous=True)
    return FsspecStore(fs, path=store.path(*parts), read_only=read_only)


def create_params(store: Store, parts: tuple[str, ...], n_runs: int, n_ckpts: int, n_params: int) -> zarr.Array:
    """Create the array, or open it if a previous (interrupted) collection already made it."""
    shape = (n_runs, n_ckpts, n_params)
    try:
        arr = zarr.open_array(_zarr_store(store, *parts), mode="r+")
        if arr.shape != shape:
            raise ValueError(f"{'/'.join(parts)} has shape {arr.shape}, expected {shape}")
        return arr
    except FileNotFoundError:
        pass
    try:
        return zarr.create_array(
            _zarr_store(store, *parts),
            shape=shape,
            chunks=(1, n_ckpts, n_params),
            dtype="float32",
            fill_value=np.nan,
        )
    except ContainsArrayError:  # another collect of the sweep created it between our look and now
        return create_params(store, parts, n_runs, n_ckpts, n_params)


def write_rows(store: Store, parts: tuple[str, ...], matrix: np.ndarray, rows_per_chunk: int = 1024) -> zarr.Array:
    """A whole 2-D float32 array ``[row, param]`` written once (e.g. an evaluation's generated parameters)."""
    arr = zarr.create_array(_zarr_store(store, *parts), shape=matrix.shape, chunks=(rows_per_chunk, matrix.shape[1]),
                            dtype="float32", fill_value=np.nan, overwrite=True)
    arr[:] = matrix.astype(np.float32)
    return arr


def open_params(store: Store, *parts: str) -> zarr.Array:
    try:
        return zarr.open_array(_zarr_store(store, *parts, read_only=True), mode="r")
    except FileNotFoundError:
        raise FileNotFoundError(f"no parameter array at {store.url}/{'/'.join(parts)}") from None


def digest(block: np.ndarray) -> str:
    """sha256 of a block as little-endian float32 in C order (the catalog's ``digest`` column)."""
    return hashlib.sha256(np.ascontiguousarray(block, dtype="<f4")).hexdigest()  # hashed in place: no copy
