"""The OpenAI-compatible routes through the real `openai` client (sync, async, streaming) against a live server on
loopback: answers equal /v1/predict's and /v1/generate's, seeded samples repeat, sampling goes through the shared
prefix, bad requests get OpenAI's errors; and /metrics counted after known traffic."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import threading
import time

import httpx
import openai
import pytest
import torch
from openai import AsyncOpenAI, OpenAI
from prometheus_client.parser import text_string_to_metric_families

from softprompt.data import to_example
from softprompt.models.decoder import DecoderPromptModel
from softprompt.multitask import MultiTaskModel, Sampling, Wants
from softprompt.multitask.generation import Progress
from softprompt.serve import ServeOptions, create_app
from softprompt.tasks import get_task

from .conftest import random_checkpoint
from .test_serve import SENTENCES, Server

KEY = "k3y"
LIMIT = 40  # the server's --max-new-tokens
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
                "{% if add_generation_prompt %}assistant:{% endif %}"
PAIR = {"sentence1": "a cat sat on the mat", "sentence2": "the cat was sitting"}


@pytest.fixture(scope="module")
def prompts(tiny_dirs, tmp_path_factory):
    """Random prompts on one tiny Llama: label words (can generate), a head, a regression pair, label words on
    pairs, and two more label-word prompts for an ensemble."""
    root, llama, rt = tmp_path_factory.mktemp("openai"), tiny_dirs["llama"], get_task("rotten_tomatoes")
    return {"sentiment": random_checkpoint(root / "a", llama, rt, 4, "CAUSAL_LM", 1),
            "head": random_checkpoint(root / "b", llama, rt, 5, "SEQ_CLS", 2),
            "similarity": random_checkpoint(root / "c", llama, get_task("stsb"), 3, "SEQ_CLS", 3),
            "pair": random_checkpoint(root / "d", llama, get_task("mrpc"), 3, "CAUSAL_LM", 4),
            "member_a": random_checkpoint(root / "e", llama, rt, 6, "CAUSAL_LM", 5),
            "member_b": random_checkpoint(root / "f", llama, rt, 2, "CAUSAL_LM", 6)}


@pytest.fixture(scope="module")
def model(prompts):
    model = MultiTaskModel.from_pretrained({t: prompts[t] for t in ("sentiment", "head", "similarity", "pair")})
    for member in ("member_a", "member_b"):
        model.add(model.load(prompts[member], task="ensemble", member=member))
    return model


@pytest.fixture(scope="module")
def server(model):
    running = Server(create_app(model, ServeOptions(api_key=KEY, max_new_tokens=LIMIT, max_inputs=8, max_batch=8,
                                                    max_wait_ms=20)))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    with OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60) as client:
        yield client


def _post(server, path: str, body: dict) -> dict:
    response = httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def _predicted(server, task: str, inputs: list) -> list[dict]:
    return _post(server, "/v1/predict", {"task": task, "inputs": inputs})["results"]


def _generated(server, task: str, inputs: list, tokens: int) -> list[str]:
    results = _post(server, "/v1/generate", {"task": task, "inputs": inputs, "max_new_tokens": tokens})["results"]
    return [r["generated"] for r in results]


def _tokens(model, task: str, given) -> int:
    """The input's tokens as the task's (first) prompt reads it: its template and text."""
    prompted = model.prompts(task)[0].prompted
    return len(prompted.encoder.encode(to_example(given, prompted.task.fields)).input_ids)


def test_models_lists_the_base_model_and_every_task(client, model):
    listed = {m.id: m for m in client.models.list()}
    assert set(listed) == {model.base_name, "sentiment", "head", "similarity", "pair", "ensemble"}
    assert all(m.object == "model" and m.owned_by == "softprompt" for m in listed.values())
    assert listed[model.base_name].parent is None and listed["pair"].parent == model.base_name
    assert client.models.retrieve("ensemble").parent == model.base_name
    with pytest.raises(openai.NotFoundError) as refused:
        client.models.retrieve("nope")
    assert refused.value.code == "model_not_found"


@pytest.mark.parametrize("task,inputs", [("sentiment", SENTENCES), ("head", SENTENCES[:3]), ("ensemble", SENTENCES[:3]),
                                         ("pair", [PAIR, {**PAIR, "note": 5}])])
def test_a_classification_is_predict_s_label_with_every_label_s_log_probability(client, server, model, task, inputs):
    prompts = [i if isinstance(i, str) else json.dumps(i) for i in inputs]
    answer = client.completions.create(model=task, prompt=prompts)
    inputs = [i if isinstance(i, str) else {f: i[f] for f in PAIR} for i in inputs]  # a field it does not take: unread
    want = _predicted(server, task, inputs)
    assert answer.object == "text_completion" and answer.model == task and len(answer.choices) == len(inputs)
    for choice, result in zip(answer.choices, want):
        assert choice.text == result["label"] and choice.finish_reason == "stop"
        logprobs = choice.logprobs
        assert logprobs.tokens == [result["label"]] and logprobs.text_offset == [0]
        assert logprobs.top_logprobs[0] == {label: math.log(p) for label, p in result["scores"].items()}
        assert logprobs.token_logprobs == [math.log(result["scores"][result["label"]])]
    assert answer.usage.prompt_tokens == sum(_tokens(model, task, i) for i in inputs)
    assert answer.usage.completion_tokens == 0 and answer.usage.total_tokens == answer.usage.prompt_tokens


def test_chat_classifies_the_last_user_message_and_regression_answers_its_value(client, server, model):
    answer = client.chat.completions.create(model="head", messages=[
        {"role": "system", "content": "ignored by a task"}, {"role": "user", "content": "not this one"},
        {"role": "assistant", "content": "positive"}, {"role": "user", "content": SENTENCES[0]}])
    want = _predicted(server, "head", SENTENCES[:1])[0]
    choice = answer.choices[0]
    assert answer.object == "chat.completion" and choice.message.content == want["label"]
    assert choice.message.role == "assistant" and choice.finish_reason == "stop"
    top = {t.token: t.logprob for t in choice.logprobs.content[0].top_logprobs}
    assert top == {label: math.log(p) for label, p in want["scores"].items()}
    assert answer.usage.prompt_tokens == _tokens(model, "head", SENTENCES[0])
    value = client.completions.create(model="similarity", prompt=json.dumps(PAIR))
    assert float(value.choices[0].text) == _predicted(server, "similarity", [PAIR])[0]["value"]
    assert value.choices[0].logprobs is None


def test_greedy_generation_equals_v1_generate(client, server, model):
    want = _generated(server, "sentiment", SENTENCES, 6)
    answer = client.completions.create(model="sentiment", prompt=SENTENCES, max_tokens=6, temperature=0)
    assert [c.text for c in answer.choices] == want
    assert {c.finish_reason for c in answer.choices} == {"length"}  # this tokenizer has no end-of-text
    assert answer.usage.completion_tokens == 6 * len(SENTENCES)
    assert answer.usage.prompt_tokens == sum(_tokens(model, "sentiment", s) for s in SENTENCES)
    chat = client.chat.completions.create(model="sentiment", messages=[{"role": "user", "content": SENTENCES[1]}],
                                          max_completion_tokens=6, temperature=0)
    assert chat.choices[0].message.content == want[1]


def test_concurrent_async_clients_share_batches_and_get_their_own_answers(server):
    want = _generated(server, "sentiment", SENTENCES, 5)
    calls = server.batcher.calls

    async def ask() -> list[list[str]]:
        async with AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60) as client:
            answers = await asyncio.gather(*(client.completions.create(model="sentiment", prompt=[s], max_tokens=5,
                                                                       temperature=0) for s in SENTENCES))
        return [[c.text for c in a.choices] for a in answers]

    assert asyncio.run(ask()) == [[w] for w in want]
    assert server.batcher.calls - calls < len(SENTENCES)  # concurrent requests shared forwards


def test_a_seeded_sample_repeats_through_the_shared_prefix(client, server, monkeypatch):
    monkeypatch.setattr(DecoderPromptModel, "generate", lambda *a, **k: pytest.fail("left the shared prefix"))

    def sample(seed: int, prompts: list[str]) -> list[str]:
        answer = client.completions.create(model="sentiment", prompt=prompts, max_tokens=8, temperature=1.0,
                                           top_p=0.9, seed=seed)
        return [c.text for c in answer.choices]

    first = sample(7, SENTENCES[:1])
    assert sample(7, SENTENCES[:1]) == first
    assert sample(7, [SENTENCES[2], SENTENCES[0], SENTENCES[3]])[1] == first[0]  # whatever shares its batch
    assert any(sample(seed, SENTENCES[:1]) != first for seed in (8, 9, 10))
    assert first[0] != _generated(server, "sentiment", SENTENCES[:1], 8)[0]


def test_stop_cuts_the_text_and_the_generation(client, server):
    greedy = _generated(server, "sentiment", SENTENCES[:1], 12)[0]
    stop = greedy.split()[2]
    answer = client.completions.create(model="sentiment", prompt=SENTENCES[0], max_tokens=12, temperature=0,
                                       stop=[stop, "never appears"])
    assert answer.choices[0].text == greedy[:greedy.index(stop)] and answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens < 12
    chunks = list(client.completions.create(model="sentiment", prompt=SENTENCES[0], max_tokens=12, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == answer.choices[0].text  # never a piece of the stop string
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_streaming_gives_the_whole_answer_in_pieces(client, temperature):
    settings = dict(model="sentiment", max_tokens=10, temperature=temperature, seed=3)
    whole = client.completions.create(prompt=SENTENCES[:2], **settings)
    chunks = list(client.completions.create(prompt=SENTENCES[:2], stream=True,
                                            stream_options={"include_usage": True}, **settings))
    texts, finish = ["", ""], {}
    for chunk in chunks[:-1]:
        assert chunk.object == "text_completion" and chunk.id == chunks[0].id and chunk.usage is None
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert texts == [c.text for c in whole.choices] and finish == {0: "length", 1: "length"}
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    pieces = list(client.chat.completions.create(messages=[{"role": "user", "content": SENTENCES[0]}], stream=True,
                                                 **settings))
    assert pieces[0].choices[0].delta.role == "assistant" and pieces[-1].choices[0].finish_reason == "length"
    assert "".join(p.choices[0].delta.content or "" for p in pieces) == whole.choices[0].text


def test_a_streamed_classification_is_one_piece(client, server):
    pieces = list(client.chat.completions.create(model="sentiment", stream=True,
                                                 messages=[{"role": "user", "content": SENTENCES[0]}]))
    want = _predicted(server, "sentiment", SENTENCES[:1])[0]
    assert [p.choices[0].delta.content for p in pieces] == ["", want["label"]]
    assert pieces[-1].choices[0].finish_reason == "stop"


def test_the_base_model_generates_with_no_prompt(client, model):
    tokenizer, base = model.tokenizer, model.backbones.held["fp32"]
    ids = tokenizer(SENTENCES[0], return_tensors="pt")
    with torch.inference_mode():
        new = base.generate(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], max_new_tokens=6,
                            do_sample=False)[0, ids["input_ids"].shape[1]:]
    answer = client.completions.create(model=model.base_name, prompt=SENTENCES[0], max_tokens=6, temperature=0)
    assert answer.choices[0].text == tokenizer.decode(new, skip_special_tokens=True)
    assert answer.usage.prompt_tokens == ids["input_ids"].shape[1]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": SENTENCES[1]}]
    plain = client.chat.completions.create(model=model.base_name, messages=messages, max_tokens=3, temperature=0)
    assert plain.usage.prompt_tokens == len(tokenizer(SENTENCES[1])["input_ids"])  # no chat template: the last
    tokenizer.chat_template = CHAT_TEMPLATE
    try:
        chat = client.chat.completions.create(model=model.base_name, messages=messages, max_tokens=3, temperature=0)
    finally:
        tokenizer.chat_template = None
    rendered = "system: be brief\nuser: " + SENTENCES[1] + "\nassistant:"
    assert chat.usage.prompt_tokens == len(tokenizer(rendered, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("call,error,param", [
    (dict(model="nope", prompt="x"), openai.NotFoundError, "model"),
    (dict(model="sentiment", prompt="x", n=2), openai.BadRequestError, "n"),
    (dict(model="sentiment", prompt="x", best_of=3), openai.BadRequestError, "best_of"),
    (dict(model="sentiment", prompt="x", echo=True), openai.BadRequestError, "echo"),
    (dict(model="sentiment", prompt="x", suffix="!"), openai.BadRequestError, "suffix"),
    (dict(model="sentiment", prompt="x", extra_body={"guided_json": {}}), openai.BadRequestError, "guided_json"),
    (dict(model="sentiment", prompt="x", logprobs=21), openai.UnprocessableEntityError, "logprobs"),
    (dict(model="sentiment", prompt="x", max_tokens=5, logprobs=2), openai.BadRequestError, "logprobs"),
    (dict(model="sentiment", prompt="x", max_tokens=LIMIT + 1), openai.UnprocessableEntityError, "max_tokens"),
    (dict(model="sentiment", prompt="x", temperature=3), openai.UnprocessableEntityError, "temperature"),
    (dict(model="sentiment", prompt=[1, 2, 3]), openai.UnprocessableEntityError, "prompt"),
    (dict(model="sentiment", prompt=" "), openai.UnprocessableEntityError, None),
    (dict(model="head", prompt="x", max_tokens=5), openai.UnprocessableEntityError, None),
    (dict(model="pair", prompt="one text"), openai.BadRequestError, "prompt"),
    (dict(model="pair", prompt='{"sentence1": "a"}'), openai.BadRequestError, "prompt"),
])
def test_bad_completions_get_openai_errors(client, call, error, param):
    with pytest.raises(error) as refused:
        client.completions.create(**call)
    assert refused.value.type == "invalid_request_error" and refused.value.param == param
    assert isinstance(refused.value.message, str) and "\n" not in refused.value.body["message"]


@pytest.mark.parametrize("extra,error,param", [
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), openai.BadRequestError, "tools"),
    (dict(functions=[{"name": "f", "parameters": {}}]), openai.BadRequestError, "functions"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]),
     openai.BadRequestError, "messages.0.content"),
    (dict(messages=[{"role": "tool", "content": "42", "tool_call_id": "a"}]), openai.BadRequestError,
     "messages.0.role"),
    (dict(messages=[{"role": "system", "content": "no user"}]), openai.BadRequestError, "messages"),
    (dict(n=3), openai.BadRequestError, "n"),
    (dict(max_completion_tokens=LIMIT + 1), openai.UnprocessableEntityError, "max_completion_tokens"),
    (dict(logprobs=True, top_logprobs=21), openai.UnprocessableEntityError, "top_logprobs"),
])
def test_bad_chats_get_openai_errors(client, extra, error, param):
    call = {"model": "sentiment", "messages": [{"role": "user", "content": "x"}], **extra}
    with pytest.raises(error) as refused:
        client.chat.completions.create(**call)
    assert refused.value.param == param and refused.value.body["message"]


def test_the_key_is_the_bearer_token(server):
    with OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError) as refused:
            client.models.list()
    assert refused.value.code == "invalid_api_key"


def _scrape(server, headers: dict | None = None) -> dict[tuple[str, tuple], float]:
    response = httpx.get(server.url + "/metrics", headers=headers if headers is not None else {"X-API-Key": KEY})
    assert response.status_code == 200, response.text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def test_a_client_leaving_a_stream_stops_its_generation(client, server, monkeypatch):
    push = Progress.push

    def slow(self, token):
        time.sleep(0.05)
        return push(self, token)

    monkeypatch.setattr("softprompt.multitask.generation.Progress.push", slow)
    before = _scrape(server)[("softprompt:generation_tokens_total", ())]
    stream = client.completions.create(model="sentiment", prompt=SENTENCES[0], max_tokens=LIMIT, temperature=0,
                                       stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 10
    while _scrape(server)[("softprompt:generation_tokens_total", ())] == before:
        assert time.monotonic() < deadline, "the generation did not end"
        time.sleep(0.05)
    assert _scrape(server)[("softprompt:generation_tokens_total", ())] - before < LIMIT / 2


def test_a_row_stops_at_its_next_token_once_cancelled(model):
    cancel = threading.Event()
    out = model.complete([("sentiment", SENTENCES[0]), ("sentiment", SENTENCES[1])], Sampling(30), [
        Wants(emit=lambda _: cancel.set(), cancelled=cancel), Wants()])
    assert out[0].tokens == 1 and out[1].tokens == 30


def test_sampling_outside_the_shared_prefix_repeats_too(model):
    """A prompt the engine does not share samples through transformers' generate, seeded per row."""
    items = [("sentiment", SENTENCES[0])]
    shared = [model.complete(items, Sampling(8, 1.0), [Wants(seed=5)])[0].text for _ in range(2)]
    greedy = model.complete(items, Sampling(8))[0].text
    engine = model.prompts("sentiment")[0].prompted.model.engine
    engine.force_off("test")
    try:
        alone = [model.complete(items, Sampling(8, 1.0), [Wants(seed=5)])[0].text for _ in range(2)]
        assert model.complete(items, Sampling(8))[0].text == greedy
    finally:
        engine.force_off(None)
    assert shared[0] == shared[1] and alone[0] == alone[1]


def test_metrics_count_the_traffic(model, tmp_path, prompts):
    watched = tmp_path / "watched"
    shutil.copytree(prompts["head"], watched / "watched_head")
    running = Server(create_app(model, ServeOptions(api_key=KEY, watch=str(watched), max_batch=4)))
    try:
        auth = {"Authorization": f"Bearer {KEY}"}
        with httpx.Client(base_url=running.url, headers=auth, timeout=60) as http:
            for _ in range(2):
                assert http.post("/v1/predict", json={"task": "sentiment", "inputs": SENTENCES[:3]}).status_code == 200
            assert http.post("/v1/completions", json={"model": "head", "prompt": SENTENCES[:2]}).status_code == 200
            assert http.post("/v1/completions", json={"model": "sentiment", "prompt": SENTENCES[:2], "max_tokens": 5,
                                                      "temperature": 0}).status_code == 200
            assert http.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
            assert http.post("/v1/prompts", json={"path": prompts["pair"], "task": "added"}).status_code == 201
            assert http.post("/v1/prompts", json={"path": "/no/such/checkpoint"}).status_code == 422
        assert httpx.get(running.url + "/v1/tasks").status_code == 401
        assert httpx.get(running.url + "/metrics").status_code == 401
        got = _scrape(running)
    finally:
        running.stop()
        model.remove("added")
        model.remove("watched_head")

    def requests(route: str, task: str, status: int) -> float:
        return got.get(("softprompt:requests_total", (("route", route), ("status", str(status)), ("task", task))), 0)

    assert requests("/v1/predict", "sentiment", 200) == 2 and requests("/v1/completions", "head", 200) == 1
    assert requests("/v1/completions", "sentiment", 200) == 1 and requests("/v1/completions", "", 404) == 1
    assert requests("/v1/prompts", "", 201) == 1 and requests("/v1/prompts", "", 422) == 1
    assert requests("none", "", 401) == 2
    latency = got[("softprompt:e2e_request_latency_seconds_count", (("route", "/v1/predict"),))]
    assert latency == 2
    tokens = 2 * sum(_tokens(model, "sentiment", s) for s in SENTENCES[:3]) + sum(
        _tokens(model, "head", s) for s in SENTENCES[:2]) + sum(_tokens(model, "sentiment", s) for s in SENTENCES[:2])
    assert got[("softprompt:prompt_tokens_total", ())] == tokens
    assert got[("softprompt:generation_tokens_total", ())] == 10
    assert got[("softprompt:request_queue_time_seconds_count", ())] == 4  # four requests reached the batcher
    rows = got[("softprompt:batch_next_size_sum", ())]
    assert rows == 3 + 3 + 2 + 2 and got[("softprompt:batch_next_size_count", ())] == 4  # one batch each
    assert got[("softprompt:num_requests_waiting", ())] == 0
    assert got[("softprompt:tasks_loaded", ())] == len(model.tasks()) + 2
    assert got[("softprompt:prompt_loads_total", (("source", "api"),))] == 1
    assert got[("softprompt:prompt_load_failures_total", (("source", "api"),))] == 1
    assert got[("softprompt:prompt_loads_total", (("source", "watch"),))] == 1


def test_metrics_open_needs_no_key(model):
    running = Server(create_app(model, ServeOptions(api_key=KEY, metrics_open=True)))
    try:
        assert httpx.get(running.url + "/metrics").status_code == 200
        assert httpx.get(running.url + "/v1/models").status_code == 401
    finally:
        running.stop()
