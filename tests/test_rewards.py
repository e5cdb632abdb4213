"""GRPO's reward functions: every way of naming one, TRL's signature and chat completions, the built-ins on
real answers, and a one-line stop for every kind of bad answer a function can give."""

from __future__ import annotations

import math

import pytest

from deltatune.errors import ConfigError, DataError
from deltatune.train.rewards import load_reward_functions, score

PROMPTS = ["What is 6 times 7?", "What is 10 minus 4?"]
COMPLETIONS = ["6 times 7 is 42.", "The answer is 5"]
IDS = [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10]]


def run(entries, completions=COMPLETIONS, **columns):
    return score(load_reward_functions(entries), PROMPTS, completions, IDS, columns)


def test_accuracy_checks_the_answer_with_math_verify_and_has_no_opinion_without_a_solution():
    assert run("accuracy", solution=["42", "6"]) == [[1.0], [0.0]]
    chat = [[{"role": "assistant", "content": "It is \\boxed{42}"}], [{"role": "assistant", "content": "6"}]]
    assert run("accuracy", completions=chat, solution=["42", "6"]) == [[1.0], [1.0]]
    unparseable = run("accuracy", solution=["42", "no number here"])
    assert unparseable[0] == [1.0] and math.isnan(unparseable[1][0])


def test_regex_and_length_built_ins():
    assert run(r"regex:is \d+\.$") == [[1.0], [0.0]]
    assert run("length:4") == [[0.0], [-0.5]]


def test_a_function_from_a_file_gets_trls_arguments_and_every_column(tmp_path):
    (tmp_path / "rewards.py").write_text(
        "def correct(prompts, completions, completion_ids, solution, **kwargs):\n"
        "    assert set(kwargs) == {'topic'}\n"
        "    return [float(s in c) for c, s in zip(completions, solution)]\n"
        "def short(completion_ids, **kwargs):\n"
        "    return [None if len(ids) > 5 else 1.0 for ids in completion_ids]\n"
    )
    file = tmp_path / "rewards.py"
    table = run(f"{file}:correct,{file}:short", solution=["42", "6"], topic=["math", "math"])
    assert table[0] == [1.0, 1.0] and table[1][0] == 0.0 and math.isnan(table[1][1])


def test_a_module_function_such_as_trls_own_works_unchanged():
    table = run(
        "trl.rewards:accuracy_reward",
        completions=[[{"content": "\\boxed{42}"}], [{"content": "7"}]],
        solution=["42", "6"],
    )
    assert table == [[1.0], [0.0]]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("raise ValueError('boom')", r"reward function .*:bad raised ValueError: boom"),
        ("return [1.0]", r"returned 1 values for 2 completions"),
        ("return [1.0, float('nan')]", r"returned nan for row 1 \(prompt 'What is 10 minus 4\?'\)"),
        ("return [1.0, 'yes']", r"returned 'yes' for row 1"),
        ("return 1.0", r"returned float for 2 completions"),
    ],
)
def test_a_bad_answer_stops_with_one_line_naming_the_function_and_row(tmp_path, body, message):
    (tmp_path / "r.py").write_text(f"def bad(completions, **kwargs):\n    {body}\n")
    with pytest.raises(DataError, match=message):
        run(f"{tmp_path / 'r.py'}:bad")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("", "needs at least one function"),
        ("nonsense", "is not FILE.py:FUNCTION, MODULE:FUNCTION or a built-in"),
        ("missing.py:f", "missing.py does not exist"),
        ("json:no_such_function", "json has no function 'no_such_function'"),
        ("no_such_module_xyz:f", "cannot import no_such_module_xyz"),
        ("regex:(", "not a regular expression"),
        ("length:-3", "positive whole number"),
    ],
)
def test_a_reward_that_cannot_be_found_is_refused_in_one_line(entry, message):
    with pytest.raises(ConfigError, match=message):
        load_reward_functions(entry)


def test_the_example_rewards_pay_nothing_for_a_wrong_number_alone() -> None:
    """examples/rewards.py: a right answer scores highest, alone more than in a sentence; a number that only
    repeats the question (what a gamed format reward taught) earns no format credit and little partial credit."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "rewards.py"
    spec = importlib.util.spec_from_file_location("example_rewards", path)
    rewards = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rewards)
    answers = ["660", "11 minutes is 660 seconds.", "11 minutes is 66 seconds.", "11", "I cannot say."]
    completions = [[{"role": "assistant", "content": a}] for a in answers]
    solution = ["660"] * len(answers)
    correct = rewards.correct(["q"] * len(answers), completions, None, solution)
    close = rewards.close(completions=completions, solution=solution)
    alone = rewards.number_only(completions=completions, solution=solution)
    total = [c + 0.5 * d + 0.5 * n for c, d, n in zip(correct, close, alone)]  # examples/grpo.yaml's weights
    assert correct == [1, 1, 0, 0, 0] and alone == [1, 0, 0, 0, 0] and close[2] == 0.5 and close[4] == 0
    assert total[0] > total[1] > total[2] > total[3] > total[4] == 0
