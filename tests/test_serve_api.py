"""`palionnx serve` as clients built for vLLM, llama.cpp's server or OpenAI use it: streamed answers (server-sent
events) equal to the plain ones, the model list, API keys. Real HTTP against the server in this process, on
numpy-written folders."""

import base64
import json
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")

from helpers import png_bytes, served  # noqa: E402

from palionnx.server import auth  # noqa: E402
from palionnx.server.serve import is_loopback  # noqa: E402


@pytest.fixture(scope="module")
def server(numpy_folder):
    with served(numpy_folder("tiny-pg1"), slots=3) as running:
        yield running


def _uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _chat_body(png: bytes, tokens: int, **extra) -> dict:
    return {"model": "x", "max_tokens": tokens, **extra,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "caption en"},
                                                      {"type": "image_url", "image_url": {"url": _uri(png)}}]}]}


def _events(response) -> list:
    """The data of each server-sent event, JSON decoded ('[DONE]' as it is)."""
    assert response.headers["content-type"].startswith("text/event-stream"), response.headers
    events = []
    for block in response.text.split("\n\n"):
        if block:
            assert block.startswith("data: "), block
            data = block[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


@pytest.mark.parametrize("png", png_bytes(3), ids=["a", "b", "c"])
def test_streamed_chat_is_openai_chunks_adding_up_to_the_answer(server, png):
    plain = server.client.post("/v1/chat/completions", json=_chat_body(png, 24)).json()
    events = _events(server.client.post("/v1/chat/completions",
                                        json=_chat_body(png, 24, stream=True, stream_options={"include_usage": True})))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert content == plain["choices"][0]["message"]["content"] and len(chunks) > 4
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and finish[0]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]


def test_caption_streams_when_asked_by_field_or_accept_header(server):
    png = png_bytes(1)[0]
    plain = server.caption(png, max_new_tokens=20).json()
    by_field = _events(server.caption(png, max_new_tokens=20, stream="true"))
    by_header = _events(server.client.post("/v1/caption", json={"image": _uri(png), "max_new_tokens": 20},
                                           headers={"accept": "text/event-stream"}))
    for events in (by_field, by_header):
        assert events[-1] == "[DONE]" and "".join(e["delta"] for e in events[:-2]) == plain["caption"]
        assert events[-2]["caption"] == plain["caption"] and events[-2]["tokens"] == plain["tokens"] == 20
    assert server.caption(png, stream="maybe").status_code == 400


def test_the_openai_client_streams_unchanged(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0)
    png = png_bytes(1)[0]
    body = _chat_body(png, 16)
    plain = client.chat.completions.create(model="x", messages=body["messages"], max_tokens=16)
    stream = client.chat.completions.create(model="x", messages=body["messages"], max_tokens=16, stream=True)
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert "".join(pieces) == plain.choices[0].message.content and len(pieces) > 2
    assert [m.id for m in client.models.list()] == [server_model_id(server)]


def server_model_id(server) -> str:
    return server.client.get("/healthz").json()["model"]


def test_a_client_that_goes_away_frees_its_slot(numpy_folder):
    """One slot: a stream abandoned after two events stops decoding at once (long before its 250 tokens), and
    the next request gets the slot."""
    png = png_bytes(1)[0]
    with served(numpy_folder("tiny-pg1"), slots=1, max_new_tokens=250) as server:
        with server.client.stream("POST", "/v1/caption", files={"image": ("x.png", png, "image/png")},
                                  data={"max_new_tokens": "250", "stream": "true"}) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ") and next(lines) == ""
        deadline = time.time() + 10
        while server.engine.scheduler.busy and time.time() < deadline:
            time.sleep(0.01)
        scheduler = server.engine.scheduler
        assert scheduler.busy == 0 and scheduler.occupancy.steps < 200, scheduler.occupancy.steps
        assert server.caption(png, max_new_tokens=3).json()["tokens"] == 3
        metrics = server.client.get("/metrics").text
        assert 'palionnx_requests_total{outcome="disconnected",route="/v1/caption"} 1.0' in metrics
        assert "palionnx_inter_token_seconds_count" in metrics


def test_models_list_the_served_folder(server):
    listed = server.client.get("/v1/models").json()
    assert listed["object"] == "list" and len(listed["data"]) == 1
    card = listed["data"][0]
    assert card["id"] == server_model_id(server) == "tiny-pg1-fp32" and card["object"] == "model"
    assert card["palionnx"]["level"] == "fp32" and card["palionnx"]["device"] == "cpu"
    assert server.client.get(f"/v1/models/{card['id']}").json() == card
    missing = server.client.get("/v1/models/other")
    assert missing.status_code == 404 and "this server serves 'tiny-pg1-fp32'" in missing.json()["error"]["message"]


def test_keys_guard_every_route_but_healthz(numpy_folder, monkeypatch):
    compared = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    png = png_bytes(1)[0]
    with served(numpy_folder("tiny-pg1"), slots=1, api_keys=("first-key", "second-key")) as server:
        get = server.client.get
        assert get("/healthz").status_code == 200
        for path in ("/v1/models", "/metrics", "/nope"):
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "first-key"}):
                answer = get(path, headers=headers)
                assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
                assert answer.json()["error"]["type"] == "authentication_error"
        assert compared, "keys are compared with hmac.compare_digest"
        for key in ("first-key", "second-key"):
            assert get("/v1/models", headers={"authorization": f"Bearer {key}"}).status_code == 200
        denied = server.caption(png, max_new_tokens=2)
        assert denied.status_code == 401
        allowed = server.client.post("/v1/caption", files={"image": ("x.png", png, "image/png")},
                                     data={"max_new_tokens": "2"}, headers={"authorization": "Bearer second-key"})
        assert allowed.status_code == 200 and allowed.json()["tokens"] == 2
    with served(numpy_folder("tiny-pg1"), slots=1, api_keys=("k",), metrics_public=True) as server:
        assert server.client.get("/metrics").status_code == 200
        assert server.client.get("/v1/models").status_code == 401


def test_key_files_and_loopback(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text("# team keys\nalpha\n\n  beta  \n")
    assert auth.read_key_file(path) == ["alpha", "beta"]
    path.write_text("# nothing\n")
    with pytest.raises(auth.KeyFileError, match="holds no key"):
        auth.read_key_file(path)
    with pytest.raises(auth.KeyFileError, match="cannot read the key file"):
        auth.read_key_file(tmp_path / "missing.txt")
    assert auth.key_matches("beta", ["alpha", "beta"]) and not auth.key_matches("bet", ["alpha", "beta"])
    assert all(map(is_loopback, ["127.0.0.1", "localhost", "::1", "127.0.0.2"]))
    assert not any(map(is_loopback, ["0.0.0.0", "192.168.1.4", "::", "example.org"]))
