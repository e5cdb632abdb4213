"""``deltatune serve``'s errors in OpenAI's shape (status, ``type``, ``param``), the API key, and that one bad
request, one failing prefill or one client that goes away disturbs no other request."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import httpx2 as httpx
import openai
import pytest

from serve_helpers import Reference, client, serving, tiny_setup

HI = [{"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def server():
    model_dir, adapters = tiny_setup()
    with serving(model_dir, {"plain": adapters["plain"]}, served_model_name="tiny", max_prompt_tokens=100) as (
        url,
        service,
    ):
        yield client(url), service


def raw(api, path: str, timeout: float = 30, **kwargs) -> httpx.Response:
    return httpx.post(f"{api.base_url}{path.lstrip('/')}", timeout=timeout, **kwargs)


def check_shape(response: httpx.Response, status: int, kind: str, param: str | None = None) -> str:
    body = response.json()
    assert response.status_code == status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == kind and body["error"]["code"] == status and body["error"]["param"] == param
    assert "\n" not in body["error"]["message"]
    return body["error"]["message"]


def test_an_unknown_model_is_a_404_naming_it_and_the_served_ones(server):
    with pytest.raises(openai.NotFoundError) as caught:
        server[0].chat.completions.create(model="nope", messages=HI)
    message = caught.value.body["message"]
    assert "nope" in message and "tiny, plain" in message and caught.value.body["type"] == "NotFoundError"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "tiny", "messages": HI, "temperature": -1}, "temperature"),
        ({"model": "tiny", "messages": HI, "n": 0}, "n"),
        ({"model": "tiny", "messages": HI, "seed": 2**70}, "seed"),
        ({"model": "tiny", "messages": []}, "messages"),
        ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"messages": HI}, "model"),
        ({"model": "tiny", "messages": HI, "logprobs": True}, "logprobs"),
        ({"model": "tiny", "messages": HI, "stop": [""]}, "stop"),
        ({"model": "tiny", "messages": HI, "max_tokens": 500}, "max_tokens"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "word " * 150}]}, "messages"),
        ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ],
)
def test_bad_fields_are_a_400_naming_the_field(server, body, param):
    check_shape(raw(server[0], "chat/completions", json=body), 400, "BadRequestError", param)


def test_the_openai_client_raises_bad_request(server):
    with pytest.raises(openai.BadRequestError, match="prompt has .* tokens, more than this server's 100"):
        server[0].completions.create(model="tiny", prompt="word " * 150)
    with pytest.raises(openai.BadRequestError, match=r"token ids must be in \[0, "):
        server[0].completions.create(model="tiny", prompt=[10**9])


def test_a_body_that_is_not_json_is_a_400(server):
    json_header = {"Content-Type": "application/json"}
    response = raw(server[0], "chat/completions", content=b"{not json", headers=json_header)
    assert "not valid JSON (Expecting property name" in check_shape(response, 400, "BadRequestError")
    response = raw(server[0], "chat/completions", content=b'{"model": "tiny"}')  # no JSON content type
    assert "must be a JSON object" in check_shape(response, 400, "BadRequestError")


def test_an_unknown_route_is_a_404_in_the_same_shape(server):
    check_shape(raw(server[0], "nothing/here", json={}), 404, "NotFoundError")


def test_the_api_key_guards_every_v1_route_but_not_health():
    model_dir, adapters = tiny_setup()
    with serving(model_dir, {}, api_key="sesame") as (url, _service):
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
            for path in ("models", "chat/completions", "completions", "load_lora_adapter"):
                response = httpx.request("GET" if path == "models" else "POST", f"{url}/{path}", headers=headers)
                check_shape(response, 401, "AuthenticationError")
        assert httpx.get(url.removesuffix("/v1") + "/health").status_code == 200
        assert [m.id for m in client(url, "sesame").models.list().data] == [str(model_dir)]


def test_one_malformed_request_among_good_ones_disturbs_none(server):
    reference = Reference(tiny_setup()[0])
    questions = [[{"role": "user", "content": f"Tell me about {i}."}] for i in range(6)]

    def good(messages):
        reply = server[0].chat.completions.create(model="plain", messages=messages, max_tokens=12, temperature=0)
        return reply.choices[0].message.content

    def bad():
        return raw(server[0], "chat/completions", content=b'{"model": "plain", "messages": [').status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = [pool.submit(good, m) for m in questions[:3]]
        broken = pool.submit(bad)
        answers += [pool.submit(good, m) for m in questions[3:]]
        assert broken.result() == 400
        assert [a.result() for a in answers] == [reference.chat(tiny_setup()[1]["plain"], m, 12) for m in questions]


def test_a_prefill_that_fails_fails_only_its_own_request(server):
    """A forward that raises on one prompt (a poison token) gives that request a 500; the requests that joined the
    batch with it are retried alone and answer as if nothing happened; the engine thread lives on."""
    api, service = server
    poison, gate, entered, opened = 4242, 4343, threading.Event(), threading.Event()

    def explode(_module, args):
        if args[0].shape[1] > 1 and bool((args[0] == gate).any()):
            entered.set()
            opened.wait(10)  # the engine waits here while the other requests queue up
        if args[0].shape[1] > 1 and bool((args[0] == poison).any()):
            raise RuntimeError("poisoned prompt")

    reference = Reference(tiny_setup()[0])
    prompts = [[100 + i, 200 + i, 300 + i] for i in range(4)]
    hook = service.scheduler.model.get_input_embeddings().register_forward_pre_hook(explode)
    try:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            first = pool.submit(api.completions.create, model="tiny", prompt=[gate, 1], max_tokens=8)
            assert entered.wait(10)
            futures = [
                pool.submit(api.completions.create, model="tiny", prompt=p, max_tokens=8, temperature=0)
                for p in [*prompts[:2], [1, poison, 2], *prompts[2:]]
            ]
            deadline = time.perf_counter() + 10
            while len(service.scheduler._inbox) < 5 and time.perf_counter() < deadline:
                time.sleep(0.01)  # all five reach the engine together, so they join in the same prefill
            opened.set()
            with pytest.raises(openai.InternalServerError, match="poisoned prompt"):
                futures[2].result()
            answers = [f.result().choices[0].text for i, f in enumerate(futures) if i != 2]
            assert first.result().usage.completion_tokens == 8
    finally:
        hook.remove()
    expected = [reference.tokenizer.decode(reference.ids(None, p, 8), skip_special_tokens=True) for p in prompts]
    assert answers == expected
    assert service.scheduler.alive and service.scheduler.rows_in_flight == 0


def test_a_failure_while_streaming_arrives_as_an_error_event(server):
    api, service = server

    def explode(_module, args):
        if args[0].shape[1] > 1:
            raise RuntimeError("broken prefill")

    hook = service.scheduler.model.get_input_embeddings().register_forward_pre_hook(explode)
    try:
        with pytest.raises(openai.APIError, match="broken prefill"):
            list(api.chat.completions.create(model="plain", messages=HI, max_tokens=5, stream=True))
    finally:
        hook.remove()
    assert service.scheduler.alive and service.scheduler.rows_in_flight == 0


def test_a_failed_decode_fails_the_running_rows_and_the_engine_goes_on(server):
    api, service = server
    engine = service.scheduler.engine
    embeddings = service.scheduler.model.get_input_embeddings()
    state = {"decodes": 0}

    def fail_the_fifth_decode(_module, args):
        if args[0].shape[1] == 1:
            state["decodes"] += 1
            if state["decodes"] == 5:
                raise RuntimeError("out of memory, say")

    hook = embeddings.register_forward_pre_hook(fail_the_fifth_decode)
    try:
        with pytest.raises(openai.InternalServerError, match="out of memory, say"):
            api.completions.create(model="plain", prompt="Hello", max_tokens=30, temperature=0)
    finally:
        hook.remove()
    reply = api.completions.create(model="plain", prompt="Hello", max_tokens=5, temperature=0)
    assert reply.usage.completion_tokens == 5 and service.scheduler.alive
    fresh = service.scheduler.engine  # a new engine, as the server's first: on its packed weights, static
    assert fresh is not engine and fresh.packed_weights is engine.packed_weights and fresh.static_weights


def wait_until_idle(service, seconds: float = 5.0) -> float:
    start = time.perf_counter()
    while service.scheduler.rows_in_flight and time.perf_counter() - start < seconds:
        time.sleep(0.01)
    return time.perf_counter() - start


@pytest.fixture
def slow_steps(server):
    """Each forward takes 20 ms more, so a 200-token answer takes 4 s: long after the checks below."""
    hook = server[1].scheduler.model.get_input_embeddings().register_forward_hook(lambda *_: time.sleep(0.02))
    yield
    hook.remove()


def test_a_client_that_closes_its_stream_frees_its_row_at_once(server, slow_steps):
    api, service = server
    stream = api.chat.completions.create(model="plain", messages=HI, max_tokens=200, temperature=0, stream=True)
    for _, _chunk in zip(range(4), stream):
        pass
    assert service.scheduler.rows_in_flight == 1
    stream.close()
    assert wait_until_idle(service) < 1


def test_a_client_that_gives_up_on_a_whole_answer_frees_its_row(server, slow_steps):
    api, service = server
    body = {"model": "plain", "messages": HI, "max_tokens": 200, "temperature": 0}
    with pytest.raises(httpx.TimeoutException):
        raw(api, "chat/completions", json=body, timeout=0.5)
    assert wait_until_idle(service) < 1


def test_a_stopped_engine_answers_503_at_once_instead_of_hanging():
    model_dir, _ = tiny_setup()
    with serving(model_dir, {}) as (url, service):
        service.scheduler.stop()
        response = httpx.post(f"{url}/completions", json={"model": str(model_dir), "prompt": "Hi"}, timeout=10)
        check_shape(response, 503, "ServiceUnavailableError")
        assert httpx.get(url.removesuffix("/v1") + "/health").status_code == 503
