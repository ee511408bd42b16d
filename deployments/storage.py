"""Object storage through boto3: model weights from S3 into a local cache, and image outputs.

Any S3-compatible endpoint works. Endpoint, region and credentials come from arguments or the usual AWS
environment variables (AWS_ENDPOINT_URL, AWS_REGION / AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID, ...).
Requests use botocore's `standard` retry mode (throttling and 5xx answers are retried with backoff).
"""

import base64
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from stages.models import PICKLE_SUFFIXES, ModelDir, cache_dir, check_safetensors_only, resolve_model, verify_manifest

SYNC_MANIFEST = ".flashtile-sync.json"
STAGING_MAX_AGE_S = 3600  # staging folders older than this were left by a killed download


class StorageError(RuntimeError):
    """A storage operation failed; the message says what and where, never with credentials."""


def s3_client(endpoint_url: str | None = None, region: str | None = None, retries: int = 5):
    """A boto3 S3 client: `retries` retries after the first attempt, with the standard mode's backoff."""
    config = Config(retries={"mode": "standard", "max_attempts": retries}, signature_version="s3v4")
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None,
        region_name=region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        config=config,
    )


def parse_s3_url(url: str) -> tuple[str, str]:
    """s3://bucket/prefix -> (bucket, prefix without slashes at either end)."""
    parts = urlparse(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"an S3 location must look like s3://bucket/prefix; got {url!r}")
    return parts.netloc, parts.path.strip("/")


def _describe(err: Exception, what: str) -> StorageError:
    if isinstance(err, ClientError):
        code = err.response.get("Error", {}).get("Code", "error")
        return StorageError(f"{what}: S3 answered {code}")
    return StorageError(f"{what}: {type(err).__name__}: {err}")


# --- model weights: s3://bucket/prefix -> a verified local copy ------------------------------------------------


def sync_model(url: str, root: Path | None = None, client=None, on_bytes=None) -> Path:
    """Mirror a model prefix into the local cache and return the local directory.

    Every object is checked (size, and MD5 against a single-part ETag) before the copy is used; the copy
    is built in a staging folder and renamed into place, so a partial download is never seen. A file lock
    serialises replicas on one node; an up-to-date copy (same keys, sizes and ETags) is reused.
    Pickle weights anywhere under the prefix refuse the model before anything is downloaded.
    `on_bytes(n)`, if given, is told how many bytes this call downloaded (0 when the cache was current).
    """
    bucket, prefix = parse_s3_url(url)
    client = client or s3_client()
    # 1. List the prefix and refuse pickles up front.
    try:
        objects = [
            {"key": o["Key"], "size": o["Size"], "etag": o["ETag"].strip('"')}
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
            for o in page.get("Contents", [])
            if not o["Key"].endswith("/")
        ]
    except (ClientError, BotoCoreError) as err:
        raise _describe(err, f"listing {url}") from None
    if not objects:
        raise StorageError(f"listing {url}: no objects under this prefix")
    for o in objects:
        if o["key"].lower().endswith(PICKLE_SUFFIXES):
            raise ValueError(f"weights file s3://{bucket}/{o['key']} is a pickle format; Flashtile loads safetensors only")
    manifest = sorted(objects, key=lambda o: o["key"])

    # 2. Reuse the local copy if it is complete and current; else download under the node's lock.
    base = (root or cache_dir() / "s3") / bucket
    target = base / hashlib.sha256(prefix.encode()).hexdigest()[:16]
    base.mkdir(parents=True, exist_ok=True)
    with open(base / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _manifest(target) == manifest:
            return target
        _remove_stale_staging(base)
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{target.name}-", dir=base))
        try:
            for o in manifest:
                _download(client, bucket, o, staging / o["key"][len(prefix) + 1 :])
                if on_bytes is not None:
                    on_bytes(o["size"])
            check_safetensors_only(staging)
            (staging / SYNC_MANIFEST).write_text(json.dumps(manifest))
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)  # atomic: the copy appears whole or not at all
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def open_model(location: str | None, on_bytes=None) -> ModelDir:
    """A model from a local directory, an s3:// prefix (synced into the local cache first, its id the prefix's
    last part) or, when None, the embedded default; every file checked against the model's sha256 manifest, so
    every replica, wherever its copy came from, serves the same weights (ValueError naming the file otherwise)."""
    if location and location.startswith("s3://"):
        path = sync_model(location, on_bytes=on_bytes)
        model = ModelDir(path, model_id=parse_s3_url(location)[1].rsplit("/", 1)[-1])
    else:
        model = resolve_model(location)
    verify_manifest(model.path)
    return model


def _manifest(folder: Path) -> list | None:
    try:
        return json.loads((folder / SYNC_MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _remove_stale_staging(base: Path) -> None:
    for old in base.glob(".staging-*"):
        if time.time() - old.stat().st_mtime > STAGING_MAX_AGE_S:
            shutil.rmtree(old, ignore_errors=True)


def _download(client, bucket: str, obj: dict, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    md5, size = hashlib.md5(), 0
    try:
        body = client.get_object(Bucket=bucket, Key=obj["key"], IfMatch=obj["etag"])["Body"]
        with open(dest, "wb") as f:
            for chunk in iter(lambda: body.read(1 << 20), b""):
                f.write(chunk)
                md5.update(chunk)
                size += len(chunk)
    except (ClientError, BotoCoreError) as err:
        raise _describe(err, f"downloading s3://{bucket}/{obj['key']}") from None
    if size != obj["size"]:
        raise StorageError(f"downloading s3://{bucket}/{obj['key']}: got {size} bytes, expected {obj['size']}")
    if "-" not in obj["etag"] and md5.hexdigest() != obj["etag"]:  # multipart ETags are not an MD5
        raise StorageError(f"downloading s3://{bucket}/{obj['key']}: content does not match its ETag")


def upload_folder(folder: Path, url: str, client=None) -> int:
    """Upload every file under `folder` to s3://bucket/prefix (for publishing a model); returns bytes sent."""
    bucket, prefix = parse_s3_url(url)
    client = client or s3_client()
    sent = 0
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")
            sent += path.stat().st_size
    return sent


# --- outputs: a local directory or an S3 prefix, create-only ----------------------------------------------------


class OutputStore:
    """Where finished images go. `FLASHTILE_OUTPUT` = /some/dir or s3://bucket/prefix. Writes never overwrite."""

    serves_locally = False

    @staticmethod
    def from_location(location: str | None = None, client=None) -> "OutputStore":
        location = location or os.environ.get("FLASHTILE_OUTPUT") or str(cache_dir() / "outputs")
        if location.startswith("s3://"):
            return S3OutputStore(location, client)
        return LocalOutputStore(location)


class LocalOutputStore(OutputStore):
    serves_locally = True  # the ingress serves these files at /v1/outputs/ (S3 hands out presigned URLs instead)

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def put(self, key: str, data: bytes, content_type: str = "image/png") -> bool:
        """Write `key` once; False (and nothing written) if it already exists."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, path)  # fails if `key` exists: create-only, and readers never see a partial file
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def get(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def url(self, key: str, ttl_s: int, base_url: str = "") -> str:
        return f"{base_url}/v1/outputs/{key}"

    def _path(self, key: str) -> Path:
        path = (self.folder / key).resolve()
        if self.folder.resolve() not in path.parents:
            raise ValueError(f"output key {key!r} leaves the output folder")
        return path


class S3OutputStore(OutputStore):
    def __init__(self, url: str, client=None):
        self.bucket, self.prefix = parse_s3_url(url)
        self.client = client or s3_client()

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes, content_type: str = "image/png") -> bool:
        """Write `key` once (If-None-Match: *); False if it already exists."""
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type, IfNoneMatch="*",
                ContentMD5=base64.b64encode(hashlib.md5(data).digest()).decode(),
            )
            return True
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise _describe(err, f"writing s3://{self.bucket}/{self._key(key)}") from None
        except BotoCoreError as err:
            raise _describe(err, f"writing s3://{self.bucket}/{self._key(key)}") from None

    def get(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise _describe(err, f"reading s3://{self.bucket}/{self._key(key)}") from None

    def url(self, key: str, ttl_s: int, base_url: str = "") -> str:
        """A presigned GET URL, valid for `ttl_s` seconds."""
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=ttl_s
        )
