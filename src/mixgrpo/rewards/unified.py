"""UnifiedReward (UnifiedReward-qwen-7b): a VLM judge behind OpenAI-compatible chat endpoints.

For each image and prompt it POSTs ``{endpoint}/v1/chat/completions`` with model
``"UnifiedReward"``, temperature 0, and one user message: the image (base64 JPEG, quality 95)
followed by the "semantic" question of the MixGRPO reference, which asks for word-wise scores and
``Alignment / Coherence / Style Score (1-5)``. The reward is the Alignment score, ``[0, 5]``.

Failures are visible, never a silent 0: a sample whose request fails after all retries, or
whose answer has no Alignment score, scores NaN; the reason is logged (WARNING) and kept in
:attr:`UnifiedRewardClient.last_results`. Transient errors (connection refused / reset,
timeouts, HTTP 408 / 429 / 5xx, a body that is not JSON) are retried up to ``retries`` times
with exponential backoff (default: 3 attempts in all, waiting 2 s and 4 s, as the reference
client), each try on the next endpoint (round-robin over all of them, so one dead server only
costs a retry). Other HTTP errors (400: wrong model name, ...) and unparseable
answers are not retried. At most ``concurrency`` requests are in flight per call.

Serve the model with vLLM (``vllm serve CodeGoat24/UnifiedReward-qwen-7b --served-model-name UnifiedReward``);
an API key, if the server wants one, comes from ``$MIXGRPO_UNIFIED_API_KEY``, never a parameter, and
is only sent over https or to loopback (see ``mixgrpo.transport`` for cluster-internal hosts).
Proxies from the environment are ignored (reward servers are cluster-internal), as in the reference.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import logging
import math
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from mixgrpo.rewards.base import register_reward
from mixgrpo.rewards.preprocess import check_batch

log = logging.getLogger(__name__)

API_KEY_ENV = "MIXGRPO_UNIFIED_API_KEY"

# The reference's QUESTION_TEMPLATE_SEMANTIC (Tencent-Hunyuan/MixGRPO, unified_reward.py), verbatim.
SEMANTIC_TEMPLATE = (
    "You are presented with a generated image and its associated text caption. Your task is to analyze the image across multiple dimensions in relation to the caption. Specifically:\n\n"
    "1. Evaluate each word in the caption based on how well it is visually represented in the image. Assign a numerical score to each word using the format:\n"
    "   Word-wise Scores: [[\"word1\", score1], [\"word2\", score2], ..., [\"wordN\", scoreN], [\"[No_mistakes]\", scoreM]]\n"
    "   - A higher score indicates that the word is less well represented in the image.\n"
    "   - The special token [No_mistakes] represents whether all elements in the caption were correctly depicted. A high score suggests no mistakes; a low score suggests missing or incorrect elements.\n\n"
    "2. Provide overall assessments for the image along the following axes (each rated from 1 to 5):\n"
    "- Alignment Score: How well the image matches the caption in terms of content.\n"
    "- Coherence Score: How logically consistent the image is (absence of visual glitches, object distortions, etc.).\n"
    "- Style Score: How aesthetically appealing the image looks, regardless of caption accuracy.\n\n"
    "Output your evaluation using the format below:\n\n"
    "---\n\n"
    "Word-wise Scores: [[\"word1\", score1], ..., [\"[No_mistakes]\", scoreM]]\n\n"
    "Alignment Score (1-5): X\n"
    "Coherence Score (1-5): Y\n"
    "Style Score (1-5): Z\n\n"
    "Your task is provided as follows:\nText Caption: [{}]"
)
ALIGNMENT_SCORE = re.compile(r"Alignment Score \(1-5\):\s*(\d+(?:\.\d+)?)")
ALIGNMENT_RANGE = (0.0, 5.0)  # the reference accepts 0-5; anything else (10, 55) is a failed sample
# The reference client makes 3 attempts in all, waiting 2 s then 4 s.
DEFAULT_RETRIES = 2
DEFAULT_BACKOFF_S = 2.0
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class UnifiedSettings:
    """Where and how to call the UnifiedReward servers."""

    endpoints: tuple[str, ...]  # base URLs, e.g. ("http://unified-0:8080", "http://unified-1:8080")
    model: str = "UnifiedReward"  # the served model name
    timeout_s: float = 60.0  # socket timeout of one request (connect, and each read)
    retries: int = DEFAULT_RETRIES  # further tries after a transient failure (reference: 2, so 3 attempts)
    backoff_s: float = DEFAULT_BACKOFF_S  # wait before the first retry; doubles each retry (reference: 2 s, 4 s)
    max_backoff_s: float = 10.0  # cap on one wait
    concurrency: int = 8  # requests in flight at most, per call
    max_tokens: int = 4096  # the answer's budget (the word-wise scores are long)
    jpeg_quality: int = 95
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ValueError("unified: no endpoints; pass endpoints='http://HOST:PORT' (comma-separated for several)")
        for url in self.endpoints:
            if not re.match(r"https?://[^/]+", url):
                raise ValueError(f"unified: endpoint {url!r} is not an http(s) URL; use e.g. http://unified-reward:8080")
        if self.timeout_s <= 0 or self.retries < 0 or self.backoff_s < 0 or self.concurrency < 1:
            raise ValueError(f"unified: invalid settings {self}: timeout_s > 0, retries >= 0, backoff_s >= 0, concurrency >= 1")
        if self.api_key:
            from mixgrpo.transport import check_secret_transport

            for url in self.endpoints:
                check_secret_transport(url, f"the UnifiedReward API key (${API_KEY_ENV})")

    def delay(self, retry: int) -> float:
        """Seconds before retry number ``retry`` (1-based): ``min(max_backoff_s, backoff_s * 2^(retry-1))``."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** (retry - 1))


@dataclass(frozen=True)
class SampleResult:
    """One sample's outcome: ``score`` is NaN when ``reason`` says why."""

    score: float
    reason: str | None = None
    attempts: int = 0
    endpoint: str | None = None  # the endpoint of the last try
    answer: str | None = None  # the model's text, when one came back


class _Transient(Exception):
    """A failure worth retrying."""


class _Permanent(Exception):
    """A failure that retrying will not fix."""


class UnifiedRewardClient:
    """``(images, prompts) -> Tensor[B]`` of Alignment scores (NaN for a failed sample)."""

    name = "unified"

    def __init__(self, settings: UnifiedSettings) -> None:
        self.settings = settings
        self.last_results: list[SampleResult] = []
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __repr__(self) -> str:
        return f"UnifiedRewardClient(endpoints={list(self.settings.endpoints)}, model={self.settings.model!r})"

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        results = self.score_samples(images, prompts)
        return torch.tensor([r.score for r in results], dtype=torch.float32, device=images.device)

    def score_samples(self, images: torch.Tensor, prompts: list[str]) -> list[SampleResult]:
        """Score every sample concurrently; failures are logged and kept in :attr:`last_results`."""
        check_batch(images, prompts, self.name)
        pixels = images.detach().float().cpu()
        with ThreadPoolExecutor(max_workers=self.settings.concurrency, thread_name_prefix="unified") as pool:
            results = list(pool.map(self._score_one, pixels, prompts))
        for i, r in enumerate(results):
            if r.reason is not None:
                log.warning("unified reward: sample %d failed after %d tries (%s): %s", i, r.attempts, r.endpoint, r.reason)
        failed = sum(r.reason is not None for r in results)
        if failed:
            log.warning("unified reward: %d of %d samples failed and score NaN", failed, len(results))
        self.last_results = results
        return results

    def _score_one(self, image: torch.Tensor, prompt: str) -> SampleResult:
        if not torch.isfinite(image).all():
            return SampleResult(math.nan, "the image has non-finite pixels", 0)
        payload = self._payload(encode_jpeg(image, self.settings.jpeg_quality), prompt)
        endpoint, attempt, reason = None, 0, "no try was made"
        for attempt in range(1, self.settings.retries + 2):
            endpoint = self._next_endpoint()
            try:
                answer = self._post(endpoint, payload)
            except _Transient as error:
                reason = str(error)
                if attempt <= self.settings.retries:
                    time.sleep(self.settings.delay(attempt))
                continue
            except _Permanent as error:
                return SampleResult(math.nan, str(error), attempt, endpoint)
            score = parse_alignment(answer)
            if score is None:
                return SampleResult(math.nan, f"no 'Alignment Score (1-5): X' with X in [0, 5] in the answer: {answer[:200]!r}",
                                    attempt, endpoint, answer)
            return SampleResult(score, None, attempt, endpoint, answer)
        return SampleResult(math.nan, reason, attempt, endpoint)

    def _next_endpoint(self) -> str:
        with self._lock:
            i = next(self._counter)
        return self.settings.endpoints[i % len(self.settings.endpoints)]

    def _payload(self, jpeg_b64: str, prompt: str) -> bytes:
        message = {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{jpeg_b64}"}},
                {"type": "text", "text": SEMANTIC_TEMPLATE.format(prompt)},
            ],
        }
        body = {"model": self.settings.model, "messages": [message], "temperature": 0, "max_tokens": self.settings.max_tokens}
        return json.dumps(body).encode()

    def _post(self, endpoint: str, payload: bytes) -> str:
        """The answer text of one request; raises :class:`_Transient` or :class:`_Permanent`."""
        url = endpoint.rstrip("/") + "/v1/chat/completions"
        headers = {"Content-Type": "application/json"}
        if self.settings.api_key:
            headers["Authorization"] = f"Bearer {self.settings.api_key}"
        request = urllib.request.Request(url, data=payload, headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.settings.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            detail = error.read()[:200].decode(errors="replace")
            kind = _Transient if error.code in _TRANSIENT_STATUS else _Permanent
            raise kind(f"HTTP {error.code} from {url}: {detail}") from error
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, OSError) as error:
            cause = getattr(error, "reason", error)
            raise _Transient(f"request to {url} failed: {type(cause).__name__}: {cause}") from error
        try:
            body = json.loads(raw)
        except json.JSONDecodeError as error:
            raise _Transient(f"{url} answered with a body that is not JSON: {raw[:200]!r}") from error
        try:
            content = body["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as error:
            raise _Permanent(f"{url} answered without choices[0].message.content: {str(body)[:200]}") from error
        if not isinstance(content, str):
            raise _Permanent(f"{url} answered with non-text content: {str(content)[:200]}")
        return content


def parse_alignment(answer: str) -> float | None:
    """The number after ``Alignment Score (1-5):`` when it is in [0, 5] (as the reference accepts), else None.

    The whole number is read: ``10`` or ``55`` are out of range (None), never their first digit.
    """
    match = ALIGNMENT_SCORE.search(answer)
    if match is None:
        return None
    score = float(match.group(1))
    return score if ALIGNMENT_RANGE[0] <= score <= ALIGNMENT_RANGE[1] else None


def encode_jpeg(image: torch.Tensor, quality: int = 95) -> str:
    """``(3, H, W)`` in [0, 1] -> base64 of an RGB JPEG (8-bit, rounded)."""
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@register_reward("unified")
def build_unified(
    endpoints: str | list[str] | tuple[str, ...],
    device: str | torch.device | None = None,
    timeout_s: float = 60.0,
    retries: int = DEFAULT_RETRIES,
    backoff_s: float = DEFAULT_BACKOFF_S,
    concurrency: int = 8,
    model: str = "UnifiedReward",
) -> UnifiedRewardClient:
    """UnifiedReward client; ``endpoints`` a list or a comma-separated string of base URLs.

    ``device`` is accepted so every reward can be built with the same arguments; the VLM runs on its server.
    """
    del device
    urls = tuple(u.strip() for u in (endpoints.split(",") if isinstance(endpoints, str) else endpoints) if u.strip())
    settings = UnifiedSettings(
        endpoints=urls, model=model, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s,
        concurrency=concurrency, api_key=os.environ.get(API_KEY_ENV) or None,
    )
    return UnifiedRewardClient(settings)
