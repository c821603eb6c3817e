"""``flowalign judge-server``: an OpenAI-compatible judge on loopback, backed by a local reward.

Answers ``POST /v1/chat/completions`` in the formats ``flowalign.rewards.vlm`` reads, so the whole
Pref-GRPO path (win rates from a VLM judge over HTTP) runs on one machine without a GPU:

- two images -> pairwise: the local reward scores both, the reply is UnifiedReward-Think shaped,
  ``<think>...</think><answer>Image 1 is better</answer>`` (Image 1 on an exact tie);
- one image -> pointwise: ``Alignment/Coherence/Style Score (1-5): <score>`` with the local
  reward's raw score (not rescaled to 1–5);
- one image with UniGenBench's request (a ``<checkpoint>`` list) -> ``<score>[...]</score>``, every
  test point 1 when the local reward's score is at least 0.5, else 0
  (``flowalign.eval.unigenbench.answer_from_score``).

The prompt is read back from the template (``「...」`` pairwise, ``Text Caption: [...]`` pointwise),
else the whole text is used. ``GET /v1/models`` lists the one model. Faults can be injected for
tests, drawn per request from a seeded generator: ``--error-rate`` (HTTP 500), ``--malformed-rate``
(an answer without a verdict), ``--timeout-rate`` (sleep ``--timeout-sleep`` seconds before
answering, past the client's timeout), and a fixed ``--delay`` on every request. With
``--api-key-env NAME`` requests must carry ``Authorization: Bearer $NAME`` (else HTTP 401), to test
a client's key set-up.

The server binds 127.0.0.1 only. ``--port 0`` picks a free port; the first stdout line is
``flowalign judge-server listening on http://127.0.0.1:PORT/v1``.

It is hardened against bad clients: ``--workers`` threads serve connections (at most as many again
wait; past that a connection is answered 503 at once), every socket read times out after
``--socket-timeout`` seconds and a whole request after ``--request-timeout``, a body needs a
``Content-Length`` of at most ``--max-body-mb`` and the ``application/json`` content type, every
malformed request or image (bad JSON, bad base64, not an image, more than ``--max-image-pixels``) is a
4xx answer with a message, and the API key is compared in constant time.

    python -m flowalign.rewards.server --reward jpeg_incompressibility --port 0
"""

from __future__ import annotations

import argparse
import hmac
import io
import json
import os
import random
import sys
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer

import torch

from ..eval import unigenbench
from .vlm import MAX_IMAGE_PIXELS, PAIRWISE_PROMPT_RE, POINTWISE_PROMPT_RE, decode_data_url

HOST = "127.0.0.1"

_BUSY_BODY = json.dumps({"error": {"message": "server busy, retry later", "type": "server_busy", "code": 503}})
_BUSY = (f"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
         f"Content-Length: {len(_BUSY_BODY)}\r\n\r\n{_BUSY_BODY}").encode()


class JudgeServer(HTTPServer):
    """The HTTP server: connections are served by a pool of ``workers`` threads; up to ``workers`` more
    wait for one, and a connection past those is answered 503 by the accepting thread and closed."""

    def __init__(self, port: int, reward, model_name: str, delay: float = 0.0, error_rate: float = 0.0,
                 malformed_rate: float = 0.0, timeout_rate: float = 0.0, timeout_sleep: float = 30.0,
                 seed: int = 0, verbose: bool = False, api_key: str | None = None, workers: int = 32,
                 socket_timeout: float = 30.0, request_timeout: float = 120.0, max_body_bytes: int = 64 << 20,
                 max_image_pixels: int = MAX_IMAGE_PIXELS):
        if error_rate + malformed_rate + timeout_rate > 1:
            raise ValueError("error_rate + malformed_rate + timeout_rate must be <= 1")
        if workers < 1 or socket_timeout <= 0 or request_timeout <= 0 or max_body_bytes < 1 or max_image_pixels < 1:
            raise ValueError("need workers >= 1, socket_timeout > 0, request_timeout > 0, max_body_bytes >= 1, "
                             "max_image_pixels >= 1")
        super().__init__((HOST, port), JudgeHandler)
        self.reward, self.model_name, self.verbose = reward, model_name, verbose
        self._api_key = api_key
        self.socket_timeout, self.request_timeout = socket_timeout, request_timeout
        self.max_body_bytes, self.max_image_pixels = max_body_bytes, max_image_pixels
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="judge-server")
        self._slots = threading.BoundedSemaphore(2 * workers)  # served + waiting connections
        self.delay, self.timeout_sleep = delay, timeout_sleep
        self.rates = (error_rate, malformed_rate, timeout_rate)
        self._rng = random.Random(seed)
        self._rng_lock, self._reward_lock = threading.Lock(), threading.Lock()
        self.counts = {"requests": 0, "error": 0, "malformed": 0, "timeout": 0}

    def process_request(self, request, client_address):
        """(The accepting thread.) Hand the connection to the pool, or answer 503 when it is full."""
        if not self._slots.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                request.sendall(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        self._pool.submit(self._serve, request, client_address)

    def _serve(self, request, client_address):
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def handle_error(self, request, client_address):
        """A connection's unexpected failure: one line on stderr (the traceback with --verbose)."""
        err = sys.exc_info()[1]
        if isinstance(err, (TimeoutError, ConnectionError)):
            return  # a client that went idle or away
        sys.stderr.write(f"judge-server: error serving {client_address[0]}: {type(err).__name__}: {err}\n")
        if self.verbose:
            traceback.print_exc()

    def server_close(self):
        super().server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def key_matches(self, authorization: str) -> bool:
        """Constant-time comparison of an ``Authorization`` header with ``Bearer <key>``."""
        return hmac.compare_digest(authorization.encode(), f"Bearer {self._api_key}".encode())

    def draw_fault(self) -> str | None:
        with self._rng_lock:
            u = self._rng.random()
            self.counts["requests"] += 1
            fault = None
            error, malformed, timeout = self.rates
            if u < error:
                fault = "error"
            elif u < error + malformed:
                fault = "malformed"
            elif u < error + malformed + timeout:
                fault = "timeout"
            if fault:
                self.counts[fault] += 1
            return fault

    def score(self, images: list[torch.Tensor], prompt: str) -> list[float]:
        x = torch.stack(images)
        with self._reward_lock, torch.no_grad():
            scores, _ = self.reward(x, [prompt] * len(images), None)
        return scores.float().cpu().tolist()


def pairwise_answer(r1: float, r2: float) -> str:
    better = 1 if r1 >= r2 else 2
    return (f"<think>\n1. Local judge score: \n    Image 1 ({r1:.6g}) - scored by the local reward; \n"
            f"    Image 2 ({r2:.6g}) - scored by the local reward\nTotal score:\nImage 1: {r1:.6g}\n"
            f"Image 2: {r2:.6g}\n</think>\n<answer>Image {better} is better</answer>")


def pointwise_answer(r: float) -> str:
    return f"Alignment Score (1-5): {r:.6g}\nCoherence Score (1-5): {r:.6g}\nStyle Score (1-5): {r:.6g}"


class _DeadlineSocket(io.RawIOBase):
    """A connection's raw reader: each receive waits at most ``idle`` seconds, and none starts or outlasts
    ``total`` seconds from the connection's start (``TimeoutError``), so a client trickling bytes cannot
    hold a worker longer than that however it paces them."""

    def __init__(self, sock, idle: float, total: float):
        self.sock, self.idle, self.end = sock, idle, time.monotonic() + total

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request was not received in time")
        self.sock.settimeout(min(self.idle, left))
        try:
            return self.sock.recv_into(buffer)
        finally:
            self.sock.settimeout(self.idle)  # what the writes of the answer wait


class JudgeHandler(BaseHTTPRequestHandler):
    server: JudgeServer
    server_version = "flowalign-judge"

    def setup(self):
        self.timeout = self.server.socket_timeout  # every read and write of the connection
        super().setup()
        self.rfile = io.BufferedReader(_DeadlineSocket(self.connection, self.timeout, self.server.request_timeout))

    def log_message(self, fmt, *args):
        if self.server.verbose:
            sys.stderr.write("judge-server: " + fmt % args + "\n")

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout); nothing to do
            pass

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": {"message": message, "type": "invalid_request_error", "code": status}})

    def _authorized(self) -> bool:
        if self.server._api_key and not self.server.key_matches(self.headers.get("Authorization", "")):
            self._error(401, "missing or wrong API key")
            return False
        return True

    def _read_body(self) -> bytes | None:
        """The request body, or None after answering why it is refused (no or a bad Content-Length, too
        large, chunked). A client that stops sending mid-body times out (the connection closes)."""
        if self.headers.get("Transfer-Encoding"):
            self._error(411, "send the body with a Content-Length (Transfer-Encoding is not supported)")
            return None
        length = self.headers.get("Content-Length")
        if length is None:
            self._error(411, "a POST needs a Content-Length header")
            return None
        if not length.strip().isdigit():
            self._error(400, f"Content-Length must be a non-negative integer, got {length[:40]!r}")
            return None
        n = int(length)
        if n > self.server.max_body_bytes:
            self._error(413, f"the body is {n} bytes, more than the {self.server.max_body_bytes} accepted")
            return None
        raw = self.rfile.read(n)
        if len(raw) < n:
            self.close_connection = True  # the client closed early: nobody to answer
            return None
        return raw

    def do_GET(self):
        if not self._authorized():
            return
        if self.path.rstrip("/") == "/v1/models":
            self._send(200, {"object": "list", "data": [
                {"id": self.server.model_name, "object": "model", "owned_by": "flowalign"}]})
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self):
        try:
            self._post()
        except (TimeoutError, ConnectionError):
            self.close_connection = True  # the client went idle or away
        except Exception as err:  # a bug of the server: the client still gets an answer, stderr the traceback
            traceback.print_exc()
            self._error(500, f"internal error: {type(err).__name__}")

    def _post(self):
        raw = self._read_body()  # read before any other reply, so the client sees it
        if raw is None:
            return
        if not self._authorized():
            return
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._error(404, f"no route {self.path}")
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            return self._error(415, f"the body must be JSON with Content-Type: application/json, got {content_type!r}")
        try:
            body = json.loads(raw)
            content = body["messages"][-1]["content"]
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            if not isinstance(content, list) or not all(isinstance(part, dict) for part in content):
                raise TypeError("messages[-1].content must be a string or a list of parts")
            urls = [part["image_url"]["url"] for part in content if part["type"] == "image_url"]
            text = "\n".join(part["text"] for part in content if part["type"] == "text")
            if not isinstance(text, str):
                raise TypeError("a text part's text must be a string")
        except (ValueError, KeyError, IndexError, TypeError, RecursionError) as err:
            return self._error(400, f"bad chat-completions request: {type(err).__name__}: {err}")
        if len(urls) not in (1, 2):
            return self._error(400, f"send one image (pointwise) or two (pairwise), got {len(urls)}")
        try:
            images = [decode_data_url(url, self.server.max_image_pixels) for url in urls]
        except ValueError as err:
            return self._error(400, f"bad image: {err}")

        fault = self.server.draw_fault()
        if self.server.delay:
            time.sleep(self.server.delay)
        if fault == "error":
            return self._error(500, "injected server error")
        if fault == "timeout":
            time.sleep(self.server.timeout_sleep)

        unigen = len(images) == 1 and unigenbench.is_request(text)  # UniGenBench: one verdict per test point
        pattern = PAIRWISE_PROMPT_RE if len(images) == 2 or unigen else POINTWISE_PROMPT_RE
        m = pattern.search(text)
        prompt = m.group(1) if m else text
        try:
            if len(images) == 2 and images[0].shape != images[1].shape:
                scores = [self.server.score([img], prompt)[0] for img in images]
            else:
                scores = self.server.score(images, prompt)
        except Exception as err:  # the local judge's fault is the client's server error, not a crash
            return self._error(500, f"local judge failed: {type(err).__name__}: {err}")
        if unigen:
            answer = unigenbench.answer_from_score(text, scores[0])
        else:
            answer = pairwise_answer(*scores) if len(images) == 2 else pointwise_answer(scores[0])
        if fault == "malformed":
            answer = "I am not able to compare these images."
        self._send(200, {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.server.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        })


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reward", default="jpeg_incompressibility",
                   help="local judge: a registered pointwise reward or 'package.module:callable'")
    p.add_argument("--reward-args", default="{}", help="JSON object of the reward factory's arguments")
    p.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (0 = any free port)")
    p.add_argument("--model-name", default="flowalign-judge", help="model id reported by /v1/models")
    p.add_argument("--delay", type=float, default=0.0, help="seconds added to every request")
    p.add_argument("--error-rate", type=float, default=0.0, help="fraction of requests answered HTTP 500")
    p.add_argument("--malformed-rate", type=float, default=0.0, help="fraction answered without a verdict")
    p.add_argument("--timeout-rate", type=float, default=0.0,
                   help="fraction that sleep --timeout-sleep seconds before answering")
    p.add_argument("--timeout-sleep", type=float, default=30.0, help="seconds a timeout fault sleeps")
    p.add_argument("--seed", type=int, default=0, help="seed of the fault draws")
    p.add_argument("--api-key-env", default=None,
                   help="require 'Authorization: Bearer <key>' with the key read from this environment variable")
    p.add_argument("--workers", type=int, default=32, help="threads serving connections (as many more may wait)")
    p.add_argument("--socket-timeout", type=float, default=30.0,
                   help="seconds a connection may stay silent before it is closed")
    p.add_argument("--request-timeout", type=float, default=120.0,
                   help="seconds a client has to send a whole request (against clients that trickle bytes)")
    p.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body, in MiB")
    p.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS,
                   help="largest image accepted, in pixels (width × height)")
    p.add_argument("--verbose", action="store_true", help="log every request on stderr")


def make_server(args: argparse.Namespace) -> JudgeServer:
    from .registry import build_reward

    try:
        reward_args = json.loads(args.reward_args)
    except json.JSONDecodeError as err:
        raise ValueError(f"--reward-args must be a JSON object: {err}") from err
    if not isinstance(reward_args, dict):
        raise ValueError("--reward-args must be a JSON object, e.g. '{\"device\": \"cpu\"}'")
    for name in ("error_rate", "malformed_rate", "timeout_rate"):
        if not 0 <= getattr(args, name) <= 1:
            raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1]")
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise ValueError(f"--api-key-env {args.api_key_env}: that environment variable is empty or unset")
    reward = build_reward(args.reward, **reward_args)
    return JudgeServer(args.port, reward, args.model_name, args.delay, args.error_rate, args.malformed_rate,
                       args.timeout_rate, args.timeout_sleep, args.seed, args.verbose, api_key,
                       workers=args.workers, socket_timeout=args.socket_timeout, request_timeout=args.request_timeout,
                       max_body_bytes=int(args.max_body_mb * (1 << 20)), max_image_pixels=args.max_image_pixels)


def run(args: argparse.Namespace) -> int:
    try:
        server = make_server(args)
    except ValueError as err:
        print(f"flowalign judge-server: error: {err}", file=sys.stderr)
        return 2
    port = server.server_address[1]
    print(f"flowalign judge-server listening on http://{HOST}:{port}/v1 "
          f"(model {args.model_name}, reward {args.reward})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flowalign.rewards.server", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
