"""Storage against a real S3-protocol server (moto's standalone server, a separate process on 127.0.0.1),
reached only through boto3 over HTTP."""

import os
import signal
import subprocess
import sys
import time

import pytest
import requests

from deployments.storage import LocalOutputStore, OutputStore, S3OutputStore, StorageError, sync_model, upload_folder
from stages.models import ModelDir, weights_digest


@pytest.fixture(scope="module")
def model_url(s3_model_url):
    return s3_model_url


def _count_gets(client) -> list:
    calls = []
    client.meta.events.register("provide-client-params.s3.GetObject", lambda **kw: calls.append(kw["params"]["Key"]))
    return calls


def test_model_syncs_from_s3_verified_and_loads_locally(s3, model_url, default_model_dir, tmp_path):
    gets = _count_gets(s3)
    local = sync_model(model_url, root=tmp_path, client=s3)
    assert weights_digest(local) == weights_digest(default_model_dir)
    assert ModelDir(local).family == "sd"
    n = len(gets)
    assert n == sum(1 for p in default_model_dir.rglob("*") if p.is_file())
    assert sync_model(model_url, root=tmp_path, client=s3) == local and len(gets) == n  # current copy reused


def test_changed_object_is_downloaded_again(s3, default_model_dir, tmp_path):
    upload_folder(default_model_dir / "scheduler", "s3://models/changing")
    first = sync_model("s3://models/changing", root=tmp_path, client=s3)
    s3.put_object(Bucket="models", Key="changing/scheduler_config.json", Body=b'{"changed": true}')
    again = sync_model("s3://models/changing", root=tmp_path, client=s3)
    assert again == first and (again / "scheduler_config.json").read_bytes() == b'{"changed": true}'


def test_pickle_in_the_prefix_refuses_the_model_before_download(s3, tmp_path):
    s3.put_object(Bucket="models", Key="pickled/unet/diffusion_pytorch_model.bin", Body=b"\x80\x04K\x01.")
    s3.put_object(Bucket="models", Key="pickled/model_index.json", Body=b"{}")
    gets = _count_gets(s3)
    with pytest.raises(ValueError, match=r"pickled/unet/diffusion_pytorch_model.bin is a pickle .*safetensors only"):
        sync_model("s3://models/pickled", root=tmp_path, client=s3)
    assert gets == [] and not list(tmp_path.rglob("model_index.json"))


def test_missing_bucket_and_empty_prefix_are_clear_errors(s3, tmp_path):
    with pytest.raises(StorageError, match="listing s3://no-such-bucket/m: S3 answered NoSuchBucket"):
        sync_model("s3://no-such-bucket/m", root=tmp_path, client=s3)
    with pytest.raises(StorageError, match="no objects under this prefix"):
        sync_model("s3://models/nothing-here", root=tmp_path, client=s3)
    with pytest.raises(ValueError, match="must look like s3://bucket/prefix"):
        sync_model("http://models/x", root=tmp_path, client=s3)


def test_object_changed_during_download_never_reaches_the_cache(s3, default_model_dir, tmp_path):
    upload_folder(default_model_dir / "vae", "s3://models/racing")

    def change_after_first_get(**kwargs):
        if kwargs["params"]["Key"].endswith("config.json"):  # listed, then rewritten before its download
            s3.put_object(Bucket="models", Key="racing/diffusion_pytorch_model.safetensors", Body=b"x" * 10)

    s3.meta.events.register("provide-client-params.s3.GetObject", change_after_first_get)
    try:
        with pytest.raises(StorageError, match="PreconditionFailed"):
            sync_model("s3://models/racing", root=tmp_path, client=s3)
    finally:
        s3.meta.events.unregister("provide-client-params.s3.GetObject", change_after_first_get)
    assert not [p for p in (tmp_path / "models").iterdir() if not p.name.startswith(".") and p.is_dir()]


def test_download_killed_mid_file_does_not_poison_the_cache(s3, tmp_path):
    big = os.urandom(64 << 20)  # big enough to be mid-download when killed
    s3.put_object(Bucket="models", Key="big/weights.safetensors", Body=b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + big)
    code = (
        "import sys; from pathlib import Path; from deployments.storage import sync_model; "
        f"sync_model('s3://models/big', root=Path({str(tmp_path)!r}))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob("models/.staging-*/weights.safetensors")):
        assert proc.poll() is None and time.monotonic() < deadline, "the download finished before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not [p for p in (tmp_path / "models").iterdir() if not p.name.startswith(".") and p.is_dir()]
    local = sync_model("s3://models/big", root=tmp_path, client=s3)  # a clean sync after the killed one
    assert (local / "weights.safetensors").stat().st_size == len(big) + 16


def test_s3_outputs_are_create_only_and_served_by_presigned_url(s3):
    store = OutputStore.from_location("s3://outputs/images")
    assert isinstance(store, S3OutputStore)
    assert store.put("a/1.png", b"first") is True
    assert store.put("a/1.png", b"second") is False  # never overwritten
    assert store.get("a/1.png") == b"first" and store.get("a/none.png") is None
    url = store.url("a/1.png", ttl_s=900)
    assert "X-Amz-Expires=900" in url
    assert requests.get(url, timeout=10).content == b"first"  # a plain HTTP client, no AWS credentials


def test_missing_output_bucket_is_a_clear_error(s3):
    with pytest.raises(StorageError, match="writing s3://no-such-bucket/x/k.png: S3 answered NoSuchBucket"):
        S3OutputStore("s3://no-such-bucket/x").put("k.png", b"data")


def test_local_outputs_are_create_only(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHTILE_OUTPUT", str(tmp_path / "out"))
    store = OutputStore.from_location()
    assert isinstance(store, LocalOutputStore)
    assert store.put("x/1.png", b"first") and not store.put("x/1.png", b"second")
    assert store.get("x/1.png") == b"first"
    assert not [p for p in (tmp_path / "out" / "x").iterdir() if p.name.startswith(".part-")]
    with pytest.raises(ValueError, match="leaves the output folder"):
        store.put("../escape.png", b"x")
    assert store.url("x/1.png", 900, "http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1/outputs/x/1.png"


def test_cli_generates_from_an_s3_model(s3, model_url, tmp_path):
    from PIL import Image

    from deployments import cli

    out = tmp_path / "s3.png"
    assert cli.main(["generate", "a red ring", "-q", "--model", model_url, "--size", "preview", "--seed", "1", "-o", str(out)]) == 0
    with Image.open(out) as image:
        assert image.size == (256, 256)
    assert cli.main(["generate", "a", "-q", "--model", "s3://no-such-bucket/m", "-o", str(tmp_path / "x.png")]) == 2


# --- faults ------------------------------------------------------------------------------------------------


def test_wrong_credentials_are_a_clear_error(tmp_path):
    """A second moto server that checks credentials (INITIAL_NO_AUTH_ACTION_COUNT=0): unknown keys are refused."""
    from conftest import start_moto

    from deployments.storage import s3_client

    proc, url = start_moto({**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        client = s3_client(endpoint_url=url)
        with pytest.raises(StorageError, match=r"listing s3://models/m: S3 answered InvalidAccessKeyId"):
            sync_model("s3://models/m", root=tmp_path, client=client)
        with pytest.raises(StorageError, match=r"writing s3://outputs/x/k.png: S3 answered InvalidAccessKeyId"):
            S3OutputStore("s3://outputs/x", client=client).put("k.png", b"data")
        assert not list(tmp_path.rglob("*.safetensors"))
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class _FlakyS3Proxy:
    """A real HTTP proxy in front of the S3 server that answers the first `failures` PUTs with 503 SlowDown."""

    def __init__(self, upstream: str, failures: int):
        import http.server
        import threading
        import urllib.parse

        proxy, target = self, urllib.parse.urlparse(upstream)
        self.failures, self.puts = failures, 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self):
                import http.client

                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command == "PUT":
                    proxy.puts += 1
                    if proxy.failures > 0:
                        proxy.failures -= 1
                        error = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                        self.send_response(503)
                        self.send_header("Content-Length", str(len(error)))
                        self.end_headers()
                        self.wfile.write(error)
                        return
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                answer = conn.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for k, v in answer.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.mark.parametrize("failures,stored", [(2, True), (5, False)])
def test_s3_503_on_upload_is_retried(s3, failures, stored):
    from deployments.storage import s3_client

    proxy = _FlakyS3Proxy(os.environ["AWS_ENDPOINT_URL"], failures)
    try:
        store = S3OutputStore("s3://outputs/flaky", client=s3_client(endpoint_url=proxy.url, retries=2))
        key = f"k{failures}.png"
        if stored:
            assert store.put(key, b"png bytes") is True
            assert proxy.puts == failures + 1  # the standard retry mode tried again after each 503
            assert S3OutputStore("s3://outputs/flaky", client=s3).get(key) == b"png bytes"
        else:
            with pytest.raises(StorageError, match="S3 answered SlowDown"):
                store.put(key, b"png bytes")
            assert proxy.puts == 3  # the first attempt and 2 retries, then a clear error
            assert S3OutputStore("s3://outputs/flaky", client=s3).get(key) is None  # nothing partial stored
    finally:
        proxy.close()


# --- the sha256 manifest: every replica loads the same bytes ---------------------------------------------------------


def test_a_model_is_refused_when_its_manifest_is_missing_or_a_file_differs(default_model_dir, tmp_path):
    import shutil

    from deployments import cli
    from deployments.storage import open_model
    from stages.models import MANIFEST

    model = tmp_path / "model"
    shutil.copytree(default_model_dir, model)
    assert open_model(str(model)).path == model  # the embedded default's build carries its manifest

    unet = model / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(unet.read_bytes())
    data[-1] ^= 1  # one bit, same size: what a size check alone lets through
    unet.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"unet/diffusion_pytorch_model.safetensors does not match flashtile.sha256"):
        open_model(str(model))

    (model / MANIFEST).unlink()
    with pytest.raises(ValueError, match=r"has no flashtile.sha256: write one with `flashtile manifest"):
        open_model(str(model))
    assert cli.main(["manifest", str(model)]) == 0  # the operator vouches for the folder as it is now
    assert open_model(str(model)).path == model
    (model / "unet" / "notes.txt").write_text("added later")
    with pytest.raises(ValueError, match=r"unet/notes.txt is not listed in flashtile.sha256"):
        open_model(str(model))
    assert cli.main(["manifest", str(tmp_path / "not-a-model")]) == 2
