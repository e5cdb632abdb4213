"""What deltatune assumes about transformers' internals.

- Gated MLPs are recognised by the source of their class's ``forward`` (``forward_input_name``) and their
  activation by the classes and functions transformers' ``ACT2FN`` builds (``activation_name``); a model
  whose MLP is written another way, or a new activation class, runs layer by layer (a log line says so).
- transformers' ``Trainer`` refuses to train a quantised model unless ``_hf_peft_config_loaded`` says
  adapters are attached (``validate_quantization_for_training``); ``allow_training_quantized`` sets it.
- A ``DynamicCache`` keeps each layer's keys and values as ``cache.layers[i].keys`` / ``.values``
  (``cache_tensors``). A ``Cache`` can be built from layer objects, and a model calls each layer's
  ``update(keys, values)`` with the new columns and attends over what it returns; ``buffered_cache`` builds
  one whose layers write those columns into room reserved to the right instead of concatenating. A model takes
  and returns a cache as ``cache`` (``CACHE``; transformers 5's name, formerly ``past_key_values``).
- The decoder layers of Llama, Qwen2 and Mistral (``LEAN_DECODERS``) are pre-norm attention with rotary
  positions plus an MLP, under the attribute names ``model.embed_tokens``, ``model.layers[i].input_layernorm /
  self_attn.{q,k,v,o}_proj / post_attention_layernorm / mlp``, ``model.norm``, ``model.rotary_emb`` and
  ``lm_head``, a model's key/value heads are ``config.num_key_value_heads``, and its rotary positions are
  ``x cos + rotate_half(x) sin`` over whole heads, rotate_half(x) = [-x2, x1], with the cos and sin its
  ``rotary_emb`` returns for the positions (``_rotation``); ``lean_forward`` runs a prefill
  or a decoding step through those modules without the models' own forward code (mask building, cache
  objects, output records), and equals their forward. Their MLPs compute ``down_proj(act_fn(gate_proj(x)) *
  up_proj(x))``, which ``lean_forward`` calls by parts so that gate and up can run as one product.

``tests/test_compat.py`` checks each against the installed transformers: the MLPs of the common decoder
families are recognised, ``ACT2FN``'s SiLU and GELUs are named, the Trainer's check reads that flag, and
``lean_forward``'s logits equal each lean decoder's forward.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import activations
from transformers.cache_utils import Cache, DynamicLayer

from deltatune.compat.torch import any_hooks, has_hooks


def activation_name(act: object) -> str | None:
    """The fused MLP kernel's name ("silu", "gelu", "gelu_tanh") for activation module ``act``, or None."""
    if type(act) in (nn.SiLU, activations.SiLUActivation):
        return "silu"
    if type(act) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    if type(act) is activations.GELUActivation and act.act is F.gelu:
        return "gelu"
    if type(act) is activations.GELUTanh and isinstance(act.act, functools.partial):
        partial = act.act
        if partial.func is F.gelu and not partial.args and partial.keywords == {"approximate": "tanh"}:
            return "gelu_tanh"
    return None


@functools.cache
def forward_input_name(cls: type, expression: str) -> str | None:
    """The input's name if ``cls.forward(self, x)``'s source is ``return <expression>`` (directly or through one
    variable), with ``{x}`` in ``expression`` standing for the input; None otherwise (or with no source)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError):  # no source (built-in, generated, frozen): not recognisable
        return None
    function = tree.body[0]
    if not isinstance(function, ast.FunctionDef) or function.decorator_list:
        return None
    arguments = function.args
    if len(arguments.args) != 2 or arguments.vararg or arguments.kwarg or arguments.kwonlyargs or arguments.posonlyargs:
        return None
    name = arguments.args[1].arg
    expected = ast.dump(ast.parse(expression.format(x=name), mode="eval").body)
    body = [statement for statement in function.body if not _is_docstring(statement)]
    if len(body) == 1 and isinstance(body[0], ast.Return):
        matches = body[0].value is not None and ast.dump(body[0].value) == expected
    elif len(body) == 2 and isinstance(body[0], ast.Assign) and isinstance(body[1], ast.Return):
        targets, returned = body[0].targets, body[1].value
        matches = (
            len(targets) == 1
            and isinstance(targets[0], ast.Name)
            and isinstance(returned, ast.Name)
            and returned.id == targets[0].id
            and ast.dump(body[0].value) == expected
        )
    else:
        matches = False
    return name if matches else None


def allow_training_quantized(model: nn.Module) -> None:
    """Let transformers' ``Trainer`` train ``model`` over a quantised base: the adapters are deltatune's."""
    model._hf_peft_config_loaded = True


def _is_docstring(statement: ast.stmt) -> bool:
    return (
        isinstance(statement, ast.Expr)
        and isinstance(statement.value, ast.Constant)
        and isinstance(statement.value.value, str)
    )


CACHE = "cache"


def cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (keys, values) [batch, kv_heads, length, head_dim] of a ``DynamicCache``.

    transformers 5 keeps them as ``cache.layers[i].keys`` / ``.values`` (``DynamicLayer``); the generation
    engine reads them to join and trim rows, and builds a new cache with ``DynamicCache(ddp_cache_data=...)``.
    """
    return [(layer.keys, layer.values) for layer in cache.layers]


class _BufferedLayer(DynamicLayer):
    """A cache layer over the first ``columns`` columns of key and value buffers [batch, kv_heads, capacity,
    head_dim] that have room to the right: ``update`` writes the step's new columns into that room and widens
    the view, where ``DynamicLayer`` would concatenate (copy) the whole cache at every step::

        buffer:  k k k k k . . .      update(1 column) ->   k k k k k n . .
        view:    |<------>|                                  |<-------->|
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, columns: int) -> None:
        super().__init__()
        self._buffers = (keys, values)
        self.keys, self.values = keys[:, :, :columns], values[:, :, :columns]
        self.device, self.is_initialized = keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = self._buffers
        start = self.keys.shape[-2]
        end = start + key_states.shape[-2]
        if end > keys.shape[-2]:
            raise ValueError(f"a buffered cache of {keys.shape[-2]} columns cannot take columns {start}..{end}")
        keys[:, :, start:end].copy_(key_states)
        values[:, :, start:end].copy_(value_states)
        self.keys, self.values = keys[:, :, :end], values[:, :, :end]
        return self.keys, self.values


def buffered_cache(buffers: list[tuple[torch.Tensor, torch.Tensor]], columns: int) -> Cache:
    """A cache holding the first ``columns`` columns of each layer's (keys, values) buffers; the model's new
    columns are written in place into the buffers' remaining room (the caller reserves enough)."""
    return Cache(layers=[_BufferedLayer(keys, values, columns) for keys, values in buffers])


def last_logits_only(model: nn.Module) -> dict[str, int]:
    """``{"logits_to_keep": 1}`` when ``model``'s forward (or, for a wrapper such as ``DeltaModel``, its wrapped
    model's) takes transformers' ``logits_to_keep``, so that only the last position's logits are computed (a
    prompt's other positions would cost the head [prompt length, vocabulary] products); else ``{}``."""
    while model is not None:
        if "logits_to_keep" in inspect.signature(type(model).forward).parameters:
            return {"logits_to_keep": 1}
        model = model._modules.get("base_model")  # a wrapper's model (transformers' own base_model is a property)
    return {}


LEAN_DECODERS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")


def lean_decoder(model: nn.Module) -> bool:
    """Whether ``lean_forward`` can run ``model``'s prefills and decoding steps: one of ``LEAN_DECODERS``, every
    layer full attention (no sliding window), no hooks on the modules whose forward it replaces (the model, its
    decoder, layers and attentions; those it calls run their own hooks, and it calls an MLP that has hooks), and
    none of the modules whose parts it reads (decoder, layers, attentions, MLPs) wrapped by an adapter method (a
    tuner layer, ``is_delta_layer``: ``modules_to_save=["mlp"]`` copies the whole MLP, so only its forward is
    right)."""
    if type(model).__name__ not in LEAN_DECODERS:
        return False
    config = model.config
    kinds = getattr(config, "layer_types", None)
    if kinds is not None and any(kind != "full_attention" for kind in kinds):
        return False
    if kinds is None and getattr(config, "sliding_window", None) is not None:
        return False
    layers = model.model.layers
    read = [model.model, *layers, *(layer.self_attn for layer in layers), *(layer.mlp for layer in layers)]
    if any(getattr(type(module), "is_delta_layer", False) for module in read):
        return False
    replaced = [model, model.model, *layers, *(layer.self_attn for layer in layers)]
    return not any(has_hooks(module) for module in replaced)


def projections(model: nn.Module) -> list[tuple[nn.Module, ...]]:
    """The groups of linear modules of a ``lean_decoder`` model that ``lean_forward`` hands to its ``project``, as the
    model holds them (adapter layers included): each layer's (q_proj, k_proj, v_proj) and its MLP's (gate_proj,
    up_proj), which read the same input, then (o_proj,) and (down_proj,) alone."""
    groups = []
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        groups += [(attention.q_proj, attention.k_proj, attention.v_proj), (attention.o_proj,)]
        if not any_hooks((mlp, mlp.act_fn)):  # else the MLP is called whole (``_mlp``)
            groups += [(mlp.gate_proj, mlp.up_proj), (mlp.down_proj,)]
    return groups


def empty_cache(model: nn.Module, rows: int, columns: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Uninitialised (keys, values) buffers [rows, kv_heads, columns, head_dim] for each layer of a ``lean_decoder``
    model, in its embedding's dtype and device (what its keys and values come out in)."""
    embedding = model.model.embed_tokens.weight
    shape = (rows, model.config.num_key_value_heads, columns, model.model.layers[0].self_attn.head_dim)
    return [(embedding.new_empty(shape), embedding.new_empty(shape)) for _ in model.model.layers]


Project = Callable[[tuple[nn.Module, ...], torch.Tensor], "torch.Tensor | None"]


def lean_forward(
    model: nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    buffers: list[tuple[torch.Tensor, torch.Tensor]],
    columns: int,
    project: Project | None = None,
) -> torch.Tensor:
    """A prefill or a decoding step of a ``lean_decoder`` model: each row's next-token logits [rows, vocabulary]
    after its new tokens ``input_ids`` [rows, T] at ``position_ids`` [rows, T], attending over the first
    ``columns`` columns of each layer's (keys, values) buffers and its own new columns, which are written at
    ``columns`` .. ``columns + T`` (the caller reserves them); ``attention_mask`` [rows, columns + T] marks real
    tokens with 1 (a left-padded prefill: ``columns`` 0). The same modules and products as the model's forward
    over a ``buffered_cache`` (but a float32 decoding step's attention: three batched products,
    ``_decoding_attention``), without its per-call machinery (~5 of 80 ms a 16-row SmolLM2 step)::

        h = embed(ids);  per layer:  h += o_proj(attention(rope(q, k), v over the cache))
                                     h += down_proj(act(gate_proj(x)) * up_proj(x)),  x = post_attention_layernorm(h)
        logits = lm_head(norm(h[:, -1]))

    ``project(modules, x)``, when given, computes the modules of a group (``projections``: q, k, v; o; gate, up;
    down) at once, their outputs side by side, or answers None to have them called one by one.
    """
    decoder, (rows, length) = model.model, input_ids.shape
    hidden = decoder.embed_tokens(input_ids)
    rotate = _rotation(*decoder.rotary_emb(hidden, position_ids))
    end, heads, kv = columns + length, model.config.num_attention_heads, model.config.num_key_value_heads
    batched = length == 1 and hidden.dtype == torch.float32 and hidden.device.type == "cpu"
    bias = _decoding_bias(attention_mask, kv, hidden.dtype) if batched else None
    mask = None if batched else _lean_mask(attention_mask, length)
    for layer, (keys, values) in zip(decoder.layers, buffers):
        attention = layer.self_attn
        x = layer.input_layernorm(hidden)
        query, key, value = (  # [rows, T, heads, d]
            part.view(rows, length, -1, attention.head_dim)
            for part in _together((attention.q_proj, attention.k_proj, attention.v_proj), x, project)
        )
        query, key = rotate(query), rotate(key)
        keys[:, :, columns:end].copy_(key.transpose(1, 2))
        values[:, :, columns:end].copy_(value.transpose(1, 2))
        if bias is not None:
            out = _decoding_attention(query, keys[:, :, :end], values[:, :, :end], bias, attention.scaling)
        else:
            query = query.transpose(1, 2)
            if length == 1:  # the query's heads grouped over the key/value heads they share: [rows, kv, group, d]
                query = query.reshape(rows, kv, -1, attention.head_dim)
            out = F.scaled_dot_product_attention(
                query,
                keys[:, :, :end],
                values[:, :, :end],
                attn_mask=mask,
                scale=attention.scaling,
                enable_gqa=length > 1 and kv != heads,
            )
            out = out.reshape(rows, 1, -1) if length == 1 else out.transpose(1, 2).reshape(rows, length, -1)
        hidden = hidden + _together((attention.o_proj,), out, project)[0]
        hidden = hidden + _mlp(layer.mlp, layer.post_attention_layernorm(hidden), project)
    return model.lm_head(decoder.norm(hidden[:, -1:]))[:, -1]


def _rotation(cos: torch.Tensor, sin: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Rotary positions for queries or keys [rows, T, heads, d], from the rotary embedding's cos and sin
    [rows, T, d]: ``x cos + rotate_half(x) sin`` as the models compute it, with rotate_half(x) = [-x2, x1] read as
    the halves swapped (``roll``) times a sin whose first half is negated (the same products, fewer operations)."""
    half = cos.shape[-1] // 2
    cos, sin = cos.unsqueeze(2), torch.cat([-sin[..., :half], sin[..., half:]], dim=-1).unsqueeze(2)
    return lambda x: x * cos + x.roll(half, dims=-1) * sin


def _decoding_bias(attention_mask: torch.Tensor, kv: int, dtype: torch.dtype) -> torch.Tensor:
    """A decoding step's attention mask as a bias [rows x kv, 1, columns]: 0 on real tokens, -inf on padding."""
    rows, columns = attention_mask.shape
    padding = attention_mask[:, None, None, :] == 0
    bias = attention_mask.new_zeros(rows, 1, 1, columns, dtype=dtype).masked_fill_(padding, float("-inf"))
    return bias.expand(rows, kv, 1, columns).reshape(rows * kv, 1, columns)


def _decoding_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, scale: float
) -> torch.Tensor:
    """A decoding step's attention (one query a row, fp32, on the CPU) as three batched products, each query head
    grouped with the key/value head it shares: softmax(q kᵀ · scale + bias) v over [rows x kv, group, d];
    [rows, 1, heads x d]. At 16 rows on 2 cores it took about 100 µs a layer less than
    ``scaled_dot_product_attention``, which blocks for long queries."""
    rows, _, heads, d = query.shape
    kv, columns = keys.shape[1], keys.shape[2]
    keys, values = keys.reshape(rows * kv, columns, d), values.reshape(rows * kv, columns, d)
    scores = torch.baddbmm(bias, query.reshape(rows * kv, heads // kv, d), keys.transpose(1, 2), alpha=scale)
    return torch.bmm(scores.softmax(-1), values).view(rows, 1, heads * d)


def _lean_mask(attention_mask: torch.Tensor, length: int) -> torch.Tensor:
    """The keys each new token attends to, [rows, 1, T, columns + T]: real ones, not after itself. A padding
    token attends to itself too (otherwise to nothing, and its row of attention would be NaN)."""
    real = attention_mask.bool()[:, None, None, :]
    if length == 1:
        return real
    columns = attention_mask.shape[1] - length
    key = torch.arange(columns + length, device=real.device)
    query = torch.arange(columns, columns + length, device=real.device)[:, None]
    return (real & (key <= query)) | (key == query)


def _together(modules: tuple[nn.Module, ...], x: torch.Tensor, project: Project | None) -> list[torch.Tensor]:
    """Each module's output for ``x``: from ``project`` at once when it takes them, else one call each."""
    joined = None if project is None else project(modules, x)
    if joined is None:
        return [module(x) for module in modules]
    if len(modules) == 1:
        return [joined]
    return list(joined.split([module.out_features for module in modules], dim=-1))


def _mlp(mlp: nn.Module, x: torch.Tensor, project: Project | None) -> torch.Tensor:
    """A lean decoder's gated MLP on ``x``: its gate and up projections through ``project`` when it takes them,
    else the module's own call."""
    if project is None or any_hooks((mlp, mlp.act_fn)):
        return mlp(x)
    joined = project((mlp.gate_proj, mlp.up_proj), x)
    if joined is None:
        return mlp(x)
    gate, up = joined.split([mlp.gate_proj.out_features, mlp.up_proj.out_features], dim=-1)
    return _together((mlp.down_proj,), mlp.act_fn(gate) * up, project)[0]
