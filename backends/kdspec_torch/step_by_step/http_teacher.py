"""An OpenAI-compatible chat-completions teacher (vLLM, SGLang, hosted APIs), standard library
only.

* **Request:** ``POST {base_url}/chat/completions`` with ``{"model", "messages", "max_tokens",
  "temperature", "top_p"}`` (+ ``"top_k"`` when set, which vLLM and SGLang accept, ``"stop"``
  when given, and a per-request ``"seed"`` when sampling, so a sampled run is reproducible where
  the server honours seeds). The reply's ``choices[0].message.content`` is the teacher's text and
  ``usage.{prompt,completion}_tokens`` its token counts.
* **Key:** read from the environment variable the spec names, sent only as the
  ``Authorization: Bearer`` header. It is never part of a cache key or entry, an event, a log
  line or an error message.
* **Concurrency:** at most ``max_concurrency`` requests in flight (a thread pool: the work is
  waiting on the network).
* **Retries:** a 429, a 5xx, a timeout or a dropped connection is retried up to ``max_retries``
  times, sleeping ``uniform(0, min(cap, base·2^attempt))`` ("full jitter") or the server's
  ``Retry-After`` when it sends one. 401/403/404 stop everything at once (a wrong key, URL or
  model name will not get better); another 4xx fails that request only.
* **Cache:** every successful reply is stored under ``cache_dir`` as
  ``<sha256[:2]>/<sha256>.json``, keyed by the SHA-256 of the canonical JSON of ``{"url",
  "body"}``, written atomically. A request whose key is cached is answered from disk without a
  call, so a resumed or repeated run never pays twice for the same request; identical requests
  within a run (a duplicated question, asked greedily) are sent once.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CallStats", "HTTPTeacherClient", "Reply", "TeacherConfigError", "request_key"]

BACKOFF_BASE_S = 1.0  # first retry waits up to 1 s, then 2, 4, ... (full jitter)
BACKOFF_CAP_S = 60.0
RETRY_STATUS = frozenset({429, 500, 502, 503, 504}) | frozenset(range(505, 600))
FATAL_STATUS = frozenset({401, 403, 404})


class TeacherConfigError(RuntimeError):
    """The endpoint refuses every request (wrong key, URL or model): stop at once."""


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


@dataclass
class Reply:
    """One prompt's outcome: `text` is None when the request failed (`error` says why;
    `transient` when it failed only for lack of retries, so a later run may succeed)."""

    text: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False
    error: str | None = None
    transient: bool = False


@dataclass
class CallStats:
    """Running totals, updated under a lock by the worker threads."""

    total: int
    done: int = 0
    cached: int = 0
    failed: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, reply: Reply) -> None:
        with self.lock:
            self.done += 1
            self.cached += reply.cached
            self.failed += reply.text is None
            self.prompt_tokens += reply.prompt_tokens
            self.completion_tokens += reply.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("total", "done", "cached", "failed", "retries",
                                              "prompt_tokens", "completion_tokens")}


def request_key(url: str, body: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of the URL and body (no headers: the key is not in it)."""
    canonical = json.dumps({"url": url, "body": body}, sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _backoff(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform(0, min(cap, base·2^attempt))."""
    return rng.uniform(0, min(cap, base * 2**attempt))


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date; fall back to our own backoff


class HTTPTeacherClient:
    """Chat completions for many prompts with bounded concurrency, retries and a disk cache
    (module doc). `api_key` is held in memory only."""

    def __init__(self, *, base_url: str, model: str, api_key: str | None, cache_dir: Path,
                 max_concurrency: int = 8, timeout_s: float = 60.0, max_retries: int = 5,
                 backoff_base_s: float | None = None, backoff_cap_s: float | None = None,
                 seed: int = 0):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self._api_key = api_key
        self.cache_dir = Path(cache_dir)
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_base_s = BACKOFF_BASE_S if backoff_base_s is None else backoff_base_s
        self.backoff_cap_s = BACKOFF_CAP_S if backoff_cap_s is None else backoff_cap_s
        self._rng = random.Random(seed)  # jitter only; never affects what is generated
        self._abort = threading.Event()

    def __repr__(self) -> str:  # no key in any repr that might reach a log
        return f"HTTPTeacherClient(url={self.url!r}, model={self.model!r})"

    def body(self, messages: list[dict[str, str]], *, max_tokens: int, temperature: float,
             top_p: float = 1.0, top_k: int = 0, stop: Sequence[str] = (),
             seed: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": messages,
                                "max_tokens": max_tokens, "temperature": temperature,
                                "top_p": top_p}
        if top_k:
            body["top_k"] = top_k
        if stop:
            body["stop"] = list(stop)
        if seed is not None and temperature > 0:
            body["seed"] = seed
        return body

    # -- cache ----------------------------------------------------------------------------

    def _cache_path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.json"

    def _cached(self, key: str) -> Reply | None:
        try:
            entry = json.loads(self._cache_path(key).read_text())
        except (OSError, ValueError):
            return None  # absent, or torn by a kill before the rename (never happens) -> ask
        return Reply(entry["text"], entry["prompt_tokens"], entry["completion_tokens"],
                     cached=True)

    def _store(self, key: str, body: dict[str, Any], reply: Reply) -> None:
        path = self._cache_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = {"key": key, "url": self.url, "request": body, "text": reply.text,
                 "prompt_tokens": reply.prompt_tokens,
                 "completion_tokens": reply.completion_tokens}
        tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(entry, ensure_ascii=False) + "\n")
        os.replace(tmp, path)

    # -- one request ----------------------------------------------------------------------

    def _post(self, body: dict[str, Any]) -> Reply:
        """One attempt; raises _Retryable for what a retry may fix."""
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(),
                                         headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            status = err.code
            err.close()
            if status in FATAL_STATUS:
                self._abort.set()
                raise TeacherConfigError(
                    f"the teacher endpoint {self.url} answered HTTP {status} for model "
                    f"{self.model!r}: check base_url, model and the API key variable") from None
            if status in RETRY_STATUS:
                raise _Retryable(f"HTTP {status}", _retry_after(err.headers)) from None
            return Reply(None, error=f"HTTP {status}")
        except TimeoutError as err:
            raise _Retryable(f"timeout after {self.timeout_s}s") from err
        except urllib.error.URLError as err:
            if isinstance(err.reason, (TimeoutError, socket.timeout)):
                raise _Retryable(f"timeout after {self.timeout_s}s") from None
            raise _Retryable(f"connection error: {err.reason}") from None
        except (ConnectionError, http.client.HTTPException) as err:
            raise _Retryable(f"connection error: {type(err).__name__}") from None
        try:
            payload = json.loads(raw)
        except ValueError:
            return Reply(None, error="the response is not JSON")
        return _reply(payload)

    def _ask(self, key: str, body: dict[str, Any], stats: CallStats) -> Reply:
        """The reply to one request (`key` its cache key): from the cache, or asked with
        retries and then cached."""
        cached = self._cached(key)
        if cached is not None:
            return cached
        for attempt in range(self.max_retries + 1):
            if self._abort.is_set():
                return Reply(None, error="aborted")
            try:
                reply = self._post(body)
            except _Retryable as err:
                if attempt == self.max_retries:
                    return Reply(None, error=f"{err} (gave up after {attempt + 1} attempts)",
                                 transient=True)
                with stats.lock:
                    stats.retries += 1
                time.sleep(err.retry_after if err.retry_after is not None else
                           _backoff(attempt, self.backoff_base_s, self.backoff_cap_s, self._rng))
                continue
            if reply.text is not None:
                self._store(key, body, reply)
            return reply
        raise AssertionError("unreachable")  # pragma: no cover

    # -- many requests --------------------------------------------------------------------

    def complete(self, bodies: Sequence[dict[str, Any]],
                 progress: Callable[[CallStats], None] = lambda stats: None,
                 ) -> tuple[list[Reply], CallStats]:
        """The reply to every body, in order, asking at most `max_concurrency` at a time.
        Identical bodies (a question asked twice, greedily) are asked once; `stats` counts
        distinct requests. `progress(stats)` is called after each reply. Raises
        TeacherConfigError when the endpoint refuses the credentials, URL or model."""
        keys = [request_key(self.url, body) for body in bodies]
        distinct = {key: body for key, body in zip(keys, bodies, strict=True)}
        stats = CallStats(total=len(distinct))
        answers: dict[str, Reply] = {}
        self._abort.clear()

        def work(key: str) -> None:
            answers[key] = reply = self._ask(key, distinct[key], stats)
            stats.add(reply)
            progress(stats)

        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            futures = [pool.submit(work, key) for key in distinct]
            errors = [f.exception() for f in futures]
        fatal = next((e for e in errors if isinstance(e, TeacherConfigError)), None)
        if fatal is not None:
            raise fatal
        other = next((e for e in errors if e is not None), None)
        if other is not None:
            raise other
        return [answers.get(key, Reply(None, error="not run")) for key in keys], stats


def _reply(payload: dict[str, Any]) -> Reply:
    """The text and token counts of a chat-completions response."""
    try:
        text = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return Reply(None, error="response has no choices[0].message.content")
    usage = payload.get("usage") or {}
    return Reply(str(text or ""), int(usage.get("prompt_tokens") or 0),
                 int(usage.get("completion_tokens") or 0))
