"""Shared fixtures: one embedded default model per test session, in a private cache directory."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def pytest_configure(config):
    # Every test, and every process a test starts, uses the session's own cache, never the user's.
    cache = Path(config.rootpath) / ".pytest-cache-flashtile"
    os.environ["FLASHTILE_CACHE"] = str(os.environ.get("FLASHTILE_TEST_CACHE", cache))


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from stages.models import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def shipped_guidance() -> dict[str, float]:
    """The embedded default's guidance per mode, from the flashtile.json committed beside its weights."""
    from stages.models import DEFAULT_WEIGHTS, SETTINGS_FILE, read_settings

    return read_settings(DEFAULT_WEIGHTS / SETTINGS_FILE)["guidance_scale"]


@pytest.fixture(scope="session")
def default_model(default_model_dir):
    from stages.models import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def flashtile(default_model):
    from stages.pipeline import Flashtile

    return Flashtile.from_pretrained(None)


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)


# --- a real S3-protocol server: moto's standalone server, a separate process on 127.0.0.1 ------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """moto's standalone S3 server as its own process on a free loopback port; returns it and its URL."""
    port = _free_port()
    server = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 30
    while True:
        try:
            requests.get(url, timeout=1)
            return proc, url
        except requests.RequestException:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto server did not start")
            time.sleep(0.2)


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server process; the AWS_* environment points boto3 (and child processes) at it."""
    proc, url = start_moto()
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        from deployments.storage import s3_client

        client = s3_client()
        for bucket in ("models", "outputs"):
            client.create_bucket(Bucket=bucket)
        yield client
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def s3_model_url(s3, default_model_dir):
    """The embedded default, uploaded to the S3 server with boto3."""
    from deployments.storage import upload_folder

    upload_folder(default_model_dir, "s3://models/flashtile-default-v1")
    return "s3://models/flashtile-default-v1"
