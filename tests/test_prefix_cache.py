"""The engine's prefix cache (``generation/prefix_cache.py``): a prompt start that requests share is kept per
adapter with its keys and values, and a later prompt beginning with it prefills only the rest, with the answers
and log-probabilities of a prefill from the first token; any change to the model's parameters empties it."""

from __future__ import annotations

import pytest
import torch

import deltatune
import deltatune.generation.engine as engine_module
from deltatune import LoraConfig
from deltatune.errors import ConfigError
from deltatune.generation.engine import GenerationEngine
from deltatune.generation.prefix_cache import PrefixCache
from deltatune.generation.sampling import SamplingParams
from test_adapter_rows import mixed_model
from tiny_models import perturb_trainable, tiny_llama

SYSTEM = list(range(3, 23))  # 20 tokens every prompt starts with (a chat template's system prompt)
WARM_UP = [SYSTEM + [50 + i, 60] for i in range(5)]  # they share SYSTEM alone
QUESTIONS = [SYSTEM + [30 + i, 31, 32 + i][: 1 + i % 3] for i in range(5)]
NAMES = ["a", None, "b", "dora", "emb"]  # LoRA and DoRA of different ranks and targets, the base alone
GREEDY = SamplingParams(max_new_tokens=6, temperature=0)


@pytest.fixture(scope="module")
def model():
    return mixed_model().eval()


@pytest.fixture
def prefills(monkeypatch):
    """Each lean forward's (cached columns, new tokens) as the engine calls ``lean_forward``: a round's prefills
    first, then its decoding steps."""
    seen = []
    original = engine_module.lean_forward

    def spy(model, input_ids, positions, mask, buffers, columns, project=None):
        seen.append((columns, input_ids.shape[1]))
        return original(model, input_ids, positions, mask, buffers, columns, project)

    monkeypatch.setattr(engine_module, "lean_forward", spy)
    return seen


def answer(engine: GenerationEngine, prompts, names) -> list[tuple[list[int], list[float]]]:
    rows = [engine.add(prompt, GREEDY, adapter=name) for prompt, name in zip(prompts, names)]
    while engine.has_work:
        engine.step()
    return [(row.output_ids, row.logprobs) for row in rows]


def assert_same(answers, expected) -> None:
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(answers, expected):
        assert tokens == want_tokens
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(want_logprobs), atol=1e-5, rtol=1e-5)


def test_a_shared_start_is_prefilled_once_per_adapter_then_reused_with_the_same_answers(model, prefills):
    cached = GenerationEngine(model, max_batch=8, prefix_cache=4096)
    answer(cached, WARM_UP, NAMES)
    assert cached.prefixes.tokens == len(SYSTEM) * len(NAMES)  # one start per adapter (and the base)
    del prefills[:]
    answers = answer(cached, QUESTIONS, NAMES)
    assert prefills[:2] == [(len(SYSTEM), max(map(len, QUESTIONS)) - len(SYSTEM)), (max(map(len, QUESTIONS)), 1)]
    plain = GenerationEngine(model, max_batch=8)
    answer(plain, WARM_UP, NAMES)
    assert_same(answers, answer(plain, QUESTIONS, NAMES))


def test_rows_with_and_without_a_cached_start_prefill_apart_and_answer_as_without_cache(model, prefills):
    cached = GenerationEngine(model, max_batch=8, prefix_cache=4096)
    answer(cached, WARM_UP[:2], NAMES[:2])  # "a" and the base keep SYSTEM
    other = [[9, 8, 7, 6]] * 2  # shares nothing: from its first token
    del prefills[:]
    answers = answer(cached, QUESTIONS[:3] + other, NAMES[:3] + ["a", "b"])
    assert prefills[:2] == [(len(SYSTEM), 2), (0, len(QUESTIONS[2]))]  # "b" keeps nothing yet
    assert_same(answers, answer(GenerationEngine(model, max_batch=8), QUESTIONS[:3] + other, NAMES[:3] + ["a", "b"]))


def test_a_prompt_met_again_reuses_all_but_its_last_token(model, prefills):
    cached = GenerationEngine(model, max_batch=8, prefix_cache=4096)
    answer(cached, QUESTIONS[:1], ["b"])
    answer(cached, QUESTIONS[:1], ["b"])  # met before: all but its last token kept
    del prefills[:]
    answers = answer(cached, QUESTIONS[:1], ["b"])
    assert prefills[0] == (len(QUESTIONS[0]) - 1, 1)
    assert_same(answers, answer(GenerationEngine(model), QUESTIONS[:1], ["b"]))


def test_a_weight_written_in_place_empties_the_cache(model, prefills):
    cached = GenerationEngine(model, max_batch=8, prefix_cache=4096)
    answer(cached, WARM_UP, NAMES)
    weight = model.base_model.model.layers[0].self_attn.q_proj.lora_B["b"].weight
    with torch.no_grad():
        weight.add_(0.05)
    try:
        del prefills[:]
        answers = answer(cached, QUESTIONS, NAMES)
        assert prefills[0][0] == 0  # from the first token: the kept keys and values were "b"'s old ones
        assert_same(answers, answer(GenerationEngine(model, max_batch=8), QUESTIONS, NAMES))
    finally:
        with torch.no_grad():
            weight.sub_(0.05)


def test_an_adapter_deleted_and_loaded_again_under_its_name_is_not_answered_from_the_old_cache(tmp_path, prefills):
    model = mixed_model().eval()
    cached = GenerationEngine(model, max_batch=8, prefix_cache=4096)
    answer(cached, WARM_UP, NAMES)
    replacement = deltatune.get_delta_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear"), "b")
    perturb_trainable(replacement, seed=9)
    replacement.save_pretrained(tmp_path)
    model.delete_adapter("b")
    model.load_adapter(tmp_path / "b", adapter_name="b")  # an adapter not named "default" saves in its subfolder
    del prefills[:]
    answers = answer(cached, QUESTIONS, NAMES)
    assert prefills[0][0] == 0
    assert_same(answers, answer(GenerationEngine(model, max_batch=8), QUESTIONS, NAMES))


def test_rows_running_the_adapters_as_set_keep_nothing(model):
    cached = GenerationEngine(model, max_batch=8, prefix_cache=4096)
    for _ in range(2):
        cached.generate(WARM_UP, GREEDY)
    assert cached.prefixes.tokens == 0


def test_the_cache_keeps_at_most_its_capacity_dropping_the_least_recently_used():
    cache = PrefixCache(capacity=40, min_tokens=4)
    layers = [(torch.zeros(1, 20, 2), torch.zeros(1, 20, 2))]
    cache.store("a", tuple(range(20)), layers)
    cache.store("b", tuple(range(20)), layers)
    assert cache.reusable("a", list(range(25)))[0] == 20  # "a" used last: "b" leaves first
    cache.store("a", tuple(range(100, 110)), layers)
    assert cache.tokens == 30
    assert cache.reusable("b", list(range(25))) == (0, None)
    assert cache.reusable("a", list(range(25)))[0] == 20
    cache.store("c", tuple(range(41)), layers)  # longer than the capacity: not kept
    assert cache.tokens == 30 and cache.reusable("c", list(range(50))) == (0, None)


def test_what_is_kept_and_reused_is_the_longest_shared_start_under_the_last_token():
    cache = PrefixCache(capacity=100, min_tokens=4)
    system = (1, 2, 3, 4, 5)
    prompts = [system + (6, 7), system + (6, 8), system + (9,), (1, 2, 9)]
    assert cache.shared(prompts) == [6, 6, 5, 0]  # with its closest other prompt; under min_tokens: 0
    assert cache.shared([system + (9,)]) == [5]  # met before (recent): all but its last token
    layers = [(torch.arange(7.0).view(1, 7, 1), torch.zeros(1, 7, 1))]
    cache.store("a", system + (6, 7), layers)
    assert cache.reusable("a", list(system) + [6, 9, 9])[0] == 6  # a start of a longer kept one
    assert cache.reusable("a", list(system) + [6])[0] == 5  # all but the last token
    assert cache.reusable("b", list(system) + [6, 9])[0] == 0  # another adapter's
    assert cache.reusable("a", [1, 2, 3, 9, 9])[0] == 0  # shares 3 < min_tokens


def test_a_negative_size_is_refused(model):
    with pytest.raises(ConfigError, match="prefix_cache=-1 must be a number of tokens"):
        GenerationEngine(model, prefix_cache=-1)
