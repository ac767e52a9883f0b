"""Model zoo: the listed models fit their configs; downloads resume, check checksums and fail with a clear message."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import pathlib
import threading

import pytest
from paper_settings import PAPER_SETTINGS

from dinat_m2f import model_zoo
from dinat_m2f.config import load_config

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with HTTP Range support (SimpleHTTPRequestHandler has none) and counts bytes sent."""

    sent: list[int] = []
    ranges: list[str | None] = []

    def do_GET(self):  # noqa: N802  (http.server's naming)
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404)
            return
        with open(path, "rb") as f:
            data = f.read()
        header = self.headers.get("Range")
        type(self).ranges.append(header)
        start = int(header.split("=")[1].split("-")[0]) if header else 0
        if start >= len(data) and header:
            self.send_error(416)
            return
        self.send_response(206 if header else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        type(self).sent.append(len(data) - start)  # before writing: the client may check as soon as it has read
        self.wfile.write(data[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "model.pth").write_bytes(PAYLOAD)
    _RangeHandler.sent, _RangeHandler.ranges = [], []
    handler = functools.partial(_RangeHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_the_papers_models_are_listed_with_configs_that_load():
    seg = model_zoo.list_models(kind="segmentation")
    tasks = {(m.dataset, m.task) for m in seg}
    assert tasks == PAPER_SETTINGS
    assert model_zoo.get("dinat_l_coco_panoptic").metrics == {"PQ": 58.5, "AP": 49.2, "mIoU": 68.3}
    assert {m.name for m in model_zoo.list_models(kind="backbone")} >= {"dinat_mini_in1k", "dinat_large_in22k"}
    for m in model_zoo.list_models():
        assert m.url.startswith("https://shi-labs.com/projects/dinat/checkpoints/") and m.url.endswith(m.file_name)
        if m.config is not None:
            cfg = load_config(m.config_path, ["MODEL.DEVICE", "cpu"])
            assert cfg.MODEL.BACKBONE.NAME == "D2DiNAT", m.name
            if m.kind == "segmentation":
                assert cfg.MODEL.DINAT.KERNEL_SIZE == 11 and cfg.MODEL.DINAT.EMBED_DIM == 192, m.name
    with pytest.raises(KeyError, match="unknown model-zoo name 'nope'.*dinat_l_coco_panoptic"):
        model_zoo.get("nope")


def test_download_resumes_a_partial_file_and_checks_sha256(server, tmp_path):
    dest = str(tmp_path / "cache" / "model.pth")
    os.makedirs(os.path.dirname(dest))
    with open(dest + ".part", "wb") as f:
        f.write(PAYLOAD[:300_000])  # an interrupted earlier download
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    model_zoo.download(f"{server}/model.pth", dest, sha256=digest, progress=False)
    assert pathlib.Path(dest).read_bytes() == PAYLOAD
    assert _RangeHandler.ranges == ["bytes=300000-"] and _RangeHandler.sent == [len(PAYLOAD) - 300_000]
    assert not os.path.exists(dest + ".part")


def test_download_with_a_wrong_checksum_removes_the_file(server, tmp_path):
    dest = str(tmp_path / "model.pth")
    with pytest.raises(model_zoo.ChecksumError, match="does not match the recorded 00"):
        model_zoo.download(f"{server}/model.pth", dest, sha256="00" * 32, progress=False)
    assert not os.path.exists(dest) and not os.path.exists(dest + ".part")


def test_get_weights_uses_the_cache_and_fails_offline_naming_url_and_place(monkeypatch, tmp_path):
    monkeypatch.setenv("DINAT_M2F_CACHE", str(tmp_path))
    model = model_zoo.get("dinat_mini_in1k")
    monkeypatch.setattr(
        model_zoo, "_MODELS", (model_zoo.ZooModel(**{**model.__dict__, "url": "http://127.0.0.1:9/nothing"}),)
    )
    expected = os.path.join(str(tmp_path), "dinat_mini_in1k_224.pth")
    with pytest.raises(model_zoo.WeightsUnavailableError, match=f"put it at {expected}"):
        model_zoo.get_weights("dinat_mini_in1k", progress=False)
    pathlib.Path(expected).write_bytes(b"x")
    assert model_zoo.get_weights("dinat_mini_in1k") == expected


def test_file_urls_are_copied(tmp_path):
    src = tmp_path / "src.pth"
    src.write_bytes(PAYLOAD[:1000])
    dest = str(tmp_path / "out" / "copy.pth")
    model_zoo.download(src.as_uri(), dest, sha256=hashlib.sha256(PAYLOAD[:1000]).hexdigest(), progress=False)
    assert pathlib.Path(dest).read_bytes() == PAYLOAD[:1000]
