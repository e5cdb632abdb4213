"""The generation engine: batched greedy answers equal transformers' one-prompt ``generate``; rows that finish
leave and rows that arrive join without changing anyone's tokens; seeded rows draw from their own stream;
top-k / top-p keep exactly the tokens the plain formula keeps; the returned log-probabilities are the model's."""

from __future__ import annotations

import pytest
import torch

import deltatune
from deltatune.errors import ConfigError
from deltatune.generation.engine import GenerationEngine
from deltatune.generation.sampling import SamplingParams, choose, draw, filtered_logits
from tiny_models import perturb_trainable, tiny_gpt2, tiny_llama

PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [3, 4, 5, 6, 7, 8, 9, 10, 11], [40]]
GREEDY = SamplingParams(max_new_tokens=10, temperature=0)


@pytest.fixture(scope="module")
def model():
    return tiny_llama().eval()


@pytest.fixture(scope="module")
def adapted():
    torch.manual_seed(0)  # A's initialisation: the answers (and whether one reaches the model's EOS) are fixed
    delta = deltatune.get_delta_model(tiny_llama(), deltatune.LoraConfig(r=4, target_modules="all-linear"))
    perturb_trainable(delta)
    return delta.eval()


def alone(model, prompt: list[int], new_tokens: int = 10) -> list[int]:
    """transformers' greedy answer to one prompt (no padding anywhere)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def dora():
    config = deltatune.LoraConfig(r=4, target_modules="all-linear", use_dora=True)
    torch.manual_seed(0)
    delta = deltatune.get_delta_model(tiny_llama(), config)
    perturb_trainable(delta)
    return delta.eval()


@pytest.mark.parametrize("which", ["base", "lora", "dora"])
def test_batched_greedy_answers_equal_one_prompt_generate(model, adapted, dora, which):
    network = {"base": model, "lora": adapted, "dora": dora}[which]
    rows = GenerationEngine(network).generate(PROMPTS, GREEDY)
    for prompt, row in zip(PROMPTS, rows):
        assert row.output_ids == alone(network, prompt)
        assert row.finish_reason == "length"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_llama_prefills_and_decodes_through_its_layers_and_other_models_through_their_forwards(family, monkeypatch):
    """A Llama-family model prefills and decodes through ``lean_forward`` (its layers, without its forward's
    machinery), any other model through its forward; both answer as transformers' ``generate``."""
    import deltatune.generation.engine as engine_module

    network = tiny_llama() if family == "llama" else tiny_gpt2()
    widths = []
    original = engine_module.lean_forward
    monkeypatch.setattr(engine_module, "lean_forward", lambda *args: widths.append(args[1].shape[1]) or original(*args))
    rows = GenerationEngine(network).generate(PROMPTS, GREEDY)
    assert [row.output_ids for row in rows] == [alone(network, prompt) for prompt in PROMPTS]
    longest = max(map(len, PROMPTS))  # the prefill (every prompt left-padded to the longest), then one token a step
    assert widths == ([longest] + [1] * (GREEDY.max_new_tokens - 1) if family == "llama" else [])


def test_a_wrapped_mlp_keeps_the_models_forward_and_its_answers():
    """``modules_to_save=["mlp"]`` puts each MLP in a wrapper holding a trained copy: reading the MLP's parts would
    run the original, so such a model prefills and decodes through its forward, on packed weights too."""
    from deltatune.compat.transformers import lean_decoder
    from deltatune.kernels.packed_linear import PackedWeights

    torch.manual_seed(0)
    config = deltatune.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["mlp"])
    network = deltatune.get_delta_model(tiny_llama(), config)
    perturb_trainable(network)  # the MLP copies differ from the originals
    network.eval()
    assert not lean_decoder(network.base_model)
    eos = network.base_model.config.eos_token_id  # transformers' generate stops there
    engine = GenerationEngine(network, stop_token_ids=[eos], packed_weights=PackedWeights(network))
    rows = engine.generate(PROMPTS, GREEDY)
    assert [row.output_ids for row in rows] == [alone(network, prompt) for prompt in PROMPTS]


def test_a_hook_on_an_adapted_model_keeps_its_forward_at_every_step(adapted):
    """``lean_forward`` would bypass a hook on the ``DeltaModel`` itself: with one, every forward is the model's."""
    calls = []
    handle = adapted.register_forward_hook(lambda *args: calls.append(1))
    try:
        GenerationEngine(adapted).generate(PROMPTS[:1], GREEDY)
    finally:
        handle.remove()
    assert len(calls) == GREEDY.max_new_tokens  # the prefill and every decoding step


@pytest.mark.parametrize(
    "adapters", [["a", "b", "b", None], ["a", "a", None, "a"]], ids=["two adapters", "one adapter"]
)
def test_a_servers_decoding_steps_keep_their_plan_until_a_hook_or_an_adapter_changes(adapters):
    """Under ``static_weights`` a decoding step takes the last step's plan (packed forwards, joined products, the
    adapters' stacked factors) while nothing it depends on changed. A hook that comes, or an adapter deleted and
    loaded again under its name, makes a new one: the kept engine answers as one that plans every step."""
    from deltatune.kernels.packed_linear import PackedWeights

    torch.manual_seed(0)
    model = deltatune.get_delta_model(tiny_llama(), deltatune.LoraConfig(r=4, target_modules="all-linear"), "a")
    model.add_adapter("b", deltatune.LoraConfig(r=2, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # both adapters' factors (B starts at zero; only the active adapter trains)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    model.eval()
    engines = [
        GenerationEngine(model, packed_weights=PackedWeights(model), static_weights=static) for static in (True, False)
    ]
    for engine in engines:
        for prompt, adapter in zip(PROMPTS, adapters):
            engine.add(prompt, SamplingParams(max_new_tokens=9, temperature=0), adapter=adapter)

    def step() -> list[tuple[int, float]]:
        answers = [[(event.token_id, event.row.logprobs[-1]) for event in engine.step()] for engine in engines]
        (tokens, logprobs), (their_tokens, their_logprobs) = (list(zip(*answer)) for answer in answers)
        assert tokens == their_tokens and logprobs == pytest.approx(their_logprobs, abs=1e-5)
        return answers[0]

    step(), step()
    plan = engines[0]._kept
    step()
    assert engines[0]._kept is plan  # the same rows, adapters and hooks
    o_proj = model.base_model.model.layers[0].self_attn.o_proj
    handle = o_proj.register_forward_hook(lambda module, args, out: out * 0)
    try:
        step()  # a stale plan would run o_proj's packed product, not the module and its hook
    finally:
        handle.remove()
    assert engines[0]._kept is not plan
    name = adapters[1]  # an adapter some rows run
    saved = {key: param.clone() for key, param in model.adapter_state(name).items()}
    model.delete_adapter(name)
    model.add_adapter(name, deltatune.LoraConfig(r=4 if name == "a" else 2, target_modules="all-linear"))
    with torch.no_grad():
        for key, param in model.adapter_state(name).items():
            param.copy_(saved[key] * (3 if "lora_B" in key else 1))  # a stale stack would keep the old B's
    plan = engines[0]._kept
    step()
    assert engines[0]._kept is not plan


def test_a_row_that_stops_leaves_and_the_others_are_unchanged(model):
    stop = alone(model, PROMPTS[0])[3]  # prompt 0's fourth greedy token ends it
    engine = GenerationEngine(model, stop_token_ids=[stop])
    rows = [engine.add(prompt, GREEDY) for prompt in PROMPTS]
    widths = []
    while engine.has_work:
        engine.step()
        widths.append(len(engine.running))
    assert rows[0].output_ids == alone(model, PROMPTS[0])[:4] and rows[0].finish_reason == "stop"
    for prompt, row in zip(PROMPTS[1:], rows[1:]):
        expected = alone(model, prompt)
        cut = expected.index(stop) + 1 if stop in expected else len(expected)
        assert row.output_ids == expected[:cut]
    assert widths[0] == len(PROMPTS) and min(widths) < len(PROMPTS)


def test_a_row_that_arrives_mid_way_joins_the_running_batch(model):
    engine = GenerationEngine(model)
    first = engine.add(PROMPTS[2], GREEDY)
    for _ in range(3):
        engine.step()
    late = engine.add(PROMPTS[1], GREEDY)
    events = engine.step()
    assert {id(event.row) for event in events} == {id(first), id(late)}  # decoded together from here on
    while engine.has_work:
        engine.step()
    assert first.output_ids == alone(model, PROMPTS[2]) and late.output_ids == alone(model, PROMPTS[1])


def test_columns_no_row_needs_are_dropped_when_the_longest_row_leaves(model):
    engine = GenerationEngine(model)
    long = engine.add(list(range(3, 30)), SamplingParams(max_new_tokens=1, temperature=0))
    short = engine.add([7, 8], SamplingParams(max_new_tokens=5, temperature=0))
    engine.step()
    assert long.finish_reason == "length" and engine.running == [short]
    assert engine._mask.shape[1] == 2  # the long prompt's columns went, from the mask and from the cache:
    assert engine._cache[0][0].shape[2] == 2 + 5  # short's 2 and the room reserved for its 5 tokens
    while engine.has_work:
        engine.step()
    assert short.output_ids == alone(model, [7, 8], 5)


def test_decoding_writes_each_column_into_the_reserved_room_and_regrows_when_it_runs_out(model, monkeypatch):
    import deltatune.generation.engine as engine_module

    monkeypatch.setattr(engine_module, "ROOM", 3)
    engine = GenerationEngine(model)
    rows = [engine.add(prompt, SamplingParams(max_new_tokens=9, temperature=0)) for prompt in PROMPTS]
    engine.step()  # prefill: every row's first token, a cache with room for 3 more columns
    buffer = engine._cache[0][0]
    width = engine._mask.shape[1]
    assert buffer.shape[2] == width + 3
    engine.step()
    assert engine._cache[0][0] is buffer  # written in place, no copy of the cache
    while engine.has_work:
        engine.step()
    assert [row.output_ids for row in rows] == [alone(model, prompt, 9) for prompt in PROMPTS]  # regrown twice


def test_max_batch_queues_the_rest(model):
    engine = GenerationEngine(model, max_batch=2)
    rows = [engine.add(prompt, GREEDY) for prompt in PROMPTS]
    engine.step()
    assert len(engine.running) == 2 and len(engine.waiting) == 2
    while engine.has_work:
        engine.step()
        assert len(engine.running) <= 2
    assert [row.output_ids for row in rows] == [alone(model, prompt) for prompt in PROMPTS]


def test_a_seeded_row_draws_the_same_tokens_whatever_shares_its_batch(model):
    seeded = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3)
    by_itself = GenerationEngine(model).generate([PROMPTS[0]], seeded)[0].output_ids
    crowd = GenerationEngine(model, seed=9).generate(
        PROMPTS, [seeded, SamplingParams(max_new_tokens=3), SamplingParams(max_new_tokens=8, seed=5), GREEDY]
    )
    assert crowd[0].output_ids == by_itself
    other_seed = GenerationEngine(model).generate([PROMPTS[0]], SamplingParams(max_new_tokens=8, seed=4))
    assert other_seed[0].output_ids != by_itself


def test_unseeded_rows_follow_the_engine_seed(model):
    params = SamplingParams(max_new_tokens=8)
    first = [row.output_ids for row in GenerationEngine(model, seed=1).generate(PROMPTS, params)]
    again = [row.output_ids for row in GenerationEngine(model, seed=1).generate(PROMPTS, params)]
    other = [row.output_ids for row in GenerationEngine(model, seed=2).generate(PROMPTS, params)]
    assert first == again and first != other


def test_top_k_of_one_is_greedy(model):
    rows = GenerationEngine(model).generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=2.0, top_k=1))
    assert [row.output_ids for row in rows] == [alone(model, prompt) for prompt in PROMPTS]


def test_logprobs_are_the_models_at_the_sampling_temperature(model):
    temperature = 0.7
    row = GenerationEngine(model).generate([PROMPTS[0]], SamplingParams(max_new_tokens=6, temperature=temperature))[0]
    ids = torch.tensor([PROMPTS[0] + row.output_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(PROMPTS[0]) - 1 : -1]
    expected = (logits / temperature).log_softmax(-1).gather(-1, torch.tensor(row.output_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(row.logprobs), expected, atol=1e-5, rtol=0)


def test_filtered_logits_keep_what_the_plain_formula_keeps():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    top_k = torch.tensor([0, 5, 0, 3, 1, 0])
    top_p = torch.tensor([1.0, 1.0, 0.5, 0.9, 1.0, 0.05])
    temperature = torch.tensor([1.0, 0.5, 2.0, 1.0, 1.0, 0.8])
    kept = filtered_logits(logits / temperature[:, None], top_k, top_p).isfinite()
    for row in range(6):
        probs = (logits[row] / temperature[row]).softmax(-1)
        order = probs.argsort(descending=True).tolist()
        allowed = order[: int(top_k[row])] if top_k[row] > 0 else order
        mass = probs[allowed] / probs[allowed].sum()
        keep, total = [], 0.0
        for token, p in zip(allowed, mass.tolist()):  # the smallest most-likely set reaching top_p
            keep.append(token)
            total += p
            if total >= top_p[row]:
                break
        assert sorted(kept[row].nonzero()[:, 0].tolist()) == sorted(keep), row


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (3, 1.0), (0, 0.8)], ids=["everything", "top-k", "top-p"])
def test_draws_follow_the_tempered_and_filtered_probabilities(top_k, top_p):
    """Over many rows, each token is drawn as often as its probability says, whether the row keeps the whole
    vocabulary (no sort) or a top-k / top-p set; a row with its own generator draws from the same law."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(40_000, 1)
    params = SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p)
    tokens, logprobs = choose(logits, [params] * len(logits), [None] * len(logits), torch.Generator().manual_seed(0))
    expected = filtered_logits(logits[:1] / 0.8, torch.tensor([top_k]), torch.tensor([top_p])).softmax(-1)[0]
    if top_k or top_p < 1:
        assert (expected == 0).sum() >= 2  # the filter dropped tokens
    frequencies = torch.bincount(tokens, minlength=6).float() / len(tokens)
    torch.testing.assert_close(frequencies, expected, atol=0.01, rtol=0)
    torch.testing.assert_close(logprobs, (logits / 0.8).log_softmax(-1).gather(-1, tokens[:, None])[:, 0])
    own = [torch.Generator().manual_seed(i) for i in range(2000)]
    tokens, _ = choose(logits[:2000], [params] * 2000, own, torch.Generator())
    frequencies = torch.bincount(tokens, minlength=6).float() / 2000
    torch.testing.assert_close(frequencies, expected, atol=0.04, rtol=0)


def test_an_inverse_cdf_draw_never_takes_a_token_of_no_mass():
    probs = torch.tensor([[0.2, 0.0, 0.5, 0.3], [0.0, 0.0, 1.0, 0.0], [0.0, 0.4, 0.0, 0.0]])
    for u, expected in [(0.0, [0, 2, 1]), (0.2, [2, 2, 1]), (0.5, [2, 2, 1]), (0.7, [3, 2, 1]), (0.999, [3, 2, 1])]:
        assert draw(probs, torch.full((3,), u)).tolist() == expected, u


def test_cancel_frees_a_running_row_at_once(model):
    engine = GenerationEngine(model)
    rows = [engine.add(prompt, GREEDY) for prompt in PROMPTS[:2]]
    engine.step()
    engine.cancel(rows[0])
    assert engine.running == [rows[1]] and rows[0].finish_reason == "cancelled"
    while engine.has_work:
        engine.step()
    assert rows[1].output_ids == alone(model, PROMPTS[1])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_new_tokens", 0, "max_new_tokens=0 must be at least 1"),
        ("temperature", -1.0, "temperature=-1.0 must be 0"),
        ("top_p", 0.0, r"top_p=0.0 must be in \(0, 1\]"),
        ("top_k", -2, "top_k=-2 must be 0"),
    ],
)
def test_bad_sampling_settings_are_refused_in_one_line(field, value, message):
    with pytest.raises(ConfigError, match=message):
        SamplingParams(**{field: value})


def test_an_empty_prompt_is_refused(model):
    with pytest.raises(ConfigError, match="at least one token"):
        GenerationEngine(model).add([], GREEDY)


@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
def test_answer_is_generates_greedy_answer_and_a_seeded_sample_repeats(tmp_path, method):
    """``answer`` (generate, chat, a run's sample answers) runs on the engine, or on transformers' ``generate``
    for an adapter with virtual tokens; either way its greedy answer is ``generate``'s, and a seed repeats."""
    from deltatune.data.encoding import prompt_ids
    from deltatune.data.records import Message
    from deltatune.runtime.loading import load_causal_lm, load_tokenizer
    from deltatune.train.evaluate import answer, has_virtual_tokens
    from sft_helpers import save_tiny_chat_model

    folder = save_tiny_chat_model(tmp_path)
    tokenizer = load_tokenizer(folder)
    config = {
        "lora": deltatune.LoraConfig(r=4, target_modules="all-linear"),
        "prompt_tuning": deltatune.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    }[method]
    model = deltatune.get_delta_model(load_causal_lm(folder), config)
    perturb_trainable(model)
    model.eval()
    assert has_virtual_tokens(model) == (method == "prompt_tuning")
    messages = [Message("user", "What is AI?")]
    ids = torch.tensor([prompt_ids(tokenizer, messages)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    expected = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert answer(model, tokenizer, messages, 12) == expected and expected
    sampled = [answer(model, tokenizer, messages, 12, temperature=1.5, seed=seed) for seed in (3, 3, 4)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_rows_with_one_prompt_share_its_prefill_and_sample_apart(model):
    """Rows with the same prompt (a GRPO group) are prefilled once: one forward row, and their answers are what
    each would get alone (greedy: the same answer; seeded: its own stream)."""
    seen = []
    handle = model.register_forward_hook(
        lambda module, args, kwargs, out: seen.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        engine = GenerationEngine(model)
        greedy = [engine.add(PROMPTS[0], GREEDY) for _ in range(3)] + [engine.add(PROMPTS[1], GREEDY)]
        seeded = [engine.add(PROMPTS[0], SamplingParams(max_new_tokens=6, seed=s)) for s in (1, 2)]
        engine.step()
    finally:
        handle.remove()
    assert seen[0][0] == 2  # two distinct prompts prefilled for six rows
    while engine.has_work:
        engine.step()
    assert all(row.output_ids == alone(model, PROMPTS[0]) for row in greedy[:3])
    assert greedy[3].output_ids == alone(model, PROMPTS[1])
    for row, seed in zip(seeded, (1, 2)):
        solo = GenerationEngine(model).generate([PROMPTS[0]], SamplingParams(max_new_tokens=6, seed=seed))[0]
        assert row.output_ids == solo.output_ids
    assert seeded[0].output_ids != seeded[1].output_ids
