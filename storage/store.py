"""Where a store lives and how to reach it.

A store is any fsspec URL: a local folder (the default), ``memory://`` in tests, ``s3://bucket/prefix``
in production. S3 credentials and the endpoint come from the standard AWS environment variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``), never from the command line,
so they cannot end up in shell history, logs or run parameters.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import re
import shutil
import uuid
from dataclasses import dataclass, field

import fsspec
from fsspec.implementations.local import LocalFileSystem

DEFAULT_STORE = os.path.join(os.path.expanduser("~"), ".gptpipe", "store")


class StoreError(Exception):
    """A problem the user can fix: its message is the one line they see."""


NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_name(name: str, what: str = "sweep") -> None:
    """Sweep, model and evaluation names: one folder of the store each, nothing else."""
    if not isinstance(name, str) or not NAME.match(name):
        raise StoreError(f"invalid {what} name {name!r}: use letters, digits, '.', '_' and '-' (at most 128)")


def default_store_url() -> str:
    return os.environ.get("GPTPIPE_STORE", DEFAULT_STORE)


def _s3_options() -> dict:
    """s3fs options from the AWS environment. botocore reads the keys itself; the endpoint we pass on
    explicitly because older botocore releases ignore ``AWS_ENDPOINT_URL``."""
    options: dict = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_url"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options.setdefault("client_kwargs", {})["region_name"] = region
    return options


def is_object_store(url: str) -> bool:
    """Object stores have buckets that must exist; folder-like stores are created on first write."""
    return url.split("://", 1)[0] in ("s3", "s3a", "gs", "gcs", "az", "abfs") if "://" in url else False


def redact(text: str) -> str:
    """Remove the secret key (and the access key id) from a message before anyone sees it."""
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"):
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


@dataclass
class Store:
    """A store root on some filesystem. ``path(...)`` gives filesystem paths below the root."""

    url: str
    fs: fsspec.AbstractFileSystem
    root: str
    options: dict = field(default_factory=dict)  # fsspec storage options (endpoint; never secrets)

    @property
    def protocol(self) -> str:
        protocol = self.fs.protocol
        return protocol[0] if isinstance(protocol, (tuple, list)) else protocol

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        """The filesystem path of ``parts`` below the root; a part that is absolute or climbs out with
        ``..`` is refused, whoever passed it (a flow parameter, a name in a file)."""
        for part in parts:
            if part.startswith(("/", "\\")) or ".." in part.replace("\\", "/").split("/"):
                raise StoreError(f"path {part!r} leaves the store")
        return posixpath.join(self.root, *parts) if parts else self.root

    def full_url(self, *parts: str) -> str:
        """A URL other libraries (DuckDB, zarr) can open: plain path locally, protocol://path else."""
        p = self.path(*parts)
        return p if self.is_local else f"{self.protocol}://{p}"

    def refresh(self, *parts: str) -> None:
        """Forget cached listings (s3fs keeps them per filesystem instance), so that objects other
        processes wrote since are seen: of ``parts`` and its parents, or of everything."""
        if parts:
            self.fs.invalidate_cache(self.path(*parts))
        else:
            self.fs.invalidate_cache()

    def exists(self, *parts: str) -> bool:
        self.refresh(*parts)  # a cached listing of the parent would hide a newer object
        return self.fs.exists(self.path(*parts))

    def read_json(self, *parts: str):
        # one GET of the whole object: no size lookup that a cached listing could make stale
        return json.loads(self.fs.cat_file(self.path(*parts)))

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Write a whole object so that readers see either nothing or all of it. Object stores give
        that for a single PUT; on a local disk we write a temporary file and rename it."""
        if not self.is_local:
            self.fs.pipe_file(self.path(*parts), data)
            return
        self._write_local(lambda f: f.write(data), parts, os.replace)

    def put_file(self, local_path: str, *parts: str) -> None:
        """``write_bytes`` for the file ``local_path`` on this machine, copied in pieces (a paper-size G.pt
        state is ~6 GB: never all in memory at once). Readers see the old object or the whole new one."""
        if not self.is_local:
            self.fs.put_file(local_path, self.path(*parts))  # one PUT, or a multipart upload completed at once
            return

        def copy(f):
            with open(local_path, "rb") as src:
                shutil.copyfileobj(src, f, 16 * 2**20)

        self._write_local(copy, parts, os.replace)

    def local_path(self, *parts: str) -> str | None:
        """The object's path on this machine where the store is a local folder, else None."""
        return self.path(*parts) if self.is_local else None

    def get_file(self, local_path: str, *parts: str) -> None:
        """Download an object to the file ``local_path``, in pieces."""
        self.fs.get_file(self.path(*parts), local_path)

    def create_bytes(self, data: bytes, *parts: str) -> bool:
        """Write a whole object only if there is none yet; False (nothing written) if another writer was
        first. Atomic on a local disk (a hard link fails on an existing name) and on S3 (a PUT with
        If-None-Match: *), so of two writers racing exactly one wins."""
        if not self.is_local:
            try:
                self.fs.pipe_file(self.path(*parts), data, mode="create")
            except FileExistsError:
                return False
            except OSError as e:  # SeaweedFS answers 412 without naming the condition: s3fs says EINVAL
                if e.errno == errno.EINVAL and self.exists(*parts):
                    return False
                raise
            self.refresh(*parts)
            return True
        try:
            self._write_local(lambda f: f.write(data), parts, os.link)
        except FileExistsError:
            return False
        return True

    def _write_local(self, fill, parts: tuple[str, ...], publish) -> None:
        """``fill(file)`` writes into a synced temporary file beside the target, then ``publish(tmp, target)`` (rename:
        replace; link: create only). The temporary file never outlives the call; a failure (a full disk)
        is one line naming the store, the old object intact. FileExistsError passes through."""
        target = self.path(*parts)
        tmp = f"{target}.tmp-{uuid.uuid4().hex}"
        try:
            self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
            with open(tmp, "wb") as f:
                fill(f)
                f.flush()
                os.fsync(f.fileno())
            publish(tmp, target)
        except FileExistsError:
            raise
        except OSError as e:
            raise StoreError(f"cannot write {'/'.join(parts)} in store {self.url}: {e.strerror or e}") from None
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def write_json(self, obj, *parts: str) -> None:
        self.write_bytes(json.dumps(obj, indent=2, sort_keys=True).encode(), *parts)

    def create_json(self, obj, *parts: str) -> bool:
        return self.create_bytes(json.dumps(obj, indent=2, sort_keys=True).encode(), *parts)

    def ls(self, *parts: str) -> list[str]:
        """Names (not paths) directly below ``parts``; empty if the folder does not exist."""
        try:
            entries = self.fs.ls(self.path(*parts), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)


def open_store(url: str | None = None, *, create: bool = False) -> Store:
    """Open (or, with ``create``, make) the store at ``url``. Raises StoreError with one clear line if
    it cannot be reached: a missing folder, an unknown bucket, wrong credentials."""
    url = url or default_store_url()
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    options = _s3_options() if protocol in ("s3", "s3a") else {}
    try:
        # a fresh instance, not fsspec's cached one: that would keep the credentials (and listings)
        # it was first made with, whatever the environment says now
        extra = {"skip_instance_cache": True} if protocol in ("s3", "s3a") else {}
        fs, root = fsspec.core.url_to_fs(url, **options, **extra)
    except (ImportError, ValueError) as e:
        raise StoreError(f"cannot open store {url}: {e}") from None
    root = root.rstrip("/") or "/"
    store = Store(url=url, fs=fs, root=root, options=options)
    try:
        if store.protocol in ("s3", "s3a"):
            _check_bucket(store)
        elif not fs.exists(root):
            if not create:
                raise StoreError(f"store {url} does not exist")
            fs.makedirs(root, exist_ok=True)
    except StoreError:
        raise
    except PermissionError:
        raise StoreError(f"access to store {url} denied: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY") from None
    except Exception as e:  # network errors, endpoint down: one line, no traceback, no secrets
        raise StoreError(redact(f"cannot reach store {url}: {type(e).__name__}: {e}").splitlines()[0]) from None
    return store


def _check_bucket(store: Store) -> None:
    bucket = store.root.split("/", 1)[0]
    try:
        store.fs.ls(bucket, refresh=True)
    except FileNotFoundError:
        raise StoreError(f"bucket {bucket} does not exist at {os.environ.get('AWS_ENDPOINT_URL', 'the S3 endpoint')}") from None
    except PermissionError:
        raise StoreError(f"access to s3://{bucket} denied: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY") from None
    except OSError as e:
        text = str(e)
        if any(k in text for k in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden")):
            raise StoreError(f"access to s3://{bucket} denied: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY") from None
        raise
