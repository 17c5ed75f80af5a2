"""S3 credentials from a Prefect block, for deployments whose workers should not hold keys themselves.

A flow run that names a block (its ``credentials`` parameter, else ``$GPTPIPE_CREDENTIALS_BLOCK`` on the
worker) puts the block's keys into its own process environment before it opens the store. From there
the store reads them exactly as it reads keys a worker was started with (``storage.store``), and
``storage.store.redact`` keeps them out of every error line. The parameter is the block's *name*: the
keys themselves never pass through parameters, logs or artifacts.

Two kinds of block are understood:
- a ``Secret`` (``secret/<name>``) whose value is JSON: ``{"aws_access_key_id": ..., "aws_secret_access_key":
  ..., "endpoint_url": ... (optional), "region_name": ... (optional)}``;
- prefect-aws's ``AwsCredentials`` (``aws-credentials/<name>``), where that package is installed.
"""

from __future__ import annotations

import os

from storage.store import StoreError

BLOCK_ENV = "GPTPIPE_CREDENTIALS_BLOCK"
# block field -> the environment variable the store reads it from
FIELDS = {"aws_access_key_id": "AWS_ACCESS_KEY_ID", "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
          "endpoint_url": "AWS_ENDPOINT_URL", "region_name": "AWS_REGION"}


def use_store_credentials(block: str | None) -> str | None:
    """Load the S3 credentials of Prefect block ``block`` (``<type>/<name>``; default ``$GPTPIPE_CREDENTIALS_BLOCK``)
    into this process's environment. Returns the block's name, or None where none is named."""
    name = block or os.environ.get(BLOCK_ENV)
    if not name:
        return None
    if "/" not in name:
        raise StoreError(f"credentials block {name!r}: name it as <type>/<name>, e.g. secret/{name}")
    from prefect.blocks.core import Block

    try:
        loaded = Block.load(name)
    except (ValueError, KeyError) as e:
        raise StoreError(f"credentials block {name!r} cannot be loaded: {str(e).splitlines()[0]}") from None
    values = _values(name, loaded)
    missing = [f for f in ("aws_access_key_id", "aws_secret_access_key") if not values.get(f)]
    if missing:
        raise StoreError(f"credentials block {name!r} has no {' or '.join(missing)}")
    for field, variable in FIELDS.items():
        if values.get(field):
            os.environ[variable] = str(values[field])
    return name


def _values(name: str, loaded) -> dict:
    """The block's fields as plain strings, whichever kind of block it is."""
    if hasattr(loaded, "aws_access_key_id"):  # prefect-aws AwsCredentials (not a dependency: duck-typed)
        secret = loaded.aws_secret_access_key
        client = getattr(loaded, "aws_client_parameters", None)
        return {"aws_access_key_id": loaded.aws_access_key_id,
                "aws_secret_access_key": secret.get_secret_value() if secret is not None else None,
                "region_name": getattr(loaded, "region_name", None),
                "endpoint_url": getattr(client, "endpoint_url", None)}
    if hasattr(loaded, "get"):  # prefect's Secret block
        value = loaded.get()
        if isinstance(value, dict):
            return value
    raise StoreError(f"credentials block {name!r} must be a Secret holding a JSON object with aws_access_key_id and "
                     f"aws_secret_access_key, or an AwsCredentials block")
