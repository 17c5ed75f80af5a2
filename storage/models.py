"""G.pt models in the store: everything under ``models/``, in one place.

``models/<model>/``:
    state.safetensors   raw + EMA weights, optimiser state, configs, step (resumable; no pickle)
    train_log.csv       step, loss
    train_loss.png      the training loss curve
    card.html           the model card: lineage, training curve and settings, its evaluations (one file)
    calibration.json    the prompt calibration fitted for the model's step (``gptpipe.evaluation.calibration``)
    lineage.json        sweeps, catalog digest, held-out runs, the training config, code version;
                        written last: a model whose lineage names step S has a state of at least step S
"""

from __future__ import annotations

import os
import tempfile
from datetime import datetime, timezone

from storage.store import Store, StoreError, check_name

MODELS, STATE, LINEAGE, LOG, LOSS_PLOT, CARD = "models", "state.safetensors", "lineage.json", "train_log.csv", "train_loss.png", "card.html"
CALIBRATION = "calibration.json"


def exists(store: Store, model: str) -> bool:
    """Whether the model has been saved: its lineage, written last, is the commit (a state alone is a
    save still under way, or one that crashed before its lineage)."""
    check_name(model, "model")
    return store.exists(MODELS, model, LINEAGE)


def names(store: Store) -> list[str]:
    return [m for m in store.ls(MODELS) if exists(store, m)]


def newest(store: Store) -> str:
    """The model trained (or resumed) most recently."""
    models = names(store)
    if not models:
        raise StoreError(f"no models in store {store.url}; train one with `gptpipe train`")
    return max(models, key=lambda m: read_lineage(store, m).get("updated_at", ""))


def read_lineage(store: Store, model: str) -> dict:
    check_name(model, "model")
    if not store.exists(MODELS, model, LINEAGE):
        raise StoreError(f"no model {model!r} in store {store.url} (models: {', '.join(names(store)) or 'none'})")
    return store.read_json(MODELS, model, LINEAGE)


def read_state(store: Store, model: str) -> bytes:
    read_lineage(store, model)  # one clear line if the model is missing
    return store.fs.cat_file(store.path(MODELS, model, STATE))


def local_state_path(store: Store, model: str) -> str | None:
    """The saved state's path on this machine where the store is a local folder (read it in place)."""
    read_lineage(store, model)
    return store.local_path(MODELS, model, STATE)


def download_state(store: Store, model: str, path: str) -> None:
    """The saved state into the file ``path``, in pieces."""
    read_lineage(store, model)
    store.get_file(path, MODELS, model, STATE)


def step(store: Store, model: str) -> int:
    """The step of the last save (0 for a model not saved yet)."""
    return read_lineage(store, model).get("step", 0) if exists(store, model) else 0


def read_losses(store: Store, model: str) -> list[float]:
    """The training loss of every step so far (the log ``save`` writes)."""
    lines = store.fs.cat_file(store.path(MODELS, model, LOG)).decode().splitlines()[1:]
    return [float(line.split(",")[1]) for line in lines]


def save(store: Store, model: str, state_path: str, lineage: dict, losses: list[float], loss_plot: bytes) -> None:
    """State (the file ``state_path``), log and plot first, lineage last (see the module docstring)."""
    check_name(model, "model")
    store.put_file(state_path, MODELS, model, STATE)
    log = "step,loss\n" + "".join(f"{i + 1},{v:.6g}\n" for i, v in enumerate(losses))
    store.write_bytes(log.encode(), MODELS, model, LOG)
    store.write_bytes(loss_plot, MODELS, model, LOSS_PLOT)
    now = datetime.now(timezone.utc).isoformat()
    store.write_json({**lineage, "created_at": lineage.get("created_at", now), "updated_at": now}, MODELS, model, LINEAGE)


def promote(store: Store, source: str, model: str, lineage: dict) -> None:
    """Save model ``source`` under the name ``model`` too, with ``lineage`` added to its own: the state
    (through a scratch file, in pieces), log and plot first, the lineage last (see the module docstring)."""
    check_name(model, "model")
    source_lineage = read_lineage(store, source)
    with tempfile.TemporaryDirectory(prefix="gptpipe-promote-") as scratch:
        path = os.path.join(scratch, STATE)
        store.get_file(path, MODELS, source, STATE)
        store.put_file(path, MODELS, model, STATE)
    for part in (LOG, LOSS_PLOT, CALIBRATION):  # the calibration too, where one was fitted (it is the same model)
        if part != CALIBRATION or store.exists(MODELS, source, part):
            store.write_bytes(store.fs.cat_file(store.path(MODELS, source, part)), MODELS, model, part)
    store.write_json({**source_lineage, **lineage}, MODELS, model, LINEAGE)


def read_calibration(store: Store, model: str) -> dict | None:
    """The prompt calibration fitted for the model's current step, or None (none yet, or an older step's)."""
    if not store.exists(MODELS, model, CALIBRATION):
        return None
    calibration = store.read_json(MODELS, model, CALIBRATION)
    return calibration if calibration.get("step") == step(store, model) else None


def write_calibration(store: Store, model: str, calibration: dict) -> None:
    store.write_json(calibration, MODELS, model, CALIBRATION)


def read_loss_plot(store: Store, model: str) -> bytes:
    return store.fs.cat_file(store.path(MODELS, model, LOSS_PLOT))


def write_card(store: Store, model: str, html: bytes) -> None:
    store.write_bytes(html, MODELS, model, CARD)
