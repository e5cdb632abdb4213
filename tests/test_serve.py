"""``deltatune serve`` through the official ``openai`` client over loopback: the models list, chat and text
completions whose greedy answers equal transformers' in-process ``generate`` (base and each adapter alone, and
mixed in one batch), streaming, ``n``, ``stop``, ``seed`` and the stored system prompt."""

from __future__ import annotations

import concurrent.futures
import functools
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

import deltatune
from deltatune.generation.engine import GenerationEngine
from deltatune.generation.sampling import SamplingParams
from deltatune.runtime.loading import DTYPES, load_causal_lm
from serve_helpers import TERSE, Reference, client, save_adapter, serving, tiny_setup

HI = [{"role": "user", "content": "Hi there, who are you?"}]


@pytest.fixture(scope="module")
def server():
    model_dir, adapters = tiny_setup()
    with serving(model_dir, adapters, served_model_name="tiny") as (url, service):
        yield client(url), service


@pytest.fixture(scope="module")
def reference():
    return Reference(tiny_setup()[0])


def adapter_path(name: str):
    return None if name == "tiny" else tiny_setup()[1][name]


def test_models_lists_the_base_and_every_adapter_as_vllm_does(server):
    models = {m.id: m for m in server[0].models.list().data}
    assert list(models) == ["tiny", "plain", "terse", "dora"]
    assert all(m.object == "model" and m.owned_by == "deltatune" for m in models.values())
    assert models["tiny"].parent is None and models["tiny"].root == str(tiny_setup()[0])
    assert models["plain"].parent == "tiny" and models["plain"].root == str(tiny_setup()[1]["plain"].resolve())


@pytest.mark.parametrize("name", ["tiny", "plain", "terse", "dora"])
def test_greedy_chat_equals_in_process_generation(server, reference, name):
    answer = server[0].chat.completions.create(model=name, messages=HI, max_tokens=12, temperature=0)
    messages = [{"role": "system", "content": TERSE}, *HI] if name == "terse" else HI  # its stored system prompt
    assert answer.choices[0].message.content == reference.chat(adapter_path(name), messages, 12)
    assert answer.choices[0].finish_reason == "length" and answer.object == "chat.completion"
    assert answer.usage.completion_tokens == 12 and answer.usage.total_tokens == answer.usage.prompt_tokens + 12


def test_the_adapters_answer_differently(server):
    """So the equality above could fail: a mix-up of adapters would show."""
    answers = {
        server[0]
        .chat.completions.create(model=name, messages=HI, max_tokens=8, temperature=0)
        .choices[0]
        .message.content
        for name in ["tiny", "plain", "terse", "dora"]
    }
    assert len(answers) == 4


def test_requests_for_different_adapters_share_a_batch_and_answer_as_alone(server, reference):
    prompts = [[{"role": "user", "content": f"Question number {i}?"}] for i in range(3)]
    jobs = [(name, messages) for name in ["tiny", "plain", "dora"] for messages in prompts]

    def ask(job):
        name, messages = job
        reply = server[0].chat.completions.create(model=name, messages=messages, max_tokens=10, temperature=0)
        return reply.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    assert answers == [reference.chat(adapter_path(name), messages, 10) for name, messages in jobs]


def test_a_system_message_replaces_the_stored_one(server, reference):
    messages = [{"role": "system", "content": "Be formal."}, *HI]
    answer = server[0].chat.completions.create(model="terse", messages=messages, max_tokens=8, temperature=0)
    assert answer.choices[0].message.content == reference.chat(adapter_path("terse"), messages, 8)


@pytest.mark.parametrize("name", ["tiny", "plain"])
def test_greedy_text_completion_equals_in_process_generation(server, reference, name):
    answer = server[0].completions.create(model=name, prompt="The capital of France is", max_tokens=10, temperature=0)
    assert answer.object == "text_completion"
    assert answer.choices[0].text == reference.complete(adapter_path(name), "The capital of France is", 10)
    assert answer.usage.completion_tokens == 10


def test_a_prompt_of_token_ids_and_several_prompts(server, reference):
    ids = reference.tokenizer("Once upon a time")["input_ids"]
    answer = server[0].completions.create(model="plain", prompt=[ids, ids[:2]], max_tokens=6, temperature=0, n=2)
    texts = [c.text for c in sorted(answer.choices, key=lambda c: c.index)]
    first = reference.complete(adapter_path("plain"), "Once upon a time", 6)
    second = reference.tokenizer.decode(reference.ids(adapter_path("plain"), ids[:2], 6), skip_special_tokens=True)
    assert texts == [first, first, second, second]  # prompt i's n choices are indices i*n ... i*n + n - 1
    assert answer.usage.prompt_tokens == len(ids) + 2 and answer.usage.completion_tokens == 24


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_streamed_pieces_concatenate_to_the_whole_answer(server, kind):
    api = server[0]
    if kind == "chat":
        whole = api.chat.completions.create(model="dora", messages=HI, max_tokens=24, temperature=0)
        chunks = list(
            api.chat.completions.create(
                model="dora",
                messages=HI,
                max_tokens=24,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert {c.object for c in chunks} == {"chat.completion.chunk"}
        expected = whole.choices[0].message.content
    else:
        whole = api.completions.create(model="dora", prompt="Tell me", max_tokens=24, temperature=0)
        chunks = list(
            api.completions.create(
                model="dora",
                prompt="Tell me",
                max_tokens=24,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        expected = whole.choices[0].text
    assert text == expected and len([c for c in chunks if c.choices]) > 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_a_stream_without_include_usage_has_no_usage_chunk(server):
    chunks = list(server[0].chat.completions.create(model="plain", messages=HI, max_tokens=4, stream=True))
    assert all(c.choices for c in chunks)


def test_stop_cuts_the_text_before_the_first_stop_string(server):
    api = server[0]
    full = api.chat.completions.create(model="plain", messages=HI, max_tokens=16, temperature=0)
    text = full.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 3]  # a piece that may straddle tokens
    cut = api.chat.completions.create(model="plain", messages=HI, max_tokens=16, temperature=0, stop=[stop, "@@@"])
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < 16
    chunks = api.chat.completions.create(
        model="plain", messages=HI, max_tokens=16, temperature=0, stop=stop, stream=True
    )
    streamed = list(chunks)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text[: text.index(stop)]
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_n_answers_and_seeds_reproduce_sampled_answers(server):
    api = server[0]

    def sample(seed, n=3):
        reply = api.chat.completions.create(model="terse", messages=HI, max_tokens=8, temperature=0.9, seed=seed, n=n)
        assert sorted(c.index for c in reply.choices) == list(range(n))
        assert reply.usage.completion_tokens == sum(8 for _ in range(n))
        return [c.message.content for c in sorted(reply.choices, key=lambda c: c.index)]

    first = sample(5)
    assert sample(5) == first  # the same seed, the same answers
    assert len(set(first)) == 3  # n choices are different draws
    assert sample(6) != first
    greedy = api.chat.completions.create(model="terse", messages=HI, max_tokens=8, temperature=0, n=2)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content


def test_the_default_temperature_samples_as_openai_does(server):
    api = server[0]
    replies = {
        api.chat.completions.create(model="tiny", messages=HI, max_tokens=8, seed=s).choices[0].message.content
        for s in range(3)
    }
    assert len(replies) > 1


def test_health_answers(server):
    import httpx2 as httpx

    url = str(server[0].base_url).removesuffix("/v1/")
    assert httpx.get(f"{url}/health").status_code == 200


@functools.cache
def wide_model() -> tuple[Path, Path]:
    """The tiny chat model at hidden 64 (bitsandbytes' CPU 4-bit kernel wants 64-value blocks) and one adapter."""
    folder = Path(tempfile.mkdtemp(prefix="deltatune-serve-wide-"))
    config = AutoConfig.from_pretrained(tiny_setup()[0])
    config.hidden_size, config.intermediate_size, config.head_dim = 64, 128, 16
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder / "model")
    AutoTokenizer.from_pretrained(tiny_setup()[0]).save_pretrained(folder / "model")
    return folder / "model", save_adapter(folder / "model", folder / "adapter", seed=4)


@pytest.mark.parametrize(("option", "value"), [("dtype", "bfloat16"), ("quantization", "nf4")])
def test_a_half_precision_or_4bit_base_serves_as_loaded_in_process(option, value):
    """The server loads the base as ``deltatune train`` would; its greedy answers equal in-process generation over
    the same base (the engine's per-row adapter path, for the adapter in bf16, where rounding differs from
    transformers' unbatched path after a few tokens)."""
    model_dir, adapter = wide_model()
    base = load_causal_lm(model_dir, **{option: DTYPES[value] if option == "dtype" else value}).eval()
    model = deltatune.DeltaModel.from_pretrained(base, adapter, adapter_name="adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = list(tokenizer.apply_chat_template(HI, add_generation_prompt=True, tokenize=True)["input_ids"])
    params = SamplingParams(max_new_tokens=12, temperature=0)
    expected = {}
    for name, adapter_name in [("adapter", "adapter"), (str(model_dir), None)]:
        engine = GenerationEngine(model, [tokenizer.eos_token_id])
        row = engine.add(prompt, params, adapter=adapter_name)
        while engine.has_work:
            engine.step()
        expected[name] = tokenizer.decode(row.output_ids, skip_special_tokens=True)
    with torch.no_grad(), model.disable_adapter():
        plain = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert expected[str(model_dir)] == tokenizer.decode(plain[0, len(prompt) :], skip_special_tokens=True)
    with serving(model_dir, {"adapter": adapter}, **{option: value}) as (url, _service):
        for name, text in expected.items():
            reply = client(url).chat.completions.create(model=name, messages=HI, max_tokens=12, temperature=0)
            assert reply.choices[0].message.content == text
