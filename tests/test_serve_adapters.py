"""Adapters at run time (vLLM's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``): allowed only under
``--adapter-root`` (resolved: no ``..`` or symlink way out), answers equal to in-process generation once loaded,
requests already running unaffected by loads and unloads, and adapters that cannot mix per row refused."""

from __future__ import annotations

import shutil
import threading
import time

import httpx2 as httpx
import openai
import pytest
from transformers import LlamaForCausalLM

import deltatune
from deltatune.errors import ConfigError
from deltatune.serve.adapters import Registry, under_root
from deltatune.serve.errors import Forbidden
from deltatune.serve.options import ServeOptions
from deltatune.serve.server import load_service
from serve_helpers import Reference, client, save_adapter, serving, tiny_setup

HI = [{"role": "user", "content": "What is new?"}]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """An adapter root holding copies of the shared adapters, one IA3 adapter and one LoRA with modules_to_save."""
    model_dir, adapters = tiny_setup()
    folder = tmp_path_factory.mktemp("root")
    for name, path in adapters.items():
        shutil.copytree(path, folder / name)
    ia3 = deltatune.get_delta_model(LlamaForCausalLM.from_pretrained(model_dir), deltatune.IA3Config())
    ia3.save_pretrained(folder / "ia3")
    config = deltatune.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    deltatune.get_delta_model(LlamaForCausalLM.from_pretrained(model_dir), config).save_pretrained(folder / "whole")
    return folder


@pytest.fixture(scope="module")
def server(root):
    with serving(tiny_setup()[0], {}, served_model_name="tiny", adapter_root=str(root)) as (url, service):
        yield client(url), service


@pytest.fixture(scope="module")
def reference():
    return Reference(tiny_setup()[0])


def load(api, name, path) -> httpx.Response:
    return httpx.post(f"{api.base_url}load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})


def unload(api, name) -> httpx.Response:
    return httpx.post(f"{api.base_url}unload_lora_adapter", json={"lora_name": name})


def ask(api, model: str, tokens: int = 10, **options) -> str:
    return api.chat.completions.create(model=model, messages=HI, max_tokens=tokens, temperature=0, **options)


def error(response: httpx.Response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    assert response.json()["error"]["type"] == kind
    return response.json()["error"]["message"]


def test_loaded_adapters_answer_as_in_process_and_unloaded_ones_are_gone(server, root, reference):
    api, service = server
    response = load(api, "support", root / "plain")
    assert response.status_code == 200 and "support" in response.text
    assert load(api, "legal", root / "dora").status_code == 200
    assert [m.id for m in api.models.list().data] == ["tiny", "support", "legal"]
    for name, folder in [("support", "plain"), ("legal", "dora"), ("tiny", None)]:
        expected = reference.chat(root / folder if folder else None, HI, 10)
        assert ask(api, name).choices[0].message.content == expected
    assert unload(api, "support").status_code == 200
    with pytest.raises(openai.NotFoundError, match="support"):
        ask(api, "support")
    assert [m.id for m in api.models.list().data] == ["tiny", "legal"]
    assert load(api, "support", root / "terse").status_code == 200  # the name again, another adapter
    messages = [{"role": "system", "content": "You answer in one word."}, *HI]  # terse's stored system prompt
    assert ask(api, "support").choices[0].message.content == reference.chat(root / "terse", messages, 10)
    for name in ("support", "legal"):
        assert unload(api, name).status_code == 200
    model = service.scheduler.model
    assert wait_for(lambda: not model.peft_config)  # deleted from the model, not only from the list


def wait_for(condition, seconds: float = 5.0) -> bool:
    deadline = time.perf_counter() + seconds
    while not condition() and time.perf_counter() < deadline:
        time.sleep(0.01)
    return condition()


def test_loads_and_unloads_leave_running_requests_alone(server, root, reference):
    """A base request decoding while the first adapter arrives, and an adapter's request decoding while its
    adapter is unloaded, both answer as they would have alone."""
    api, service = server
    slow = service.scheduler.model.get_input_embeddings().register_forward_hook(lambda *_: time.sleep(0.01))
    try:
        results = {}
        base = threading.Thread(target=lambda: results.update(base=ask(api, "tiny", 40)))
        base.start()
        assert wait_for(lambda: service.scheduler.rows_in_flight == 1)
        assert load(api, "running", root / "plain").status_code == 200
        own = threading.Thread(target=lambda: results.update(own=ask(api, "running", 40)))
        own.start()
        assert wait_for(lambda: service.scheduler.rows_in_flight == 2)
        assert unload(api, "running").status_code == 200
        with pytest.raises(openai.NotFoundError):
            ask(api, "running")
        base.join(30), own.join(30)
    finally:
        slow.remove()
    assert results["base"].choices[0].message.content == reference.chat(None, HI, 40)
    assert results["own"].choices[0].message.content == reference.chat(root / "plain", HI, 40)
    assert wait_for(lambda: not getattr(service.scheduler.model, "peft_config", {}))


def test_folders_outside_the_root_are_refused(server, root, tmp_path):
    api, _ = server
    outside = shutil.copytree(root / "plain", tmp_path / "outside")
    assert "not under the adapter root" in error(load(api, "x", outside), 403, "PermissionDeniedError")
    assert "not under" in error(load(api, "x", root / ".." / tmp_path.name / "outside"), 403, "PermissionDeniedError")
    link = root / "sneaky"
    link.symlink_to(outside, target_is_directory=True)
    try:
        assert "not under" in error(load(api, "x", link), 403, "PermissionDeniedError")
    finally:
        link.unlink()
    assert "x" not in [m.id for m in api.models.list().data]


@pytest.mark.parametrize(
    ("folder", "message"),
    [
        ("ia3", "its method is IA3, and deltatune serve serves LoRA adapters only"),
        ("whole", "adapter 'bad' ({root}/whole) cannot share a batch with other adapters: it trains whole modules"),
        ("missing", "is not a folder"),
    ],
)
def test_adapters_that_cannot_mix_per_row_are_refused_in_one_line(server, root, reference, folder, message):
    api, service = server
    text = error(load(api, "bad", root / folder), 400, "BadRequestError")
    assert message.format(root=root.resolve()) in text and "\n" not in text
    assert "bad" not in [m.id for m in api.models.list().data]
    assert list(getattr(service.scheduler.model, "peft_config", {})) == []  # the model is as it was
    assert ask(api, "tiny").choices[0].message.content == reference.chat(None, HI, 10)


def test_names_already_served_and_unknown_names(server, root):
    api, _ = server
    assert "already served" in error(load(api, "tiny", root / "plain"), 400, "BadRequestError")
    assert "no adapter named 'ghost'" in error(unload(api, "ghost"), 404, "NotFoundError")
    assert "printable" in error(load(api, "two words", root / "plain"), 400, "BadRequestError")


def test_without_an_adapter_root_nothing_loads_or_unloads():
    model_dir, adapters = tiny_setup()
    with serving(model_dir, {"plain": adapters["plain"]}) as (url, _service):
        api = client(url)
        assert "--adapter-root" in error(load(api, "x", adapters["dora"]), 403, "PermissionDeniedError")
        assert "--adapter-root" in error(unload(api, "plain"), 403, "PermissionDeniedError")
        assert [m.id for m in api.models.list().data] == [str(model_dir), "plain"]


def test_under_root_resolves_both_paths(tmp_path):
    (tmp_path / "root" / "a").mkdir(parents=True)
    root = Registry("base", "base", tmp_path / "root").adapter_root
    assert under_root(tmp_path / "root" / "a", root) == (tmp_path / "root" / "a").resolve()
    with pytest.raises(Forbidden):
        under_root(tmp_path / "root" / "a" / ".." / "..", root)
    with pytest.raises(Forbidden):
        under_root(tmp_path / "rootless", root)  # a sibling whose name starts with the root's


def test_an_adapter_saved_with_other_ranks_loads_too(server, root, reference, tmp_path_factory):
    api, _ = server
    folder = save_adapter(tiny_setup()[0], root / "rank16", seed=9, r=16)
    assert load(api, "rank16", folder).status_code == 200
    assert ask(api, "rank16").choices[0].message.content == reference.chat(folder, HI, 10)
    assert unload(api, "rank16").status_code == 200


def test_an_adapter_that_cannot_mix_is_refused_at_start_in_one_line(root):
    options = ServeOptions(model=str(tiny_setup()[0]), adapters=[f"whole={root / 'whole'}"])
    with pytest.raises(ConfigError, match=r"^adapter 'whole' \(.*whole\) cannot share a batch .*modules \(lm_head\)"):
        load_service(options)
