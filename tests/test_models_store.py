"""A model in the store is committed by its lineage, written last."""

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
