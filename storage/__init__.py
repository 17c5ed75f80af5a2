"""The store: layout, Zarr parameter arrays, Parquet catalog and DuckDB (no torch, no Prefect)."""
