"""The UnifiedReward client against real OpenAI-compatible HTTP servers on 127.0.0.1 (http.server threads)."""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from mixgrpo.rewards import build_reward
from mixgrpo.rewards.unified import SEMANTIC_TEMPLATE, UnifiedRewardClient, UnifiedSettings, parse_alignment

GOOD_ANSWER = (
    'Word-wise Scores: [["a", 1], ["cat", 2], ["[No_mistakes]", 4]]\n\n'
    "Alignment Score (1-5): {score}\nCoherence Score (1-5): 4\nStyle Score (1-5): 3.5"
)

# behaviour(request_number, body) -> (status, response body, seconds to wait before answering)
Behaviour = Callable[[int, dict], tuple[int, bytes, float]]


def chat_answer(text: str) -> bytes:
    return json.dumps({"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}).encode()


def score_from_prompt(number: int, body: dict) -> tuple[int, bytes, float]:
    """Answer with the digit the caption ends in, so each sample's score is known."""
    text = body["messages"][0]["content"][1]["text"]
    caption = text.rsplit("Text Caption: [", 1)[1].rstrip("]")
    return 200, chat_answer(GOOD_ANSWER.format(score=caption[-1])), 0.0


@dataclass
class FakeServer:
    behaviour: Behaviour
    requests: list[dict] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.httpd is not None
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> FakeServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    number = len(server.requests)
                    server.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    status, payload, delay = server.behaviour(number, body)
                    time.sleep(delay)
                    with server.lock:  # done before answering: the client may send its next request at once
                        server.in_flight -= 1
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()


@pytest.fixture
def serve() -> Iterator[Callable[[Behaviour], FakeServer]]:
    servers: list[FakeServer] = []

    def start(behaviour: Behaviour) -> FakeServer:
        servers.append(FakeServer(behaviour).start())
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


def client(*urls: str, **overrides: object) -> UnifiedRewardClient:
    fields = dict(endpoints=tuple(urls), timeout_s=5.0, retries=3, backoff_s=0.01, max_backoff_s=0.05, concurrency=4)
    return UnifiedRewardClient(UnifiedSettings(**{**fields, **overrides}))  # type: ignore[arg-type]


def images(n: int) -> torch.Tensor:
    return torch.rand(n, 3, 24, 32, generator=torch.Generator().manual_seed(0))


def prompts(*scores: object) -> list[str]:
    return [f"a cat number {s}" for s in scores]


# --------------------------------------------------------------------------- tests


def test_good_answers_give_the_alignment_scores_in_order(serve) -> None:
    server = serve(score_from_prompt)
    reward = build_reward("unified", endpoints=server.url, backoff_s=0.01)
    out = reward(images(5), prompts(1, 5, 3, 2, 4))
    assert out.dtype == torch.float32
    assert out.tolist() == [1.0, 5.0, 3.0, 2.0, 4.0]
    assert all(r.reason is None and r.attempts == 1 for r in reward.last_results)


def test_the_request_is_the_reference_request(serve) -> None:
    server = serve(score_from_prompt)
    ramp = torch.linspace(0, 1, 32)
    batch = torch.stack([ramp.expand(24, 32), ramp.flip(0).expand(24, 32), torch.full((24, 32), 0.3)])[None]
    client(server.url)(batch, ["a red fox 3"])
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    body = request["body"]
    assert (body["model"], body["temperature"]) == ("UnifiedReward", 0)
    image_part, text_part = body["messages"][0]["content"]
    assert text_part == {"type": "text", "text": SEMANTIC_TEMPLATE.format("a red fox 3")}
    assert "Alignment Score (1-5): X" in text_part["text"]
    url = image_part["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    from PIL import Image

    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert (decoded.format, decoded.size, decoded.mode) == ("JPEG", (32, 24), "RGB")
    pixels = torch.from_numpy(np.array(decoded)).float().permute(2, 0, 1) / 255
    assert (pixels - batch[0]).abs().mean() < 0.01  # quality 95 is nearly lossless on a smooth image


def test_malformed_answers_are_nan_with_a_reason(serve, caplog: pytest.LogCaptureFixture) -> None:
    answers = [
        chat_answer("I cannot rate this image."),
        b"{\"choices\": []}",
        chat_answer(GOOD_ANSWER.format(score=4)),
    ]
    server = serve(lambda n, body: (200, answers[n], 0.0))
    reward = client(server.url, concurrency=1)
    with caplog.at_level(logging.WARNING, logger="mixgrpo.rewards.unified"):
        out = reward(images(3), prompts("x", "y", "z"))
    assert torch.isnan(out[0]) and torch.isnan(out[1]) and out[2].item() == 4.0
    first, second, _ = reward.last_results
    assert "no 'Alignment Score (1-5): X'" in first.reason and "cannot rate" in first.reason
    assert "without choices[0].message.content" in second.reason
    assert len(server.requests) == 3  # answers are not retried: temperature 0 would repeat them
    assert "2 of 3 samples failed" in caplog.text and "sample 0 failed" in caplog.text


def test_server_errors_are_retried_until_success(serve) -> None:
    server = serve(lambda n, body: (500, b"overloaded", 0.0) if n < 2 else score_from_prompt(n, body))
    reward = client(server.url, concurrency=1)
    out = reward(images(1), prompts(2))
    assert out.tolist() == [2.0]
    assert reward.last_results[0].attempts == 3 and len(server.requests) == 3


def test_persistent_server_errors_give_nan_after_all_retries(serve) -> None:
    server = serve(lambda n, body: (503, b"down for maintenance", 0.0))
    reward = client(server.url, retries=2)
    out = reward(images(1), prompts(2))
    assert torch.isnan(out[0])
    result = reward.last_results[0]
    assert result.attempts == 3 and len(server.requests) == 3
    assert "HTTP 503" in result.reason and "down for maintenance" in result.reason


def test_client_errors_are_not_retried(serve) -> None:
    server = serve(lambda n, body: (404, b'{"error": "model UnifiedReward not found"}', 0.0))
    reward = client(server.url)
    assert torch.isnan(reward(images(1), prompts(1))[0])
    assert len(server.requests) == 1 and "HTTP 404" in reward.last_results[0].reason


def test_timeouts_are_retried_then_reported(serve) -> None:
    slow_first = serve(lambda n, body: (200, chat_answer(GOOD_ANSWER.format(score=3)), 1.0 if n == 0 else 0.0))
    reward = client(slow_first.url, timeout_s=0.2, concurrency=1)
    start = time.perf_counter()
    assert reward(images(1), prompts(3)).tolist() == [3.0]
    assert reward.last_results[0].attempts == 2
    always_slow = serve(lambda n, body: (200, chat_answer(GOOD_ANSWER.format(score=3)), 1.0))
    reward = client(always_slow.url, timeout_s=0.2, retries=1)
    assert torch.isnan(reward(images(1), prompts(3))[0])
    assert "timed out" in reward.last_results[0].reason
    assert time.perf_counter() - start < 3.0


def test_round_robin_over_two_servers_and_failover(serve) -> None:
    a, b = serve(score_from_prompt), serve(score_from_prompt)
    reward = client(a.url, b.url, concurrency=2)
    assert reward(images(6), prompts(1, 2, 3, 4, 5, 1)).tolist() == [1, 2, 3, 4, 5, 1]
    assert len(a.requests) == len(b.requests) == 3
    dead = "http://127.0.0.1:9"  # nothing listens on the discard port: connection refused
    reward = client(dead, a.url, concurrency=1)
    assert reward(images(4), prompts(1, 2, 3, 4)).tolist() == [1, 2, 3, 4]
    assert all(r.endpoint == a.url for r in reward.last_results)


def test_concurrency_limit_is_respected(serve) -> None:
    server = serve(lambda n, body: (200, chat_answer(GOOD_ANSWER.format(score=2)), 0.15))
    reward = client(server.url, concurrency=3)
    assert reward(images(9), prompts(*[2] * 9)).tolist() == [2.0] * 9
    assert server.max_in_flight == 3


def test_non_finite_images_fail_without_a_request(serve) -> None:
    server = serve(score_from_prompt)
    batch = images(2)
    batch[0, 1, 2, 3] = float("nan")
    reward = client(server.url)
    out = reward(batch, prompts(1, 2))
    assert torch.isnan(out[0]) and out[1].item() == 2.0
    assert len(server.requests) == 1 and "non-finite" in reward.last_results[0].reason


def test_api_key_comes_from_the_environment(serve, monkeypatch: pytest.MonkeyPatch) -> None:
    server = serve(score_from_prompt)
    monkeypatch.setenv("MIXGRPO_UNIFIED_API_KEY", "s3cret")
    build_reward("unified", endpoints=[server.url])(images(1), prompts(1))
    assert server.requests[0]["auth"] == "Bearer s3cret"


def test_settings_are_validated_and_the_parser_follows_the_reference() -> None:
    with pytest.raises(ValueError, match="no endpoints"):
        build_reward("unified", endpoints="")
    with pytest.raises(ValueError, match="not an http"):
        build_reward("unified", endpoints="unified:8080")
    assert parse_alignment("Alignment Score (1-5): 4.25\nCoherence Score (1-5): 2") == 4.25
    assert parse_alignment("Coherence Score (1-5): 2") is None
    assert parse_alignment("Alignment Score (1-5): 7") is None


# --------------------------------------------------------------------------- hardening (issue 13)


@pytest.mark.parametrize("answer", ["10", "55", "5.5", "6", "100"])
def test_out_of_range_alignment_scores_are_failures(serve, answer: str) -> None:
    assert parse_alignment(f"Alignment Score (1-5): {answer}\nCoherence Score (1-5): 2") is None
    server = serve(lambda n, body: (200, chat_answer(GOOD_ANSWER.format(score=answer)), 0.0))
    reward = client(server.url)
    assert torch.isnan(reward(images(1), prompts(1))[0])
    assert "with X in [0, 5]" in reward.last_results[0].reason and len(server.requests) == 1


def test_in_range_edges_are_scores() -> None:
    assert parse_alignment("Alignment Score (1-5): 5") == 5.0
    assert parse_alignment("Alignment Score (1-5): 0") == 0.0
    assert parse_alignment("Alignment Score (1-5): 1.0") == 1.0


def test_default_retries_match_the_reference_client(serve) -> None:
    """3 attempts in all, waiting 2 s then 4 s (the waits are scaled down here through backoff_s)."""
    defaults = UnifiedSettings(endpoints=("http://127.0.0.1:1",))
    assert defaults.retries + 1 == 3 and [defaults.delay(1), defaults.delay(2)] == [2.0, 4.0]
    server = serve(lambda n, body: (503, b"down", 0.0))
    reward = build_reward("unified", endpoints=server.url, backoff_s=0.01)
    assert torch.isnan(reward(images(1), prompts(1))[0])
    assert len(server.requests) == 3 and reward.last_results[0].attempts == 3


def test_api_key_is_never_sent_over_plain_http_to_another_host(serve, monkeypatch: pytest.MonkeyPatch) -> None:
    from mixgrpo.transport import InsecureTransportError

    monkeypatch.setenv("MIXGRPO_UNIFIED_API_KEY", "s3cret")
    monkeypatch.delenv("MIXGRPO_PLAIN_HTTP_TOKEN_HOSTS", raising=False)
    with pytest.raises(InsecureTransportError, match=r"refusing to send the UnifiedReward API key .* to http://reward\.example:8000"):
        build_reward("unified", endpoints="http://127.0.0.1:8000,http://reward.example:8000")
    assert build_reward("unified", endpoints="https://reward.example:8000").settings.api_key == "s3cret"
    monkeypatch.setenv("MIXGRPO_PLAIN_HTTP_TOKEN_HOSTS", "unified-reward")     # a named in-cluster Service
    assert build_reward("unified", endpoints="http://unified-reward:8000").settings.api_key == "s3cret"
    monkeypatch.delenv("MIXGRPO_UNIFIED_API_KEY")
    assert build_reward("unified", endpoints="http://reward.example:8000").settings.api_key is None  # no key, no rule
