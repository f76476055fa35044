"""The HTTP teacher path of the rationales node against a chat-completions server started by the
test on 127.0.0.1: retries on an injected 500 and a timeout, bounded concurrency, a rerun served
wholly from the cache, and an API key that reaches no file of the run directory."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

from conftest import TinyRun  # noqa: E402

from kdspec.plan.planner import build_plan  # noqa: E402
from kdspec.spec import Spec  # noqa: E402
from kdspec_torch.step_by_step import http_teacher  # noqa: E402
from kdspec_torch.step_by_step.http_teacher import (  # noqa: E402
    HTTPTeacherClient,
    TeacherConfigError,
    request_key,
)
from kdspec_torch.step_by_step.rationales_node import run_rationales_node  # noqa: E402

KEY = "sk-test-7f3a9c1e5b2d4f60"
KEY_ENV = "KDSPEC_TEST_TEACHER_KEY"
CLIENT_TIMEOUT = 0.5
QUESTIONS = [f"What is {a} + {b}?" for a, b in [(1, 2), (3, 4), (5, 6), (7, 7), (2, 9), (8, 1)]]


class TeacherServer:
    """`/v1/chat/completions` answering `What is a + b?` with `a + b = c. The answer is c.`
    (wrong for 7 + 7, to exercise the gold filter). `script[question]` lists what the first
    attempts at a question get ("500", "timeout", "429", "400", "garbage": a 200 that is not
    JSON); later attempts are answered."""

    def __init__(self, *, delay: float = 0.0, timeout_sleep: float = 1.5):
        self.requests = 0
        self.attempts: Counter[str] = Counter()
        self.bodies: list[dict[str, Any]] = []
        self.auth: set[str | None] = set()
        self.script: dict[str, list[str]] = {}
        self.in_flight = self.max_in_flight = 0
        self.delay, self.timeout_sleep = delay, timeout_sleep
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def answer(self, question: str) -> str:
        a, b = map(int, re.findall(r"\d+", question)[:2])
        c = a + b + (1 if (a, b) == (7, 7) else 0)
        return f"{a} + {b} = {c}. The answer is {c}."

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep the test output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                question = body["messages"][-1]["content"]
                with server.lock:
                    server.requests += 1
                    server.bodies.append(body)
                    server.auth.add(self.headers.get("Authorization"))
                    attempt = server.attempts[question]
                    server.attempts[question] += 1
                    script = server.script.get(question, [])
                    action = script[attempt] if attempt < len(script) else "ok"
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                self.released = False
                try:
                    self._respond(action, question, body)
                finally:
                    self._release()

            def _release(self) -> None:
                """The request stops counting as in flight (once)."""
                with server.lock:
                    server.in_flight -= not self.released
                    self.released = True

            def _respond(self, action: str, question: str, body: dict[str, Any]) -> None:
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": "not found"})
                if self.headers.get("Authorization") != f"Bearer {KEY}":
                    return self._send(401, {"error": "bad key"})
                if action == "timeout":
                    # Stop counting it a little before the client gives up (the server cannot
                    # see that moment; counting late would overcount its retry), then outlast it.
                    time.sleep(CLIENT_TIMEOUT / 2)
                    self._release()
                    time.sleep(server.timeout_sleep)
                time.sleep(server.delay)
                if action == "garbage":
                    return self._send(200, None)
                if action in ("500", "429", "400"):
                    headers = {"Retry-After": "0"} if action == "429" else {}
                    return self._send(int(action), {"error": action}, headers)
                text = server.answer(question)
                prompt_tokens = sum(len(m["content"].split()) for m in body["messages"])
                self._send(200, {"choices": [{"message": {"role": "assistant",
                                                          "content": text}}],
                                 "usage": {"prompt_tokens": prompt_tokens,
                                           "completion_tokens": len(text.split())}})

            def _send(self, status: int, payload: dict[str, Any] | None,
                      headers: dict[str, str] | None = None) -> None:
                data = b"<html>gateway</html>" if payload is None else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for name, value in {"Content-Type": "application/json",
                                        "Content-Length": str(len(data)),
                                        **(headers or {})}.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

        return Handler


@pytest.fixture
def server() -> Iterator[TeacherServer]:
    srv = TeacherServer(delay=0.05)
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_teacher, "BACKOFF_BASE_S", 0.01)


def http_run(folder: Path, base_url: str, **http: Any) -> TinyRun:
    spec_dir, run_dir = folder / "spec", folder / "run"
    spec_dir.mkdir(parents=True, exist_ok=True)
    run_dir.mkdir(exist_ok=True)
    with open(spec_dir / "sums.jsonl", "w") as handle:
        for q in QUESTIONS:
            a, b = map(int, re.findall(r"\d+", q))
            handle.write(json.dumps({"input": q, "label": str(a + b)}) + "\n")
    spec = Spec.model_validate({
        "kdspec": 1, "name": "http", "tokenizer": "builtin:words",
        "models": {"small": {"arch": {"family": "llama", "d_model": 32, "n_layers": 1,
                                      "n_heads": 2, "d_ff": 64, "max_seq_len": 64}}},
        "data": {"sums": {"source": "jsonl:sums.jsonl"}},
        "stages": [{
            "name": "dss", "kind": "step_by_step", "student": "small", "data": "sums",
            "steps": 1,
            "rationales": {
                "template": "Q: {input}\nA:",
                "demonstrations": [{"input": "What is 2 + 2?", "rationale": "2 + 2 = 4.",
                                    "label": "4"}],
                "generation": {"max_new_tokens": 32, "temperature": 0.0},
                "http": {"base_url": base_url, "model": "tiny-teacher", "api_key_env": KEY_ENV,
                         "max_concurrency": 2, "timeout_s": CLIENT_TIMEOUT, "max_retries": 3,
                         **http},
            },
        }],
    })
    plan = build_plan(spec, base_dir=spec_dir, estimate=False)
    assert not plan.errors, plan.errors
    return TinyRun(spec, plan, spec_dir, run_dir)


def turn(question: str) -> str:
    """The question's user turn, as the node sends it."""
    return f"Q: {question}\nA:"


def _read(run: TinyRun, name: str) -> Any:
    path = run.run_dir / "dss.rationales" / name
    if name.endswith(".jsonl"):
        return [json.loads(line) for line in path.read_text().splitlines()]
    return json.loads(path.read_text())


def test_retries_cache_and_no_key_on_disk(tmp_path: Path, server: TeacherServer,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    server.script = {turn(QUESTIONS[1]): ["500"], turn(QUESTIONS[2]): ["timeout"]}
    run = http_run(tmp_path, server.base_url)
    run_rationales_node(run.ctx("dss.rationales"))

    # every question asked once, plus one retry each for the 500 and the timeout
    assert server.requests == len(QUESTIONS) + 2
    assert server.attempts[turn(QUESTIONS[1])] == server.attempts[turn(QUESTIONS[2])] == 2
    assert server.max_in_flight <= 2
    assert server.auth == {f"Bearer {KEY}"}
    first = server.bodies[0]
    assert first["model"] == "tiny-teacher" and first["max_tokens"] == 32
    assert first["temperature"] == 0.0 and first["stop"] == ["Q:"] and "seed" not in first
    assert first["messages"][:2] == [
        {"role": "user", "content": "Q: What is 2 + 2?\nA:"},
        {"role": "assistant", "content": "2 + 2 = 4. The answer is 4."}]

    rows = _read(run, "rationales.jsonl")
    assert [r["input"] for r in rows] == [q for q in QUESTIONS if q != "What is 7 + 7?"]
    assert rows[0] == {"index": 0, "input": "What is 1 + 2?", "rationale": "1 + 2 = 3.",
                       "label": "3", "raw": "1 + 2 = 3. The answer is 3.", "gold": "3"}
    stats = _read(run, "stats.json")
    assert (stats["kept"], stats["disagrees_with_gold"], stats["unparsed"]) == (5, 1, 0)
    assert stats["teacher_accuracy"] == pytest.approx(5 / 6)
    http = stats["http"]
    assert (http["done"], http["cached"], http["failed"], http["retries"]) == (6, 0, 0, 2)
    assert http["completion_tokens"] == sum(
        len(server.answer(q).split()) for q in QUESTIONS)
    progress = [e for e in run.events if e.kind == "progress"]
    assert progress[-1].step == 6 and progress[-1].values["cached"] == 0

    # A rerun (a resumed node, or one run again) is answered from the cache alone.
    before = server.requests
    run_rationales_node(run.ctx("dss.rationales"))
    assert server.requests == before
    assert _read(run, "stats.json")["http"]["cached"] == 6
    assert _read(run, "rationales.jsonl") == rows

    # The key is in no file of the run directory and in no event.
    files = [p for p in run.run_dir.rglob("*") if p.is_file()]
    assert any(p.parent.parent.name == "http_cache" for p in files)
    for path in files:
        assert KEY.encode() not in path.read_bytes(), path
    assert KEY not in repr(run.events)


def test_cache_key_ignores_the_key_and_follows_the_request(tmp_path: Path) -> None:
    client = HTTPTeacherClient(base_url="http://h/v1", model="m", api_key=KEY,
                               cache_dir=tmp_path)
    body = client.body([{"role": "user", "content": "x"}], max_tokens=8, temperature=0.0,
                       seed=5)
    assert "seed" not in body  # greedy: a seed changes nothing, so keep the key stable
    other_key = HTTPTeacherClient(base_url="http://h/v1", model="m", api_key="sk-other",
                                  cache_dir=tmp_path)
    assert request_key(client.url, body) == request_key(other_key.url, body)
    sampled = client.body([{"role": "user", "content": "x"}], max_tokens=8, temperature=0.7,
                          top_k=5, seed=5)
    assert sampled["seed"] == 5 and sampled["top_k"] == 5
    assert request_key(client.url, sampled) != request_key(client.url, body)
    assert KEY not in repr(client)


def test_a_wrong_key_stops_at_once(tmp_path: Path, server: TeacherServer) -> None:
    client = HTTPTeacherClient(base_url=server.base_url, model="m", api_key="sk-wrong",
                               cache_dir=tmp_path, max_concurrency=1)
    bodies = [client.body([{"role": "user", "content": f"Q: {q}"}], max_tokens=8,
                          temperature=0.0) for q in QUESTIONS]
    with pytest.raises(TeacherConfigError, match="HTTP 401") as err:
        client.complete(bodies)
    assert "sk-wrong" not in str(err.value)
    assert server.requests == 1  # the other requests were never sent
    assert not list(tmp_path.rglob("*.json"))


def test_bad_request_fails_one_and_429_honours_retry_after(
        tmp_path: Path, server: TeacherServer) -> None:
    server.script = {"Q: " + QUESTIONS[0]: ["400"], "Q: " + QUESTIONS[1]: ["429", "429"]}
    client = HTTPTeacherClient(base_url=server.base_url, model="m", api_key=KEY,
                               cache_dir=tmp_path, max_retries=2, backoff_base_s=30.0)
    bodies = [client.body([{"role": "user", "content": f"Q: {q}"}], max_tokens=8,
                          temperature=0.0) for q in QUESTIONS[:3]]
    started = time.perf_counter()
    replies, stats = client.complete(bodies)
    assert time.perf_counter() - started < 10  # Retry-After: 0, not the 30 s backoff
    assert replies[0].text is None and replies[0].error == "HTTP 400"
    assert not replies[0].transient
    assert replies[1].text == server.answer(QUESTIONS[1]) and replies[2].text is not None
    assert server.attempts["Q: " + QUESTIONS[0]] == 1  # not retried
    assert server.attempts["Q: " + QUESTIONS[1]] == 3
    assert (stats.failed, stats.retries, stats.done) == (1, 2, 3)


def test_identical_requests_are_sent_once_and_a_non_json_reply_fails_one(
        tmp_path: Path, server: TeacherServer) -> None:
    server.script = {"Q: " + QUESTIONS[1]: ["garbage"]}
    client = HTTPTeacherClient(base_url=server.base_url, model="m", api_key=KEY,
                               cache_dir=tmp_path)
    asked = [QUESTIONS[0], QUESTIONS[1], QUESTIONS[0]]
    bodies = [client.body([{"role": "user", "content": f"Q: {q}"}], max_tokens=8,
                          temperature=0.0) for q in asked]
    replies, stats = client.complete(bodies)
    assert server.requests == 2 and stats.total == stats.done == 2
    assert replies[0].text == replies[2].text == server.answer(QUESTIONS[0])
    assert replies[1].text is None and replies[1].error == "the response is not JSON"
    assert not replies[1].transient and stats.failed == 1


def test_exhausted_retries_fail_the_node_and_a_rerun_pays_only_for_them(
        tmp_path: Path, server: TeacherServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    server.script = {turn(QUESTIONS[4]): ["500"] * 4}  # 1 attempt + 3 retries, all failing
    run = http_run(tmp_path, server.base_url)
    with pytest.raises(RuntimeError, match="1 of 6 teacher requests still failed after 3 "
                                           "retries .*HTTP 500"):
        run_rationales_node(run.ctx("dss.rationales"))
    assert server.requests == len(QUESTIONS) + 3
    before = server.requests
    run_rationales_node(run.ctx("dss.rationales"))  # the server answers it now
    assert server.requests == before + 1
    assert _read(run, "stats.json")["http"]["cached"] == 5


def test_missing_key_variable_is_named(tmp_path: Path, server: TeacherServer,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    run = http_run(tmp_path, server.base_url)
    with pytest.raises(RuntimeError, match=f"{KEY_ENV} .* is not set"):
        run_rationales_node(run.ctx("dss.rationales"))
    assert server.requests == 0
