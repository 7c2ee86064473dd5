"""`softprompt serve` over real HTTP on a free loopback port: mixed concurrent clients answered as each task alone,
bad requests as one-line 4xx errors, prompts added and removed (API and watched folder) under load, the API key,
read-only mode, the batcher's merging, and the playground in a headless browser."""

from __future__ import annotations

import asyncio
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn

from softprompt import TrainConfig, train
from softprompt.cli import main
from softprompt.pipeline import PromptedTask
from softprompt.serve import ServeOptions, create_app, load_model
from softprompt.serve.batcher import Batcher

from .test_tracking_report import _browser

SENTENCES = ["the film was good", "the film was bad number 3", "an awful, boring mess", "good", "bad bad bad",
             "a gorgeous, moving film that I will watch again"]
PAIRS = [{"first": "a cat number 1", "second": "a big dog"}, {"first": "a cat", "second": "a small dog"}]


def _train(tiny_dirs, root: Path, name: str, model: str = "llama", **extra) -> str:
    settings = dict(data=str(root / "sentiment.csv"), prompt_length=4, max_steps=2, eval_every=100, batch_size=8,
                    max_length=32, eval_test=False, progress=False)
    cfg = TrainConfig(model=tiny_dirs[model], output=str(root / name), **{**settings, **extra})
    return str(train(cfg, log=lambda *_: None).best_checkpoint)


@pytest.fixture(scope="module")
def ckpts(tiny_dirs, tmp_path_factory):
    """Prompts of one base model with different lengths, label sets, fields and readouts (label words, a
    user's file's default head); one of another base."""
    root = tmp_path_factory.mktemp("serve")
    words = {"good": "positive", "bad": "negative"}
    (root / "sentiment.csv").write_text("\n".join(
        ["text,label"] + [f"the film was {w} number {i},{words[w]}" for i in range(40) for w in words]))
    (root / "pairs.csv").write_text("\n".join(
        ["first,second,label"] + [f"a cat number {i},a {w} dog,{label}" for i in range(30)
                                  for w, label in (("big", "same"), ("small", "other"))]))
    return {"sentiment": _train(tiny_dirs, root, "sentiment", task_type="CAUSAL_LM"),
            "sentiment_b": _train(tiny_dirs, root, "sentiment_b", prompt_length=6, seed=1),
            "pair": _train(tiny_dirs, root, "pair", prompt_length=5, data=str(root / "pairs.csv"),
                           text_columns=["first", "second"]),
            "other_base": _train(tiny_dirs, root, "other_base", model="llama48"),
            "root": root}


@pytest.fixture(scope="module")
def reference(ckpts):
    """Each checkpoint alone, as PromptedTask predicts it."""
    return {name: PromptedTask.from_pretrained(ckpts[name]) for name in ("sentiment", "sentiment_b", "pair")}


class Server:
    """uvicorn in a thread, on a port the OS picked."""

    def __init__(self, app) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.app, self.server = app, uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    @property
    def batcher(self) -> Batcher:
        return self.app.state.softprompt.batcher

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def model(ckpts):
    return load_model([f"sentiment={ckpts['sentiment']}", f"pair={ckpts['pair']}"])


@pytest.fixture(scope="module")
def watch_dir(ckpts):
    folder = ckpts["root"] / "watched"
    shutil.copytree(ckpts["sentiment"], folder / "ensemble" / "a")
    shutil.copytree(ckpts["sentiment_b"], folder / "ensemble" / "b")
    return folder


@pytest.fixture(scope="module")
def server(model, watch_dir):
    running = Server(create_app(model, ServeOptions(max_batch=8, max_wait_ms=30, max_inputs=16, max_input_chars=300,
                                                   max_body_bytes=20_000, watch=str(watch_dir))))
    yield running
    running.stop()


def _close(got: dict, want: dict) -> None:
    assert got["label"] == want["label"]
    assert got["scores"] == pytest.approx(want["scores"], abs=2e-4)


def test_concurrent_mixed_clients_are_answered_as_each_task_alone(server, reference):
    want = {"sentiment": reference["sentiment"].predict(SENTENCES), "pair": reference["pair"].predict(PAIRS),
            "a": reference["sentiment"].predict(SENTENCES), "b": reference["sentiment_b"].predict(SENTENCES)}
    mixed = [{"task": "sentiment", "input": s} for s in SENTENCES] + [{"task": "pair", "input": p} for p in PAIRS]

    def client(n: int) -> list[tuple[str, list]]:
        answers = []
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for kind in ("sentiment", "mixed", "pair", "ensemble", "big")[n % 5:] + ("sentiment",):
                body = {"items": mixed} if kind == "mixed" else {"task": "ensemble", "inputs": SENTENCES} \
                    if kind == "ensemble" else {"task": "pair", "inputs": PAIRS} if kind == "pair" \
                    else {"task": "sentiment", "inputs": SENTENCES * (2 if kind == "big" else 1)}
                response = http.post("/v1/predict", json=body)
                assert response.status_code == 200, response.text
                answers.append((kind, response.json()["results"]))
        return answers

    calls = server.batcher.calls
    with ThreadPoolExecutor(8) as pool:
        runs = list(pool.map(client, range(8)))
    requests = sum(len(r) for r in runs)
    assert server.batcher.calls < requests  # concurrent requests shared forwards
    for answers in runs:
        for kind, results in answers:
            if kind == "ensemble":
                for got, a, b in zip(results, want["a"], want["b"]):
                    members = {m["member"]: m for m in got["members"]}  # named by their subfolders
                    _close(members["a"], a)
                    _close(members["b"], b)
                    mean = {k: (a["scores"][k] + b["scores"][k]) / 2 for k in a["scores"]}
                    assert got["scores"] == pytest.approx(mean, abs=2e-4) and got["vote"] in mean
                continue
            expected = [*want["sentiment"], *want["pair"]] if kind == "mixed" else \
                want["pair"] if kind == "pair" else want["sentiment"] * (2 if kind == "big" else 1)
            assert len(results) == len(expected)  # "big" (12 rows) spans two batches of at most 8
            for got, ref in zip(results, expected):
                _close(got, ref)
    assert server.batcher.calls > calls


def test_generate_equals_the_task_alone(server, reference):
    response = httpx.post(f"{server.url}/v1/generate", json={"task": "sentiment", "inputs": SENTENCES[:2],
                                                             "max_new_tokens": 4}, timeout=60)
    assert response.status_code == 200, response.text
    got = [r["generated"] for r in response.json()["results"]]
    assert got == reference["sentiment"].generate(SENTENCES[:2], max_new_tokens=4)


@pytest.mark.parametrize("method,path,body,status,says", [
    ("post", "/v1/predict", {"task": "nope", "inputs": ["x"]}, 404, "unknown task 'nope'"),
    ("post", "/v1/predict", {"items": [{"task": "sentiment", "input": "x"}, {"task": "gone", "input": "y"}]}, 404,
     "gone"),
    ("post", "/v1/predict", b'{"task": "sentiment", "inputs": [', 422, "not valid JSON"),
    ("post", "/v1/predict", b'{"task": "sentiment", "inputs": ["\xc3\x28"]}', 422, "not UTF-8 text"),
    ("post", "/v1/predict", b"[" * 5000 + b"]" * 5000, 422, "nests too deeply"),
    ("post", "/v1/predict", b"", 422, "the body is empty"),
    ("post", "/v1/predict", b'["sentiment"]', 422, "must be a JSON object"),
    ("post", "/v1/predict", {"task": "sentiment", "inputs": ["good", " \t "]}, 422, "input 1: empty or blank"),
    ("post", "/v1/predict", {"items": [{"task": "pair", "input": {"first": "", "second": " "}}]}, 422,
     "input 0: empty or blank"),
    ("post", "/v1/generate", {"task": "sentiment", "inputs": [""]}, 422, "input 0: empty or blank"),
    ("post", "/v1/predict", b'{"task": "sentiment"}', 422, "either task and inputs, or items"),
    ("post", "/v1/predict", {"task": "sentiment", "inputs": []}, 422, "inputs"),
    ("post", "/v1/predict", {"task": "sentiment", "inputs": [3]}, 422, "an input is a text"),
    ("post", "/v1/predict", {"task": "pair", "inputs": ["one text"]}, 422, "first, second"),
    ("post", "/v1/predict", {"task": "pair", "inputs": [{"first": "a"}]}, 422, "lacks second"),
    ("post", "/v1/predict", {"task": "sentiment", "inputs": ["x"], "extra": 1}, 422, "extra"),
    ("post", "/v1/predict", {"task": "sentiment", "inputs": ["x"] * 17}, 413, "limit is 16"),
    ("post", "/v1/predict", {"task": "sentiment", "inputs": ["x" * 301]}, 413, "over 300 characters"),
    ("post", "/v1/predict", {"task": "pair", "inputs": [{"first": "a", "second": "x" * 301}]}, 413, "300"),
    ("post", "/v1/predict", {"task": "sentiment", "inputs": ["x" * 250] * 90}, 413, "over 20000 bytes"),
    ("post", "/v1/generate", {"task": "sentiment", "inputs": ["x"], "max_new_tokens": 0}, 422, "max_new_tokens"),
    ("post", "/v1/prompts", {"path": "/no/such/checkpoint"}, 422, "/no/such/checkpoint"),
    ("post", "/v1/prompts", {"task": "x"}, 422, "path"),
    ("delete", "/v1/prompts/nope", None, 404, "nope"),
    ("get", "/v1/nothing", None, 404, "Not Found"),
])
def test_bad_requests_are_one_line_4xx(server, method, path, body, status, says):
    kwargs = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else \
        {"json": body} if body is not None else {}
    response = httpx.request(method, server.url + path, timeout=30, **kwargs)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and says in detail


def test_a_prompt_of_another_base_model_is_a_conflict(server, ckpts):
    response = httpx.post(f"{server.url}/v1/prompts", json={"path": ckpts["other_base"], "task": "x"}, timeout=60)
    assert response.status_code == 409, response.text
    assert "x" not in httpx.get(f"{server.url}/v1/tasks").json()["tasks"]


def _hammer(url: str, stop: threading.Event, failures: list) -> None:
    """Predict `sentiment` over and over until stopped, recording anything but a 200."""
    with httpx.Client(base_url=url, timeout=60) as http:
        while not stop.is_set():
            response = http.post("/v1/predict", json={"task": "sentiment", "inputs": SENTENCES[:3]})
            if response.status_code != 200:
                failures.append(response.text)


def _task_names(url: str) -> set[str]:
    return {t["name"] for t in httpx.get(f"{url}/v1/tasks").json()["tasks"]}


def test_prompts_added_and_removed_while_requests_run(server, ckpts, reference, watch_dir):
    stop, failures = threading.Event(), []
    workers = [threading.Thread(target=_hammer, args=(server.url, stop, failures)) for _ in range(3)]
    for worker in workers:
        worker.start()
    try:
        # through the API
        response = httpx.post(f"{server.url}/v1/prompts", json={"path": ckpts["sentiment_b"], "task": "added"},
                              timeout=60)
        assert response.status_code == 201, response.text
        assert response.json()["name"] == "added" and response.json()["labels"] == ["negative", "positive"]
        got = httpx.post(f"{server.url}/v1/predict", json={"task": "added", "inputs": SENTENCES}, timeout=60)
        for result, ref in zip(got.json()["results"], reference["sentiment_b"].predict(SENTENCES)):
            _close(result, ref)
        assert httpx.delete(f"{server.url}/v1/prompts/added").status_code == 200
        gone = httpx.post(f"{server.url}/v1/predict", json={"task": "added", "inputs": ["x"]}, timeout=60)
        assert gone.status_code == 404
        # one member of an ensemble
        assert httpx.delete(f"{server.url}/v1/prompts/pair", params={"member": "nope"}).status_code == 404
        # through the watched folder
        shutil.copytree(ckpts["pair"], watch_dir / "watched_pair")
        deadline = time.monotonic() + 15
        while "watched_pair" not in _task_names(server.url):
            assert time.monotonic() < deadline, "the watcher did not add the new checkpoint"
            time.sleep(0.2)
        got = httpx.post(f"{server.url}/v1/predict", json={"task": "watched_pair", "inputs": PAIRS}, timeout=60)
        for result, ref in zip(got.json()["results"], reference["pair"].predict(PAIRS)):
            _close(result, ref)
        shutil.rmtree(watch_dir / "watched_pair")
        while "watched_pair" in _task_names(server.url):
            assert time.monotonic() < deadline + 15, "the watcher did not remove the checkpoint"
            time.sleep(0.2)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    assert failures == []


def test_a_client_that_disconnects_does_not_stall_the_others(server):
    body = b'{"task": "sentiment", "inputs": ' + str(SENTENCES * 2).replace("'", '"').encode() + b"}"
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as sock:
            sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    started = time.monotonic()
    response = httpx.post(f"{server.url}/v1/predict", json={"task": "sentiment", "inputs": ["good"]}, timeout=30)
    assert response.status_code == 200 and time.monotonic() - started < 10


def test_batcher_skips_the_rest_of_a_cancelled_request_and_isolates_a_failing_one():
    ran, release = [], threading.Event()

    def run(key, rows):
        release.wait(5)
        ran.append(list(rows))
        if "bad" in rows:
            raise ValueError("bad row")
        return [row.upper() for row in rows]

    async def scenario():
        batcher = Batcher(run, max_batch=4, max_wait_ms=50)
        try:
            big = asyncio.ensure_future(batcher.submit("k", [f"a{i}" for i in range(12)]))
            await asyncio.sleep(0.1)  # its first 4 rows are running (held by `release`)
            ok = asyncio.ensure_future(batcher.submit("k", ["x", "y"]))
            bad = asyncio.ensure_future(batcher.submit("k", ["bad"]))
            await asyncio.sleep(0.02)
            big.cancel()
            await asyncio.gather(big, return_exceptions=True)
            release.set()
            assert await ok == ["X", "Y"]
            with pytest.raises(ValueError):
                await bad
        finally:
            batcher.close()

    asyncio.run(scenario())
    assert ran[0] == ["a0", "a1", "a2", "a3"]  # the cancelled request ran no further
    assert ran[1] == ["x", "y", "bad"] and ran[2:] == [["x", "y"], ["bad"]]  # the failed batch, then each alone


@pytest.fixture(scope="module")
def keyed(model, server):
    """A second server over the same model (used only while the first is idle): an API key, read-only."""
    running = Server(create_app(model, ServeOptions(api_key="s3cret", read_only=True)))
    yield running
    running.stop()


def test_api_key_and_read_only(keyed):
    url = keyed.url
    assert httpx.get(f"{url}/health").status_code == 200
    for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
        response = httpx.get(f"{url}/v1/tasks", headers=headers)
        assert response.status_code == 401 and "API key" in response.json()["detail"]
    for headers in ({"X-API-Key": "s3cret"}, {"Authorization": "Bearer s3cret"}):
        assert httpx.get(f"{url}/v1/tasks", headers=headers).status_code == 200
    assert httpx.get(f"{url}/docs", cookies={"softprompt_key": "s3cret"}).status_code == 200
    login = httpx.get(f"{url}/", headers={"Accept": "text/html"})
    assert login.status_code == 401 and "<form" in login.text
    # the cookie is for page loads only: it cannot carry a request another site forges
    posted = httpx.post(f"{url}/v1/predict", json={"task": "sentiment", "inputs": ["x"]},
                        cookies={"softprompt_key": "s3cret"})
    assert posted.status_code == 401
    auth = {"X-API-Key": "s3cret"}
    assert httpx.post(f"{url}/v1/predict", json={"task": "sentiment", "inputs": ["x"]}, headers=auth,
                      timeout=30).status_code == 200
    for method, path in (("post", "/v1/prompts"), ("delete", "/v1/prompts/sentiment")):
        kwargs = {"json": {"path": "whatever"}} if method == "post" else {}
        response = httpx.request(method, url + path, headers=auth, **kwargs)
        assert response.status_code == 403 and "read-only" in response.json()["detail"]
    assert "sentiment" in {t["name"] for t in httpx.get(f"{url}/v1/tasks", headers=auth).json()["tasks"]}


def test_cli_serve_refuses_what_it_cannot_serve(tmp_path, capsys):
    for argv in (["serve", str(tmp_path / "missing")], ["serve"], ["serve", "--watch", str(tmp_path / "nowhere")],
                 ["serve", str(tmp_path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err


@pytest.mark.slow
def test_playground_in_a_headless_browser(server):
    browser = _browser()
    try:
        browser.get(server.url + "/")
        browser.set_script_timeout(30)
        result = browser.execute_async_script("""
            const done = arguments[arguments.length - 1];
            const wait = (test, then, tries = 0) => test() ? then() :
                tries > 300 ? done({error: document.getElementById('error').textContent || 'timed out'}) :
                setTimeout(() => wait(test, then, tries + 1), 50);
            const choose = (name, fill, then) => {
              const select = document.getElementById('task');
              select.value = name;
              select.dispatchEvent(new Event('change'));
              fill();
              document.getElementById('predict').click();
              wait(() => document.querySelector('#scores'), then);
            };
            const read = () => ({label: document.getElementById('label').textContent,
                                 rows: [...document.querySelectorAll('#scores tr')].slice(1)
                                       .map(r => [...r.cells].map(c => c.textContent))});
            wait(() => document.querySelectorAll('#task option').length >= 3, () =>
              choose('pair', () => {
                document.getElementById('field-first').value = 'a cat number 1';
                document.getElementById('field-second').value = 'a big dog';
              }, () => {
                const pair = read();
                choose('ensemble', () => { document.getElementById('field-text').value = 'the film was good'; },
                       () => done({pair, ensemble: read(), boxes: document.querySelectorAll('textarea').length,
                                   vote: document.getElementById('vote').textContent}));
              }));""")
        assert "error" not in result, result
        pair = httpx.post(f"{server.url}/v1/predict", json={"task": "pair", "inputs": PAIRS[:1]}).json()["results"][0]
        assert result["pair"]["label"] == pair["label"]
        assert [row[0] for row in result["pair"]["rows"]] == ["probability"]
        shown = dict(zip(["other", "same"], (float(c) for c in result["pair"]["rows"][0][1:])))
        assert shown == pytest.approx(pair["scores"], abs=1e-3)
        rows = result["ensemble"]["rows"]
        assert result["boxes"] == 1 and len(rows) == 3 and rows[-1][0] == "ensemble" and "vote" in result["vote"]
        assert all(len(row) == 3 for row in rows)  # a name and one probability per label
        errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == []
    finally:
        browser.quit()


@pytest.mark.slow
def test_playground_asks_for_the_key_once_then_works(keyed):
    browser = _browser()
    try:
        browser.get(keyed.url + "/")
        browser.find_element("id", "key").send_keys("s3cret")
        browser.find_element("css selector", "#login button").click()
        browser.set_script_timeout(30)
        label = browser.execute_async_script("""
            const done = arguments[arguments.length - 1];
            const wait = (test, then, tries = 0) => test() ? then() :
                tries > 300 ? done('timed out: ' + document.body.innerText) :
                setTimeout(() => wait(test, then, tries + 1), 50);
            wait(() => document.getElementById('task') && document.querySelectorAll('#task option').length, () => {
              document.getElementById('task').value = 'sentiment';
              document.getElementById('task').dispatchEvent(new Event('change'));
              document.getElementById('field-text').value = 'the film was good';
              document.getElementById('predict').click();
              wait(() => document.querySelector('#scores'), () => done(document.getElementById('label').textContent));
            });""")
        assert label in ("negative", "positive"), label
    finally:
        browser.quit()
