"""`palionnx serve`, started for real on a loopback port and asked over HTTP: in a subprocess, or in this process
on a numpy-written folder (the unit tier) where nothing but the answers matters."""

import base64
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")

from helpers import Server, free_port, palionnx, png_bytes, served  # noqa: E402, F401


@pytest.fixture
def server(model):
    running = Server(model, "--slots", 3)
    yield running
    running.stop()


@pytest.fixture
def in_process(numpy_folder):
    with served(numpy_folder("tiny-pg1"), slots=3) as running:
        yield running


def _cli_captions(tmp_path, model, pngs, tokens):
    folder = tmp_path / "cli"
    folder.mkdir()
    for i, png in enumerate(pngs):
        (folder / f"{i:02d}.png").write_bytes(png)
    assert palionnx("caption", folder, "--model", model, "--max-new-tokens", tokens, "-q").returncode == 0
    return [(folder / f"{i:02d}.txt").read_text() for i in range(len(pngs))]


def test_concurrent_requests_get_the_cli_captions(server, model, tmp_path):
    pngs = png_bytes(8)
    expected = _cli_captions(tmp_path, model, pngs, 20)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda png: server.caption(png, max_new_tokens=20), pngs))
    assert [a.status_code for a in answers] == [200] * 8
    assert [a.json()["caption"] for a in answers] == expected
    assert all(set(a.json()["timings"]) >= {"queue_s", "prefill_s", "decode_s", "total_s"} for a in answers)

    encoded = base64.b64encode(pngs[0]).decode()
    as_json = server.client.post("/v1/caption", json={"image": encoded, "max_new_tokens": 20})
    assert as_json.status_code == 200 and as_json.json()["caption"] == expected[0]
    uri = "data:image/png;base64," + base64.b64encode(pngs[1]).decode()
    chat = server.client.post("/v1/chat/completions", json={
        "model": "palionnx", "max_tokens": 20,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "caption en"},
                                                  {"type": "image_url", "image_url": {"url": uri}}]}]})
    body = chat.json()
    assert chat.status_code == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected[1]}
    assert body["usage"]["completion_tokens"] > 0

    metrics = server.client.get("/metrics").text
    assert 'palionnx_requests_total{outcome="ok",route="/v1/caption"} 9.0' in metrics  # prometheus_client's format
    assert "palionnx_request_seconds_count 10" in metrics and "palionnx_slot_occupancy" in metrics


def test_bad_requests_get_their_status_while_good_ones_succeed(in_process):
    server = in_process
    good = png_bytes(1)[0]
    with ThreadPoolExecutor(7) as pool:
        futures = [pool.submit(server.caption, good, max_new_tokens=10),
                   pool.submit(server.caption, b"not an image"),
                   pool.submit(server.client.post, "/v1/caption", json={"image": "%%%"}),
                   pool.submit(server.caption, good, max_new_tokens=0),
                   pool.submit(server.client.post, "/v1/chat/completions", json={"messages": []}),
                   pool.submit(server.caption, good, prompt="<image><bos><eos>"),
                   pool.submit(server.caption, good, max_new_tokens=10)]
        statuses = [f.result().status_code for f in futures]
    assert statuses == [200, 400, 400, 400, 400, 400, 200]
    error = server.caption(b"not an image").json()["error"]
    assert "not a readable image" in error["message"] and error["type"] == "invalid_request_error"


def test_oversize_body_full_queue_and_timeout(numpy_folder):
    model = numpy_folder("tiny-pg1")
    small = png_bytes(1)[0]
    # in process the clients share the interpreter with the server: a deadline 200 tokens always fit in
    with served(model, slots=1, max_queue=1, max_body_mb=0.05, timeout_s=1.5) as big:
        assert big.caption(os.urandom(80_000)).status_code == 413
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda _: big.caption(small, max_new_tokens=200), range(12)))
        statuses = [a.status_code for a in answers]
        assert 200 in statuses and 503 in statuses, statuses  # one slot, one waiting: the rest are turned away
        assert all(a.headers.get("retry-after") == "1" for a in answers if a.status_code == 503)
        assert big.client.get("/healthz").status_code == 200
    with served(model, slots=1, timeout_s=0.05) as slow:
        with ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(lambda _: slow.caption(small, max_new_tokens=250).status_code, range(6)))
        assert 504 in statuses, statuses
        assert slow.caption(small, max_new_tokens=2).status_code in (200, 504)


def test_an_int4_folder_answers_the_api_captions(numpy_folder):
    """Served captions are the Python API's, token for token, at int4 too (three requests at once)."""
    from palionnx import Captioner
    from palionnx.samples import sample_images

    folder = numpy_folder("tiny-pg2", "int4")
    expected = [r.text for r in Captioner.load(folder, device="cpu").caption(sample_images(3, size=40),
                                                                             max_new_tokens=12)]
    with served(folder, slots=3) as server, ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda png: server.caption(png, max_new_tokens=12), png_bytes(3)))
    assert [a.status_code for a in answers] == [200] * 3
    assert [a.json()["caption"] for a in answers] == expected


def test_a_taken_address_is_named_before_the_model_loads(numpy_folder, tmp_path):
    from palionnx.server.options import ServeError, ServeOptions
    from palionnx.server.serve import prepare

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServeError, match=f"cannot listen on 127.0.0.1:{port} .*Pick another --port"):
            prepare(tmp_path / "no-model-here", ServeOptions(port=port))  # the address is checked first


def test_sigterm_drains_and_sigkill_restarts(model):
    server = Server(model, "--slots", 2)
    png = png_bytes(1)[0]
    with ThreadPoolExecutor(2) as pool:
        pending = pool.submit(server.caption, png, max_new_tokens=250)
        time.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)
        assert pending.result().status_code == 200  # the request in flight was answered
    # uvicorn re-raises SIGTERM once it has drained, so the exit status says how the server was stopped
    assert server.process.wait(30) in (0, 130, -signal.SIGTERM)
    assert "Traceback" not in server.process.stderr.read()
    server.stop()

    first = Server(model, "--slots", 2)
    with ThreadPoolExecutor(4) as pool:
        for _ in range(4):
            pool.submit(lambda: first.caption(png, max_new_tokens=100))
        time.sleep(0.2)
        first.process.kill()
    first.stop()
    again = Server(model, "--slots", 2, port=first.port)
    try:
        assert again.caption(png, max_new_tokens=5).status_code == 200
    finally:
        again.stop()


def test_keys_on_the_command_line(model, tmp_path):
    """--api-key and PALIONNX_API_KEY guard the routes; a bad key file is one line and exit 2; listening beyond
    the loopback without a key warns in one line."""
    keys = tmp_path / "keys.txt"
    keys.write_text("# none yet\n")
    run = palionnx("serve", model, "--api-key-file", keys, timeout=60)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        f"error: the key file {keys} holds no key (one per line)"]
    guarded = Server(model, "--api-key", "cli-key", env={"PALIONNX_API_KEY": "ignored-when-given"})
    try:
        assert guarded.client.get("/v1/models").status_code == 401
        assert guarded.client.get("/v1/models", headers={"authorization": "Bearer cli-key"}).status_code == 200
    finally:
        guarded.stop()
    from_env = Server(model, "--host", "0.0.0.0", env={"PALIONNX_API_KEY": "env-key"})
    try:
        assert from_env.client.get("/v1/models", headers={"authorization": "Bearer env-key"}).status_code == 200
    finally:
        from_env.stop()
    assert "warning" not in from_env.process.stderr.read()
    open_server = Server(model, "--host", "0.0.0.0")
    open_server.stop()
    warnings = [line for line in open_server.process.stderr.read().splitlines() if line.startswith("warning")]
    assert warnings == ["warning: listening on 0.0.0.0 without --api-key: anyone who can reach the port can use it"]
