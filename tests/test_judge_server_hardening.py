"""``flowalign judge-server`` against bad clients, on 127.0.0.1: every malformed request gets a 4xx answer
with a message, and a bounded flood of bad requests (oversize bodies, idle connections, bad JSON, bad
base64) neither stops it answering good requests nor grows its threads past the worker pool."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from flowalign.rewards import build_judge
from flowalign.rewards.vlm import image_data_url
from test_judges_http import KEY_ENV, SECRET, Server, _noise_levels

WORKERS = 4


@pytest.fixture(scope="module")
def server():
    s = Server("--api-key-env", KEY_ENV, "--workers", str(WORKERS), "--socket-timeout", "1", "--request-timeout", "3",
               "--max-body-mb", "1", env={KEY_ENV: SECRET, "OMP_NUM_THREADS": "1"})
    yield s
    s.close()


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("Threads:")).split()[1])


def _raw(port: int, data: bytes, timeout: float = 10.0) -> tuple[int | None, bytes]:
    """Send ``data`` on a fresh connection → (HTTP status or None when closed without an answer, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    reply = b"".join(chunks)
    if not reply.startswith(b"HTTP/"):
        return None, reply
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _post(body: bytes, content_type: str = "application/json", length: str | None = None, key: str = SECRET) -> bytes:
    headers = [b"POST /v1/chat/completions HTTP/1.1", b"Host: 127.0.0.1", f"Authorization: Bearer {key}".encode(),
               f"Content-Type: {content_type}".encode()]
    if length != "":
        headers.append(f"Content-Length: {len(body) if length is None else length}".encode())
    return b"\r\n".join(headers) + b"\r\n\r\n" + body


def _chat(*urls: str) -> bytes:
    content = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": "「a cat」"}]
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": content}]}).encode()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png(side: int) -> bytes:
    """A side × side PNG header with a few bytes of data (a decompression bomb's shape)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _png_chunk(b"IEND", b""))


GOOD = image_data_url(torch.rand(3, 16, 16))
PNG = base64.b64decode(GOOD.split(",", 1)[1])
CASES = {
    "negative length": (_post(b"{}", length="-1"), 400, "Content-Length"),
    "invalid length": (_post(b"{}", length="12abc"), 400, "Content-Length"),
    "no length": (_post(b"", length=""), 411, "Content-Length"),
    "oversize": (_post(b"x" * 65536, length=str(200 << 20)), 413, "more than the"),
    "text/plain": (_post(_chat(GOOD, GOOD), content_type="text/plain"), 415, "application/json"),
    "bad json": (_post(b'{"messages": [}'), 400, "JSONDecodeError"),
    "not an object": (_post(b"[1, 2]"), 400, "bad chat-completions request"),
    "bad base64": (_post(_chat("data:image/png;base64,@@@not-base64@@@", GOOD)), 400, "base64 is invalid"),
    "not an image": (_post(_chat("data:image/png;base64," + base64.b64encode(os.urandom(300)).decode(), GOOD)),
                     400, "cannot be decoded"),
    "truncated image": (_post(_chat("data:image/png;base64," + base64.b64encode(PNG[: len(PNG) // 2]).decode(),
                                    GOOD)), 400, "cannot be decoded"),
    "decompression bomb": (_post(_chat("data:image/png;base64," + base64.b64encode(_bomb_png(100_000)).decode(),
                                       GOOD)), 400, "DecompressionBombError"),
    "too many pixels": (_post(_chat("data:image/png;base64," + base64.b64encode(_bomb_png(5000)).decode(), GOOD)),
                        400, "5000x5000 pixels, more than the 16777216 accepted"),
    "not a data url": (_post(_chat("http://example.com/cat.png", GOOD)), 400, "data URLs"),
    "wrong key": (_post(_chat(GOOD, GOOD), key="sk-wrong"), 401, "API key"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_bad_request_gets_an_answer_with_a_message(server, case):
    data, status, message = CASES[case]
    got, body = _raw(server.port, data)
    assert got == status, (case, got, body[:300])
    assert message in json.loads(body)["error"]["message"]


def _judge(url: str):
    os.environ[KEY_ENV] = SECRET
    return build_judge("vlm", endpoint=url, model="m", api_key_env=KEY_ENV, timeout=10.0, retries=8, backoff=0.25,
                       concurrency=2)


def _idle(port: int) -> float:
    """Connect, send half a request line, wait → seconds until the server closes the connection."""
    t0 = time.time()
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(b"POST /v1/chat/com")
        while sock.recv(4096):
            pass
    return time.time() - t0


def test_a_flood_of_bad_requests_leaves_it_answering_good_ones_with_bounded_threads(server):
    pid = server.proc.pid
    judge = _judge(server.url)
    images = _noise_levels([0.1, 0.9])
    assert judge.prefer(["a cat"], images[:1], images[1:]).tolist() == [0.0]  # the noisier image wins
    base = _threads(pid)
    peak, stop = [base], threading.Event()

    def sample():
        while not stop.is_set():
            peak.append(_threads(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    bad = [CASES["oversize"][0], CASES["bad json"][0], CASES["bad base64"][0], CASES["negative length"][0]]
    statuses, idle_s = [], []
    with ThreadPoolExecutor(max_workers=16) as pool:  # the flood: 16 connections at a time
        idles, raws = [], []
        for i in range(100):  # every fifth connection idles, the others send one of the bad requests
            if i % 5 == 4:
                idles.append(pool.submit(_idle, server.port))
            else:
                raws.append(pool.submit(_raw, server.port, bad[i % len(bad)]))
        verdicts = [judge.prefer(["a cat"], images[:1], images[1:]).item() for _ in range(3)]  # during the flood
        statuses = [f.result()[0] for f in raws]
        idle_s = [f.result() for f in idles]
    stop.set()
    sampler.join()
    assert verdicts == [0.0, 0.0, 0.0]
    # every bad request was answered: its 4xx, or 503 while the pool and its queue were full
    assert set(statuses) <= {400, 413, 503} and {400, 413} <= set(statuses), statuses
    assert max(idle_s) < 8  # idle connections are closed after the socket timeout (1 s), once served
    assert max(peak) <= base + WORKERS, (base, max(peak))
    after = [judge.prefer(["a cat"], images[1:], images[:1]).item() for _ in range(3)]
    assert after == [1.0, 1.0, 1.0] and server.proc.poll() is None


@pytest.mark.parametrize("part", ["headers", "body"])
def test_a_client_trickling_bytes_is_cut_off_at_the_request_deadline(server, part):
    """One byte every 0.5 s keeps each read inside the 1 s socket timeout; the 3 s request deadline ends it."""
    head = _post(_chat(GOOD, GOOD))
    start = head.index(b"\r\n\r\n") + 4 if part == "body" else 20
    t0 = time.time()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head[:start])
        closed = False
        for byte in head[start:start + 40]:
            time.sleep(0.5)
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
        if not closed:
            sock.settimeout(5)
            try:
                while sock.recv(4096):
                    pass
            except ConnectionResetError:
                pass
    assert time.time() - t0 < 8  # cut off after ~3 s (the 40 bytes would take 20 s)
