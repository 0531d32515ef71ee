"""Where uploads, result segments and finished results live, so that no process reads another's folder.

A blob store holds files under keys ("results/<task>/annotated.mp4"; the names are made in mesh/names.py).
Two implementations, chosen by `POSEMESH_BLOB_URL`:

- a local directory (the default: the data directory, one machine, or a volume all processes mount);
- S3-compatible object storage, `s3://<bucket>[/<prefix>]`: AWS S3, MinIO, Ceph RGW, GCS's XML API;
  `POSEMESH_S3_ENDPOINT_URL` points at a store that is not AWS, and credentials come the way boto3 finds
  them (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a web identity on Kubernetes, an instance profile).

What callers rely on, from both:
- `put_file` makes a whole file visible under its key at once, never a half-written one;
- `publish_dir` makes a set of files visible together, and only once: the first publisher wins, a second
  one learns that it lost (two annotate replicas may finish one task at the same time);
- reads stream in chunks: nothing loads a whole MP4 into memory.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

# Written last into a published folder: its presence means every file beside it is complete.
PUBLISHED_MARKER = ".published"
CHUNK = 1 << 20


class BlobStore(Protocol):
    def put_file(self, key: str, path: Path, move: bool = False) -> None:
        """Store the local file `path` under `key` (replacing what was there). `move`: `path` may be consumed."""

    def get_file(self, key: str, path: Path) -> None:
        """Copy the blob to the local file `path` (FileNotFoundError if there is none)."""

    def local_copy(self, key: str) -> contextlib.AbstractContextManager[Path | None]:
        """A local path holding the blob while the block runs (None if there is no such blob)."""

    def read_chunks(self, key: str, chunk: int = CHUNK) -> Iterator[bytes]:
        """The blob's bytes in chunks (FileNotFoundError on the first next() if there is none)."""

    def size(self, key: str) -> int | None:
        """The blob's size, or None if there is none."""

    def names(self, prefix: str) -> list[str]:
        """The names of the blobs directly under the folder `prefix` ("results/x/" -> ["a.mp4", ...])."""

    def publish_dir(self, prefix: str, local_dir: Path) -> bool:
        """Make every file of `local_dir` visible under the folder `prefix`, all at once and only the first
        time: False (and nothing changed) when something is already published there. Consumes local_dir."""

    def is_published(self, prefix: str) -> bool:
        """Whether publish_dir has completed for the folder `prefix`."""

    def delete_prefix(self, prefix: str) -> None:
        """Delete every blob whose key starts with `prefix` (a folder "a/b/" or a name start "a/.p-x-e")."""


class LocalBlobStore:
    """Blobs as files under `root`. A key is a relative path; a folder is made visible by one rename."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        parts = Path(key).parts
        if not parts or Path(key).is_absolute() or ".." in parts:
            raise ValueError(f"not a blob key: {key!r}")
        return self.root.joinpath(*parts)

    def put_file(self, key: str, path: Path, move: bool = False) -> None:
        target = self.path(key)
        if Path(path).resolve() == target.resolve():
            return  # already in place: the data directory is the store
        target.parent.mkdir(parents=True, exist_ok=True)
        if move:
            try:
                os.replace(path, target)
                return
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise
        # A copy becomes visible by rename only once whole.
        fd, tmp = tempfile.mkstemp(prefix=f".put-{target.name}-", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                shutil.copyfileobj(src, out, CHUNK)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if move:
            Path(path).unlink(missing_ok=True)

    def get_file(self, key: str, path: Path) -> None:
        shutil.copyfile(self.path(key), path)

    @contextlib.contextmanager
    def local_copy(self, key: str) -> Iterator[Path | None]:
        path = self.path(key)
        yield path if path.is_file() else None

    def read_chunks(self, key: str, chunk: int = CHUNK) -> Iterator[bytes]:
        with open(self.path(key), "rb") as f:
            while data := f.read(chunk):
                yield data

    def size(self, key: str) -> int | None:
        try:
            return self.path(key).stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    def names(self, prefix: str) -> list[str]:
        folder = self.path(prefix)
        return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []

    def publish_dir(self, prefix: str, local_dir: Path) -> bool:
        target = self.path(prefix)
        target.parent.mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / PUBLISHED_MARKER).touch()
        staged = Path(local_dir)
        if staged.stat().st_dev != target.parent.stat().st_dev:  # another disk: copy next to it first
            staged = Path(tempfile.mkdtemp(prefix=f".stage-{target.name}-", dir=target.parent))
            shutil.copytree(local_dir, staged, dirs_exist_ok=True)
            shutil.rmtree(local_dir, ignore_errors=True)
        try:
            os.rename(staged, target)  # refuses a non-empty folder: the first publisher wins
            return True
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            shutil.rmtree(staged, ignore_errors=True)
            return False

    def is_published(self, prefix: str) -> bool:
        return self.path(prefix).is_dir()

    def delete_prefix(self, prefix: str) -> None:
        if prefix.endswith("/"):
            shutil.rmtree(self.path(prefix), ignore_errors=True)
            return
        head = self.path(prefix)
        if head.parent.is_dir():
            for p in head.parent.glob(head.name + "*"):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)


class S3BlobStore:
    """Blobs as objects of one bucket under `prefix`. An object is visible whole once its PUT (or multipart
    upload) completes; a folder counts as published once its marker object exists, written after the rest."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, client=None):
        import boto3
        from boto3.s3.transfer import TransferConfig

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.client = client or boto3.client("s3", endpoint_url=endpoint_url or None)
        # Parts of 16 MiB, at most 4 at once: bounded memory for any file size.
        self.transfer = TransferConfig(multipart_threshold=16 << 20, multipart_chunksize=16 << 20,
                                       max_concurrency=4)

    def _key(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"not a blob key: {key!r}")
        return self.prefix + key

    def put_file(self, key: str, path: Path, move: bool = False) -> None:
        self.client.upload_file(str(path), self.bucket, self._key(key), Config=self.transfer)
        if move:
            Path(path).unlink(missing_ok=True)

    def get_file(self, key: str, path: Path) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.download_file(self.bucket, self._key(key), str(path), Config=self.transfer)
        except ClientError as e:
            if _missing(e):
                raise FileNotFoundError(key) from None
            raise

    @contextlib.contextmanager
    def local_copy(self, key: str) -> Iterator[Path | None]:
        with tempfile.TemporaryDirectory(prefix="posemesh-blob-") as folder:
            path = Path(folder) / Path(key).name
            try:
                self.get_file(key, path)
            except FileNotFoundError:
                yield None
                return
            yield path

    def read_chunks(self, key: str, chunk: int = CHUNK) -> Iterator[bytes]:
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except ClientError as e:
            if _missing(e):
                raise FileNotFoundError(key) from None
            raise
        with contextlib.closing(body):
            yield from body.iter_chunks(chunk)

    def size(self, key: str) -> int | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"]
        except ClientError as e:
            if _missing(e):
                return None
            raise

    def _keys(self, prefix: str, delimiter: str = "") -> Iterator[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._key(prefix), Delimiter=delimiter)
        for page in pages:
            for item in page.get("Contents", []):
                yield item["Key"]

    def names(self, prefix: str) -> list[str]:
        folder = self._key(prefix.rstrip("/") + "/")
        return sorted(k[len(folder):] for k in self._keys(prefix.rstrip("/") + "/", "/")
                      if k[len(folder):] != PUBLISHED_MARKER)

    def publish_dir(self, prefix: str, local_dir: Path) -> bool:
        folder = prefix.rstrip("/") + "/"
        try:
            if self.is_published(folder):
                return False
            # Two publishers racing here both upload the same task's result (segments joined the same way);
            # whichever PUT lands last leaves equal bytes. The marker goes last.
            for path in sorted(Path(local_dir).iterdir()):
                if path.is_file():
                    self.put_file(folder + path.name, path)
            self.client.put_object(Bucket=self.bucket, Key=self._key(folder + PUBLISHED_MARKER), Body=b"")
            return True
        finally:
            shutil.rmtree(local_dir, ignore_errors=True)

    def is_published(self, prefix: str) -> bool:
        return self.size(prefix.rstrip("/") + "/" + PUBLISHED_MARKER) is not None

    def delete_prefix(self, prefix: str) -> None:
        batch: list[dict] = []
        for key in self._keys(prefix):
            batch.append({"Key": key})
            if len(batch) == 1000:  # DeleteObjects takes at most 1000 keys
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
                batch = []
        if batch:
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})


def blob_sha256(store: BlobStore, key: str) -> str:
    """The hex sha256 of a blob, read in chunks (FileNotFoundError if there is none)."""
    digest = hashlib.sha256()
    for chunk in store.read_chunks(key):
        digest.update(chunk)
    return digest.hexdigest()


def _missing(error) -> bool:
    return error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


def open_blob_store(url: str, data_dir: Path, endpoint_url: str = "") -> BlobStore:
    """The store a blob URL names: "" (the data directory), a path or file:// URL, or s3://bucket/prefix."""
    if not url:
        return LocalBlobStore(data_dir)
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"POSEMESH_BLOB_URL {url!r} names no bucket: s3://<bucket>[/<prefix>]")
        return S3BlobStore(parsed.netloc, parsed.path, endpoint_url)
    if parsed.scheme in ("", "file"):
        return LocalBlobStore(Path(parsed.path if parsed.scheme else url))
    raise ValueError(f"POSEMESH_BLOB_URL {url!r}: use a folder, file:///folder or s3://<bucket>[/<prefix>]")
