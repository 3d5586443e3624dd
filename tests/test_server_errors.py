"""What an adversarial client sends `palionnx serve`: every malformed request is a 4xx in the API's JSON
error shape, never a 500 or a traceback; the deadline covers slow bodies; a port in use is one line.
Real HTTP against what `palionnx serve` runs: in this process on a numpy-written folder (the unit tier), or a real
`palionnx serve` subprocess where its output or exit matters (and, for the bounded fuzz test, the app in process)."""

import base64
import json
import socket
import subprocess
import sys
import time
import types

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")

from helpers import Server, free_port, png_bytes, served  # noqa: E402


@pytest.fixture(scope="module")
def server(numpy_folder):
    with served(numpy_folder("tiny-pg1"), slots=2, timeout_s=3) as running:
        yield running


def _json_error(response, status):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["message"] and body["error"]["type"]
    return body["error"]["message"]


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


@pytest.mark.parametrize("body,words", [
    ({"image": "data:image/png;base64"}, "data: URI"),
    ({"image": "data:"}, "data: URI"),
    ({"image": "x", "temperature": float("nan")}, "temperature"),
    ({"image": "x", "repetition_penalty": "nan"}, "repetition_penalty"),
    ({"image": "x", "temperature": 1e-45}, "temperature"),
    ({"image": "x", "seed": 3}, "only act when sampling"),
    ({"image": "x", "max_new_tokens": 8.7}, "max_new_tokens must be an integer"),
    ({"image": "x", "max_new_tokens": True}, "max_new_tokens must be an integer"),
    ({"image": "x", "top_k": [1]}, "top_k must be an integer"),
])
def test_bad_caption_json_is_400(server, body, words):
    png = png_bytes(1)[0]
    body = {**body, "image": _data_uri(png) if body["image"] == "x" else body["image"]}
    content = json.dumps(body, allow_nan=True)  # NaN as the JSON extension clients send
    message = _json_error(server.client.post("/v1/caption", content=content,
                                             headers={"content-type": "application/json"}), 400)
    assert words in message


def test_bad_chat_messages_are_400(server):
    png = png_bytes(1)[0]
    image = {"type": "image_url", "image_url": {"url": _data_uri(png)}}
    for content, words in ((5, "content must be a string or a list"), ([image, {"type": "text", "text": 5}],
                           "'text' must be a string"), ([image, {"type": "text", "text": ["a"]}], "'text'"),
                           ([image, 7], "content must be")):
        response = server.client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]})
        assert words in _json_error(response, 400)


def test_deep_json_and_bad_multipart_are_4xx(server):
    deep = "[" * 100_000 + "]" * 100_000
    assert "nested too deeply" in _json_error(server.client.post(
        "/v1/caption", content=deep, headers={"content-type": "application/json"}), 400)
    no_boundary = server.client.post("/v1/caption", content=b"--x\r\n", headers={"content-type": "multipart/form-data"})
    assert "multipart" in _json_error(no_boundary, 400)
    png = png_bytes(1)[0]
    big_field = server.client.post("/v1/caption", files={"image": ("x.png", png, "image/png")},
                                   data={"prompt": "x" * (2**20 + 10)})
    _json_error(big_field, 413)
    many = server.client.post("/v1/caption", files={"image": ("x.png", png, "image/png")},
                              data={f"f{i}": "1" for i in range(1500)})
    _json_error(many, 400)
    two = server.client.post("/v1/caption", files=[("image", ("a.png", png, "image/png")),
                                                   ("image", ("b.png", png, "image/png"))])
    assert "one file field named 'image', not 2" in _json_error(two, 400)
    ok = server.caption(png, max_new_tokens=3)
    assert ok.status_code == 200 and ok.json()["tokens"] == 3  # all of the above left the server well


def test_unknown_routes_and_methods_are_json(server):
    assert "no route /nope" in _json_error(server.client.get("/nope"), 404)
    assert "GET is not allowed" in _json_error(server.client.get("/v1/caption"), 405)
    assert "DELETE is not allowed" in _json_error(server.client.delete("/v1/chat/completions"), 405)


def test_a_prompt_character_the_tokenizer_lacks_is_named(numpy_folder, tmp_path):
    """A tokenizer without byte fallback reads unknown characters as <unk>: the error names the characters,
    not a "special token" the user never typed (the server and the CLI share this check)."""
    import shutil

    from palionnx.runtime.limits import RequestError, check_request
    from palionnx.runtime.manifest import Manifest
    from palionnx.runtime.text import TextCodec

    folder = numpy_folder("tiny-pg1")
    shutil.copy(folder / "tokenizer.json", tmp_path / "tokenizer.json")
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["model"]["byte_fallback"] = False
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    manifest = Manifest.load(folder)
    with pytest.raises(RequestError, match="has no pieces for '☃'") as caught:
        check_request(manifest, TextCodec(tmp_path, manifest), ["caption ☃ now"], 4, 1)
    assert "special token" not in str(caught.value)
    with pytest.raises(RequestError, match="special token <image>"):  # a real special token still says so
        check_request(manifest, TextCodec(tmp_path, manifest), ["<image>"], 4, 1)


def test_disconnects_are_counted_quietly(exported):
    running = Server(exported("tiny-pg1", "fp32"), "--slots", 2)
    try:
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", running.port)) as sock:
                sock.sendall(b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 100000\r\n\r\n{\"image\": \"")
            time.sleep(0.05)
        time.sleep(0.5)
        metrics = running.client.get("/metrics").text
        assert 'palionnx_requests_total{outcome="disconnected",route="/v1/caption"} 5.0' in metrics  # prometheus_client
        assert 'outcome="error"' not in metrics
    finally:
        running.stop()
    errors = running.process.stderr.read()
    assert "Traceback" not in errors and "ClientDisconnect" not in errors


def test_the_deadline_covers_a_slow_body_and_shutdown(exported):
    running = Server(exported("tiny-pg1", "fp32"), "--timeout", "0.5")
    try:
        with socket.create_connection(("127.0.0.1", running.port)) as sock:
            sock.sendall(b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n")
            started = time.time()
            sock.settimeout(10)
            for _ in range(8):  # 3 bytes every 0.3 s: far slower than the deadline allows
                try:
                    sock.sendall(b"   ")
                except OSError:
                    break
                time.sleep(0.3)
            answer = sock.recv(65536).decode()
        assert answer.startswith("HTTP/1.1 408") and time.time() - started < 5
        with socket.create_connection(("127.0.0.1", running.port)) as slow:  # open when SIGTERM comes
            slow.sendall(b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
            stopping = time.time()
            running.process.terminate()
            assert running.process.wait(15) in (0, 130) and time.time() - stopping < 0.5 + 5 + 3
    finally:
        running.stop()
    errors = running.process.stderr.read()
    assert "Traceback" not in errors and "CancelledError" not in errors


@pytest.mark.integration  # six seconds idle: too slow for the unit tier
def test_idle_keep_alive_connections_stay_open(server):
    """A request sent on a connection left idle longer than uvicorn's default keep-alive (5 s) is answered."""
    png = png_bytes(1)[0]
    with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as client:
        assert client.get("/healthz").status_code == 200
        time.sleep(6)
        assert client.post("/v1/caption", files={"image": ("x.png", png, "image/png")},
                           data={"max_new_tokens": "2"}).status_code == 200


def test_a_port_in_use_is_one_line_and_exit_2(exported):
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        run = subprocess.run([sys.executable, "-m", "palionnx", "serve", str(exported("tiny-pg1", "fp32")),
                              "--port", str(port)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "serving" not in run.stderr and "Traceback" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot listen on 127.0.0.1:") and str(port) in lines[0]


def test_any_request_body_is_answered_2xx_or_4xx(numpy_folder):
    """Bounded, derandomized fuzz of the request decoder, in process: any JSON body on either route."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from starlette.testclient import TestClient

    from palionnx import Captioner
    from palionnx.server.app import Limits, create_app
    from palionnx.server.engine import Engine
    from palionnx.server.metrics import Metrics

    captioner = Captioner.load(numpy_folder("tiny-pg1"), device="cpu")
    engine = Engine(captioner, 2, 64, 16, Metrics())
    engine.start()
    client = TestClient(create_app(captioner, engine, Limits(8, 10.0, 2**20), "tiny"), raise_server_exceptions=False)
    png = _data_uri(png_bytes(1)[0])
    leaves = st.none() | st.booleans() | st.integers(-10, 10**20) | st.floats(allow_nan=True) | st.text(max_size=20) \
        | st.just(png)
    values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8),
                                                                                               inner, max_size=3),
                          max_leaves=8)
    keys = st.sampled_from(["image", "prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed",
                            "repetition_penalty", "no_repeat_ngram_size", "messages", "stream", "max_tokens", "x"])
    bodies = st.dictionaries(keys, values, max_size=6) | values

    @settings(max_examples=150, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=bodies, route=st.sampled_from(["/v1/caption", "/v1/chat/completions"]))
    def check(body, route):
        response = client.post(route, content=json.dumps(body, allow_nan=True),
                               headers={"content-type": "application/json"})
        assert response.status_code < 500, (body, response.text)
        if response.status_code >= 400:
            assert set(response.json()) == {"error"}

    try:
        check()
    finally:
        client.close()
        engine.stop()


def test_the_tokens_window_forgets_old_completions_unscraped(monkeypatch):
    """The tokens/s window dropped old completions only when /metrics was read: a server nobody scraped kept
    every completion ever (the soak's slow RSS growth). Now recording trims it too."""
    from palionnx.server import metrics as module

    clock = [0.0]  # the metrics module's clock only: patching time.monotonic itself stalls other threads' timers
    monkeypatch.setattr(module, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    metrics = module.Metrics()
    for _ in range(10_000):
        clock[0] += 1.0
        metrics.record_tokens(3)
    assert len(metrics.recent) <= module.TOKEN_WINDOW_S + 1 and metrics.generated == 30_000
