"""VLM judges over an OpenAI-compatible chat-completions API (vLLM, SGLang, ``flowalign judge-server``).

``VLMJudge`` (pairwise) sends two images and the UnifiedReward-Think pairwise prompt (Wang et al.
2025, as used by Pref-GRPO) and reads ``<answer>Image 1 is better</answer>`` /
``<answer>Image 2 is better</answer>``. ``VLMScore`` (pointwise) sends one image and the
UnifiedReward pointwise prompt and averages the ``<Dim> Score (1-5): x`` lines it asks for.

Images travel as base64 PNG data URLs. Requests run on a thread pool (``concurrency``), each with a
``timeout`` and ``retries`` with exponential backoff on timeouts, connection errors, 429 and 5xx.
A request that still fails, or an answer that cannot be parsed, never raises: the pairwise judge
returns NaN for it (a tie in ``win_rates``) and the pointwise score is filled in neutrally; both
are counted (``stats`` and the returned info). The API key is read from the environment variable
named by ``api_key_env`` and is never logged, printed or put in an exception.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
import os
import re
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .transforms import check_images

logger = logging.getLogger(__name__)

# UnifiedReward-Think's pairwise image prompt, as sent by Pref-GRPO (fastvideo/rewards/templates.py,
# get_unifiedreward_think_image_template); kept verbatim, the judge was trained on this wording.
UNIFIEDREWARD_THINK_PAIRWISE = '''You are an objective and precise evaluator for image quality comparison. I will provide you with a text caption and two images generated based on this caption. You must analyze the two images carefully and determine which image is better.

        Evaluation procedure:

        1. The caption for the generated images is: 「{prompt}」. You must evaluate the two images across these core dimensions:
        - Semantic consistency (how closely the image content aligns with the caption)
        - Aesthetics (composition, color usage, artistic expression)
        - Authenticity (realism and attention to detail)

        2. You are also encouraged to add up to two additional evaluation dimensions if they are relevant to the specific caption or images (e.g., creativity, spatial layout, fine-grained detail). If no extra dimensions are relevant, just keep the three core dimensions.

        3. For each evaluation dimension:
        - Provide a score between 1–10 for both Image 1 and Image 2
        - Provide a short rationale for each score (2–5 short sentences)
        - The evaluation must follow exactly this format with line breaks and indentation:
            Dimension name: 
                Image 1 (x/10) - rationale; 
                Image 2 (y/10) - rationale

        4. After evaluating all dimensions, calculate the total score for each image and show the calculation explicitly, following this exact format:
            Total score:
            Image 1: x+x+x=total
            Image 2: y+y+y=total

        5. Wrap all reasoning and scoring strictly within <think> and </think> tags.

        6. After </think>, output the final judgment strictly inside <answer> and </answer> tags, containing only one of:
        - Image 1 is better
        - Image 2 is better

        Constraints:
        - You must strictly follow the line breaks, indentation, and formatting shown in the example below.
        - Do not merge multiple dimensions into one line. Each dimension must follow the 3-line block format shown below.
        - Do not use Markdown formatting, bullet points, bold text, or headings.
        - Do not output explanations outside <think> and <answer>.
        - The <answer> tag must contain only the final string with no extra words.

        Required output format:

        <think>
        1. Semantic consistency: 
            Image 1 (9/10) - ...; 
            Image 2 (7/10) - ...
        2. Aesthetics: 
            Image 1 (8/10) - ...; 
            Image 2 (8/10) - ...
        3. Authenticity: 
            Image 1 (8/10) - ...; 
            Image 2 (5/10) - ...
        [Additional dimension if any]: 
            Image 1 (7/10) - ...; 
            Image 2 (8/10) - ...
        [Additional dimension if any]: 
            Image 1 (6/10) - ...; 
            Image 2 (7/10) - ...
        Total score:
        Image 1: 9+8+8+7+6=38
        Image 2: 7+8+5+8+7=35
        </think>
        <answer>Image 1 is better</answer>

        Note: The example above is only to illustrate the exact format (line breaks, indentation, symbols, and style). Your actual evaluation must follow this format exactly, but be based on the given caption and images.
        '''

# UnifiedReward's pointwise image prompt (Pref-GRPO's get_unifiedreward_image_template).
UNIFIEDREWARD_POINTWISE = (
    "You are presented with a generated image and its associated text caption. "
    "Your task is to analyze the image across multiple dimensions in relation to the caption. Specifically:\n"
    "Provide overall assessments for the image along the following axes (each rated from 1 to 5):\n"
    "- Alignment Score: How well the image matches the caption in terms of content.\n"
    "- Coherence Score: How logically consistent the image is (absence of visual glitches, object distortions, etc.).\n"
    "- Style Score: How aesthetically appealing the image looks, regardless of caption accuracy.\n\n"
    "Output your evaluation using the format below:\n\n"
    "Alignment Score (1-5): X\n"
    "Coherence Score (1-5): Y\n"
    "Style Score (1-5): Z\n\n"
    "Your task is provided as follows:\n"
    "Text Caption: [{prompt}]"
)

PAIRWISE_PROMPT_RE = re.compile(r"「(.*?)」", re.S)
POINTWISE_PROMPT_RE = re.compile(r"Text Caption: \[(.*)\]\s*$", re.S)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
_IMAGE1_RE = re.compile(r"image\s*1\s+is\s+better", re.I)
_IMAGE2_RE = re.compile(r"image\s*2\s+is\s+better", re.I)
_SCORE_RE = re.compile(r"(\w+) Score \(1-5\):\s*(-?\d+(?:\.\d+)?)")


def parse_pairwise(text: str) -> float | None:
    """1.0 for a final ``<answer>Image 1 is better</answer>``, 0.0 for Image 2, None otherwise."""
    answers = _ANSWER_RE.findall(text)
    if not answers:
        return None
    one, two = bool(_IMAGE1_RE.search(answers[-1])), bool(_IMAGE2_RE.search(answers[-1]))
    if one == two:
        return None
    return 1.0 if one else 0.0


def parse_pointwise(text: str, dimensions: tuple[str, ...]) -> float | None:
    """Mean of the requested ``<Dim> Score (1-5): x`` values; None if any is missing."""
    found = {k.lower(): float(v) for k, v in _SCORE_RE.findall(text)}
    if not all(d.lower() in found for d in dimensions):
        return None
    return float(np.mean([found[d.lower()] for d in dimensions]))


def _to_uint8(images_BCHW: torch.Tensor) -> np.ndarray:
    return (images_BCHW.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _png_data_url(arr_HWC: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr_HWC)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_data_url(image_CHW: torch.Tensor) -> str:
    """An image [3,H,W] in [0,1] as a ``data:image/png;base64,...`` URL (8-bit, lossless)."""
    return _png_data_url(_to_uint8(image_CHW[None])[0])


def data_urls(images_BCHW: torch.Tensor, map_fn: Callable = map) -> list[str]:
    """Data URLs of a batch, each distinct image encoded once (an image of a group of G appears in
    G-1 pairs); ``map_fn`` runs the PNG encodings (e.g. on a thread pool)."""
    arrs = _to_uint8(images_BCHW)
    keys = [hashlib.blake2b(a.tobytes(), digest_size=16).digest() for a in arrs]
    first = {k: i for i, k in reversed(list(enumerate(keys)))}
    encoded = dict(zip(first, map_fn(_png_data_url, [arrs[i] for i in first.values()])))
    return [encoded[k] for k in keys]


MAX_IMAGE_PIXELS = 4096 * 4096


def decode_data_url(url: str, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """The inverse of ``image_data_url`` (any PIL-readable image): [3,H,W] float in [0,1]. Anything else
    (not a base64 data URL, invalid base64, not an image, a truncated one, more than ``max_pixels``
    pixels as a decompression bomb has) is a ``ValueError`` saying which; the pixel count is checked
    from the header, before decoding."""
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        raise ValueError("images must be base64 data URLs (data:image/...;base64,...)")
    try:
        raw = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    except binascii.Error as err:
        raise ValueError(f"the image's base64 is invalid ({err})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            w, h = image.size
            if w * h <= max_pixels:
                arr = np.asarray(image.convert("RGB"))
    except Exception as err:  # PIL's decoders raise many types on malformed input
        raise ValueError(f"the image cannot be decoded ({type(err).__name__}: {err})") from None
    if w * h > max_pixels:
        raise ValueError(f"the image is {w}x{h} pixels, more than the {max_pixels} accepted")
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255


class ChatClient:
    """A small, thread-safe OpenAI chat-completions client with timeouts, retries and counters."""

    RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})

    def __init__(
        self,
        endpoint: str,
        model: str,
        api_key_env: str = "FLOWALIGN_JUDGE_API_KEY",
        timeout: float = 120.0,
        retries: int = 2,
        backoff: float = 1.0,
        concurrency: int = 8,
        max_tokens: int = 4096,
        temperature: float = 0.0,
        extra_body: dict | None = None,
    ):
        import httpx

        if concurrency < 1 or retries < 0 or timeout <= 0:
            raise ValueError("VLM client: need concurrency >= 1, retries >= 0, timeout > 0")
        base = endpoint.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        if httpx.URL(self.url).scheme not in ("http", "https"):
            raise ValueError(f"judge endpoint {endpoint!r} must be an http(s) URL such as http://127.0.0.1:8000/v1")
        self.model, self.api_key_env = model, api_key_env
        self.timeout, self.retries, self.backoff, self.concurrency = timeout, retries, backoff, concurrency
        self.body = {"model": model, "max_tokens": max_tokens, "temperature": temperature, **(extra_body or {})}
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(api_key_env) if api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._http = httpx.Client(timeout=timeout, headers=headers,
                                  limits=httpx.Limits(max_connections=concurrency))
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="flowalign-judge")
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "attempts": 0, "retries": 0, "timeouts": 0, "http_errors": 0,
                      "connection_errors": 0, "failed": 0, "unparsable": 0}

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n

    def complete(self, content: list[dict]) -> str | None:
        """One user message -> the assistant's text, or None when every attempt failed."""
        import httpx

        self.count("requests")
        payload = {**self.body, "messages": [{"role": "user", "content": content}]}
        for attempt in range(self.retries + 1):
            if attempt:
                self.count("retries")
                time.sleep(self.backoff * 2 ** (attempt - 1))
            self.count("attempts")
            try:
                r = self._http.post(self.url, json=payload)
            except httpx.TimeoutException:
                self.count("timeouts")
                continue
            except httpx.HTTPError as err:  # connection refused/reset, protocol errors
                self.count("connection_errors")
                logger.debug("judge request: %s", type(err).__name__)
                continue
            if r.status_code != 200:
                self.count("http_errors")
                if r.status_code in self.RETRY_STATUS:
                    continue
                logger.warning("judge request rejected: HTTP %d %s", r.status_code, r.text[:200])
                break
            try:
                text = r.json()["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                text = None
            if isinstance(text, str):
                return text
            self.count("http_errors")  # a 200 without a chat-completions answer
            break
        self.count("failed")
        return None

    def map(self, fn: Callable, items: list) -> list:
        """``fn`` over ``items`` on the client's thread pool, results in order."""
        return list(self._pool.map(fn, items))

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._http.close()

    def __repr__(self) -> str:  # the key itself never appears, only the variable's name
        return f"ChatClient(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"


class VLMJudge:
    """Pairwise VLM judge (UnifiedReward-Think format). ``prefer`` returns 1.0 / 0.0 per pair,
    NaN where the request failed or the answer had no verdict."""

    def __init__(self, client: ChatClient, template: str = UNIFIEDREWARD_THINK_PAIRWISE):
        self.client, self.template = client, template
        self.name = "vlm"

    def _one(self, job) -> float:
        prompt, url_a, url_b = job
        content = [
            {"type": "image_url", "image_url": {"url": url_a}},
            {"type": "image_url", "image_url": {"url": url_b}},
            {"type": "text", "text": self.template.format(prompt=prompt)},
        ]
        text = self.client.complete(content)
        if text is None:
            return float("nan")
        verdict = parse_pairwise(text)
        if verdict is None:
            self.client.count("unparsable")
            return float("nan")
        return verdict

    def prefer(self, prompts, images_a, images_b):
        check_images(images_a)
        check_images(images_b)
        n = images_a.shape[0]
        urls = data_urls(torch.cat([images_a, images_b]), self.client.map)
        return torch.tensor(self.client.map(self._one, list(zip(prompts, urls[:n], urls[n:]))), dtype=torch.float32)

    @property
    def stats(self) -> dict[str, int]:
        return dict(self.client.stats)

    def __repr__(self) -> str:
        return f"VLMJudge({self.client!r})"


class VLMScore:
    """Pointwise VLM score (UnifiedReward format): mean of the requested dimensions' 1–5 scores.

    A failed or unparsable answer is replaced by the mean of the valid scores of the same prompt
    in the batch (so it adds nothing to that group's advantages), else of the whole batch, else
    ``fail_score``; ``info`` has ``requests``, ``failures`` and the ``valid`` mask."""

    differentiable = False
    name = "vlm_score"

    def __init__(self, client: ChatClient, dimensions=("Alignment", "Coherence", "Style"),
                 template: str = UNIFIEDREWARD_POINTWISE, fail_score: float = 3.0):
        self.client, self.dimensions, self.template = client, tuple(dimensions), template
        self.fail_score = fail_score

    def _one(self, job) -> float:
        prompt, url = job
        content = [{"type": "image_url", "image_url": {"url": url}},
                   {"type": "text", "text": self.template.format(prompt=prompt)}]
        text = self.client.complete(content)
        if text is None:
            return float("nan")
        score = parse_pointwise(text, self.dimensions)
        if score is None:
            self.client.count("unparsable")
            return float("nan")
        return score

    def __call__(self, images, prompts, metadata=None):
        check_images(images)
        urls = data_urls(images, self.client.map)
        raw = torch.tensor(self.client.map(self._one, list(zip(prompts, urls))), dtype=torch.float32)
        valid = ~torch.isnan(raw)
        scores = raw.clone()
        batch_mean = raw[valid].mean().item() if valid.any() else self.fail_score
        for i in torch.nonzero(~valid).flatten().tolist():
            same = [j for j, p in enumerate(prompts) if p == prompts[i] and valid[j]]
            scores[i] = raw[same].mean() if same else batch_mean
        return scores.to(images.device), {"requests": len(raw), "failures": int((~valid).sum()), "valid": valid}

    @property
    def stats(self) -> dict[str, int]:
        return dict(self.client.stats)

    def __repr__(self) -> str:
        return f"VLMScore({self.client!r}, dimensions={self.dimensions})"


def vlm_judge(
    endpoint: str = "http://127.0.0.1:8000/v1",
    model: str = "CodeGoat24/UnifiedReward-Think-qwen-7b",
    api_key_env: str = "FLOWALIGN_JUDGE_API_KEY",
    concurrency: int = 8,
    timeout: float = 120.0,
    retries: int = 2,
    backoff: float = 1.0,
    max_tokens: int = 4096,
    temperature: float = 0.0,
    template: str = UNIFIEDREWARD_THINK_PAIRWISE,
) -> VLMJudge:
    """Pairwise judge served by vLLM/SGLang (``endpoint`` = the server's ``/v1`` base URL)."""
    return VLMJudge(ChatClient(endpoint=endpoint, model=model, api_key_env=api_key_env, concurrency=concurrency,
                               timeout=timeout, retries=retries, backoff=backoff, max_tokens=max_tokens,
                               temperature=temperature), template)


def vlm_score(
    endpoint: str = "http://127.0.0.1:8000/v1",
    model: str = "CodeGoat24/UnifiedReward-qwen-7b",
    api_key_env: str = "FLOWALIGN_JUDGE_API_KEY",
    dimensions: tuple[str, ...] | list[str] = ("Alignment", "Coherence", "Style"),
    concurrency: int = 8,
    timeout: float = 120.0,
    retries: int = 2,
    backoff: float = 1.0,
    max_tokens: int = 1024,
    temperature: float = 0.0,
    template: str = UNIFIEDREWARD_POINTWISE,
    fail_score: float = 3.0,
) -> VLMScore:
    """Pointwise VLM reward (UnifiedReward's 1–5 scores, averaged over ``dimensions``)."""
    return VLMScore(ChatClient(endpoint=endpoint, model=model, api_key_env=api_key_env, concurrency=concurrency,
                               timeout=timeout, retries=retries, backoff=backoff, max_tokens=max_tokens,
                               temperature=temperature), dimensions, template, fail_score)
