"""Property tests of the pure key mapping between in-memory parameter names and peft file keys."""

from __future__ import annotations

import string

from hypothesis import given
from hypothesis import strategies as st

from deltatune.io import ADAPTER_CONTAINERS, FILE_PREFIX, file_key_map, to_file_key

segment = st.text(alphabet=string.ascii_lowercase + string.digits + "_", min_size=1, max_size=8)
module_path = st.lists(segment, min_size=1, max_size=5).map(".".join)
adapter = segment.filter(lambda name: name not in ADAPTER_CONTAINERS and name != "modules_to_save")


@given(module_path, adapter, st.sampled_from(sorted(ADAPTER_CONTAINERS)), st.booleans())
def test_adapter_name_is_dropped_after_a_container(path, adapter_name, container, with_weight):
    suffix = ".weight" if with_weight else ""
    key = to_file_key(f"{path}.{container}.{adapter_name}{suffix}", adapter_name)
    assert key == f"{FILE_PREFIX}{path}.{container}{suffix}"


@given(module_path, adapter, st.sampled_from(["weight", "bias"]))
def test_modules_to_save_copy_is_saved_under_the_module_name(path, adapter_name, leaf):
    assert to_file_key(f"{path}.modules_to_save.{adapter_name}.{leaf}", adapter_name) == f"{FILE_PREFIX}{path}.{leaf}"


@given(module_path, adapter)
def test_names_without_adapter_segments_only_get_the_prefix(path, adapter_name):
    name = f"{path}.base_layer.bias"
    if adapter_name not in name.split("."):
        assert to_file_key(name, adapter_name) == FILE_PREFIX + name


@given(st.lists(module_path, min_size=1, max_size=6, unique=True), adapter)
def test_the_inverse_map_covers_every_parameter_once(paths, adapter_name):
    names = [f"{path}.lora_{side}.{adapter_name}.weight" for path in paths for side in "AB"]
    inverse = file_key_map(names, adapter_name)
    assert sorted(inverse.values()) == sorted(names)
    assert all(to_file_key(name, adapter_name) == key for key, name in inverse.items())


def test_an_adapter_named_like_a_module_keeps_the_module():
    """Only the segment right after a container is the adapter name; a module called the same stays."""
    name = "model.default.q_proj.lora_A.default.weight"
    assert to_file_key(name, "default") == "base_model.model.model.default.q_proj.lora_A.weight"
