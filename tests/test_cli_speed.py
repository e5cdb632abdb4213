"""Help, config errors and missing data files answer without importing torch or transformers (they take seconds
to load)."""

import subprocess
import sys
import time

import pytest
from transformers.trainer_utils import SchedulerType

from deltatune.cli.main import COMMANDS
from deltatune.data import DataError, check_sources
from deltatune.train.config import LR_SCHEDULERS, TrainConfig

# Runs the CLI, then reports which heavy modules it loaded and the OpenMP wait policy it left.
PROBE = """
import sys
from deltatune.cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
print("EXIT", code)
import os
print("LOADED", [m for m in ("torch", "transformers", "deltatune.model") if m in sys.modules],
      os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT"))
"""

INSTANT_SECONDS = 2.0  # what a user waits for help or an input error, interpreter start included
MISSING = "no-such-file.jsonl"


def _probe(*argv: str, env: dict | None = None) -> tuple[str, str, float]:
    """(the probe's last line, everything printed, wall seconds) of ``deltatune argv`` in a fresh interpreter."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120, env=env)
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("LOADED"), done.stdout + done.stderr
    return last, done.stdout + done.stderr, time.perf_counter() - start


@pytest.mark.subprocess
@pytest.mark.parametrize("argv", [["train", "learning_rat=1e-4"], ["train", "threads=-1"]])
def test_config_errors_do_not_import_torch(argv):
    loaded, output, _ = _probe(*argv)
    assert loaded.startswith("LOADED []"), f"{argv}: {loaded}"
    if argv == ["train", "learning_rat=1e-4"]:
        assert "did you mean 'learning_rate'" in output


@pytest.mark.parametrize(
    "argv",
    [
        ["train", f"data={MISSING}"],
        ["train", f"eval_data={MISSING}"],
        ["eval", "--data", MISSING],
        ["classify", "--data", MISSING],
    ],
)
@pytest.mark.subprocess
def test_a_missing_data_file_is_named_before_torch_loads(argv):
    """A mistyped data path costs a moment and one line naming it, not the seconds torch and the model take."""
    loaded, output, seconds = _probe(*argv)
    assert loaded.startswith("LOADED []"), f"{argv}: {loaded}"
    assert seconds < INSTANT_SECONDS, f"{argv} took {seconds:.2f} s"
    errors = [line for line in output.splitlines() if ": error: " in line]
    assert len(errors) == 1 and f"{MISSING} does not exist" in errors[0], output
    assert "EXIT 2" in output


@pytest.mark.subprocess
@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_help_answers_at_once_without_torch(command):
    """Every command of the CLI, a new one included: its help must not wait seconds for torch to load."""
    argv = ["--help"] if command is None else [command, "--help"]
    loaded, output, seconds = _probe(*argv)
    assert loaded.startswith("LOADED []"), f"{argv}: {loaded}"
    assert seconds < INSTANT_SECONDS, f"{argv} took {seconds:.2f} s"
    if command == "train":
        assert "threads" in output and "method=lora keys" in output
    if command == "export":
        assert "{f32,f16,bf16,q8_0,q4_0,q4_1}" in output


def test_written_out_export_types_match_the_exporter():
    from deltatune.cli.export import OUT_TYPES as written_out
    from deltatune.export import OUT_TYPES

    assert written_out == tuple(OUT_TYPES)


def test_missing_data_sources_are_found_without_reading_rows(tmp_path):
    (tmp_path / "saved").mkdir()
    (tmp_path / "a.jsonl").write_text("not even json\n")
    info = tmp_path / "dataset_info.json"
    info.write_text("{}")
    check_sources(f"chatterbot,{tmp_path / 'a.jsonl'},{tmp_path / 'saved'}#test,{info}#entry")
    with pytest.raises(DataError, match=r"^eval_data='chatterbot,b.jsonl': b.jsonl does not exist; pass a .jsonl/"):
        check_sources("chatterbot,b.jsonl", "eval_data")


@pytest.mark.subprocess
def test_openmp_threads_sleep_but_in_train_and_decoding_unless_the_user_set_them():
    """Train spins briefly (it watches the machine), the decoding commands spin longer, every other command
    sleeps idle OpenMP threads; a user's OMP_WAIT_POLICY or GOMP_SPINCOUNT is left alone."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    assert _probe("--help", env=env)[0].endswith("PASSIVE None")
    assert _probe("merge", "--help", env=env)[0].endswith("PASSIVE None")
    assert _probe("train", "learning_rat=1e-4", env=env)[0].endswith("None 10000")
    assert _probe("serve", "--help", env=env)[0].endswith("None 300000")
    assert _probe("bench", "--serve", "--help", env=env)[0].endswith("None 300000")
    assert _probe("bench", "--help", env=env)[0].endswith("PASSIVE None")
    assert _probe("train", "--help", env={**env, "OMP_WAIT_POLICY": "ACTIVE"})[0].endswith("ACTIVE None")
    assert _probe("--help", env={**env, "GOMP_SPINCOUNT": "5"})[0].endswith("None 5")


def test_written_out_schedulers_match_transformers():
    assert set(LR_SCHEDULERS) == {s.value for s in SchedulerType} - {"reduce_lr_on_plateau"}


def test_threads_key():
    assert TrainConfig.from_sources(None, ["threads=2"]).threads == 2
    assert TrainConfig.from_sources(None, []).threads == 0
