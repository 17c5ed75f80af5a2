"""A model in the store is committed by its lineage, written last."""

import os

from storage import models
from storage.store import open_store


def test_a_state_without_its_lineage_is_not_a_model(tmp_path):
    """What a reader sees between a first save's state and its lineage, or after a crash there: no model,
    step 0, and nothing to resume from (it is trained from scratch)."""
    store = open_store(str(tmp_path / "store"), create=True)
    state = tmp_path / "state.safetensors"
    state.write_bytes(b"weights")
    store.put_file(str(state), models.MODELS, "m", models.STATE)
    assert not models.exists(store, "m") and models.step(store, "m") == 0 and models.names(store) == []
    models.save(store, "m", str(state), {"step": 25}, [1.0, 0.5], b"png")
    assert models.exists(store, "m") and models.step(store, "m") == 25 and models.names(store) == ["m"]


def check_promote(store, tmp_path) -> None:
    """A model saved under a second name: the same state, log and plot, the source's lineage plus what is added."""
    state = tmp_path / "state.safetensors"
    state.write_bytes(os.urandom(3 * 2**20 + 5))
    models.save(store, "m-candidate1", str(state), {"step": 25, "seed": 1}, [1.0, 0.5], b"png")
    models.promote(store, "m-candidate1", "m", {"chosen": "m-candidate1"})
    read = lambda model, part: store.fs.cat_file(store.path(models.MODELS, model, part))
    assert read("m", models.STATE) == state.read_bytes() and read("m", models.LOSS_PLOT) == b"png"
    assert models.read_losses(store, "m") == [1.0, 0.5]
    source, promoted = models.read_lineage(store, "m-candidate1"), models.read_lineage(store, "m")
    assert promoted == {**source, "chosen": "m-candidate1"} and models.step(store, "m") == 25
    assert models.read_calibration(store, "m") is None  # none fitted: none made up
    models.write_calibration(store, "m-candidate1", {"step": 25, "u": [0.0, 1.0], "v": [0.0, 0.9]})
    models.promote(store, "m-candidate1", "m2", {"chosen": "m-candidate1"})
    assert models.read_calibration(store, "m2") == {"step": 25, "u": [0.0, 1.0], "v": [0.0, 0.9]}  # fitted: carried over


def test_promote_saves_a_model_under_a_second_name(tmp_path):
    check_promote(open_store(str(tmp_path / "store"), create=True), tmp_path)
