"""Hugging Face checkpoints → params: `dp.load_pretrained(model, source)` and
`dp.from_pretrained(directory)`.

A source is a state dict (names → arrays; torch tensors convert with `np.asarray`), a
`.safetensors` file, or a directory written by `save_pretrained` (its `model.safetensors`, or
the shards its index names). Files are read with the `safetensors` package; diffprog never
imports torch. Every param of the model comes from one named weight, checked against the shape
the model expects; a weight that is missing, left over or wrongly shaped is a `LayerError`
naming it, never a partial load.
"""
from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from .attention import Attention
from .basic import Dense, FeedForward, GatedFeedForward
from .checks import path_name
from .core import ArgumentError, LayerError, Repeat, find
from .embed import EmbedToken
from .generate import GenerateToken, LanguageModel
from .models import Bert, SelectSpan, bert, gpt2, llama, mamba
from .ssm import SelectiveSSM
from .torch_weights import numpy_array
from .transformer import EmbedSegment, LearnedPositions, TransformerBlock

BUFFERS = re.compile(r"(^|\.)(position_ids|attn\.bias|attn\.masked_bias)$")
"""Names of buffers some checkpoints store beside the weights (position indices, causal masks)."""


def read_state_dict(source) -> dict:
    """{name: numpy array} from a dict, a .safetensors file or a save_pretrained directory."""
    if isinstance(source, dict):
        return {name: numpy_array(value) for name, value in source.items()}
    from safetensors.numpy import load_file
    path = os.fspath(source)
    if os.path.isdir(path):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return {k: v for shard in shards for k, v in load_file(os.path.join(path, shard)).items()}
        single = os.path.join(path, "model.safetensors")
        if not os.path.exists(single):
            raise ArgumentError(f"load_pretrained: {path} has no model.safetensors (diffprog reads safetensors only; "
                                f"write one with save_pretrained(..., safe_serialization=True))")
        path = single
    if not os.path.exists(path):
        raise ArgumentError(f"load_pretrained: no such file or directory: {path}")
    return load_file(path)


def _normalise(state_dict: dict, prefix: str) -> dict:
    """Drop the task models' `prefix` ("bert.", "transformer.") and buffers; old BERT checkpoints'
    LayerNorm.gamma/beta are LayerNorm.weight/bias."""
    out = {}
    for name, value in state_dict.items():
        if BUFFERS.search(name):
            continue
        name = name[len(prefix):] if name.startswith(prefix) else name
        out[re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))] = value
    return out


def _linear(ours: tuple, theirs: str, transpose: bool = True) -> dict:
    """A Dense's {weight, bias} from a torch Linear (weight (out, in): transposed) or a GPT-2
    Conv1D (weight (in, out))."""
    flip = (lambda w: w.T) if transpose else (lambda w: w)
    return {ours + ("weight",): (theirs + ".weight", flip), ours + ("bias",): (theirs + ".bias", None)}


def _norm(ours: tuple, theirs: str) -> dict:
    return {ours + ("scale",): (theirs + ".weight", None), ours + ("bias",): (theirs + ".bias", None)}


def _block(block: TransformerBlock, attention: dict, attention_norm: str, hidden: str, output: str,
           feedforward_norm: str, transpose: bool) -> dict:
    """{params path in one block: (checkpoint name, transform)}: the attention's entries as given,
    the two norms and the feed-forward's two Linear/Conv1D layers by their checkpoint names."""
    (at,), (first_norm, second_norm) = find(block, Attention), find(block, type(block.norm))
    (ff,), (out,) = find(block, FeedForward), find(block, Dense)
    return {**{at + k: v for k, v in attention.items()}, **_norm(first_norm, attention_norm),
            **_linear(ff, hidden, transpose), **_linear(out, output, transpose), **_norm(second_norm, feedforward_norm)}


def bert_names(model: Bert, layer: int, expected) -> tuple[dict, dict]:
    """{params path: (Hugging Face name, transform)} for the embeddings and heads (layer=None)
    or for encoder layer `layer` (paths inside one block); and {name of a tied copy: the name it copies}."""
    if layer is not None:
        prefix = f"encoder.layer.{layer}."
        attention = {**{(n,) + k: v for n in ("query", "key", "value")
                        for k, v in _linear((), prefix + "attention.self." + n).items()},
                     **_linear(("output",), prefix + "attention.output.dense")}
        return _block(model.block, attention, prefix + "attention.output.LayerNorm", prefix + "intermediate.dense",
                      prefix + "output.dense", prefix + "output.LayerNorm", True), {}
    (token,), (position,), (segment,) = (find(model, k, expected) for k in (EmbedToken, LearnedPositions, EmbedSegment))
    norms = find(model, type(model.norm), expected)
    names = {token + ("table",): ("embeddings.word_embeddings.weight", None),
             position + ("table",): ("embeddings.position_embeddings.weight", None),
             segment + ("table",): ("embeddings.token_type_embeddings.weight", None),
             **_norm(norms[0], "embeddings.LayerNorm")}
    if model.head == "pooler":
        names.update(_linear(find(model, FeedForward, expected)[-1], "pooler.dense"))
    elif model.head == "masked_lm":
        names.update({**_linear(find(model, FeedForward, expected)[-1], "cls.predictions.transform.dense"),
                      **_norm(norms[-1], "cls.predictions.transform.LayerNorm"),
                      ("decoder", "bias"): ("cls.predictions.bias", None)})
        return names, {"cls.predictions.decoder.weight": "embeddings.word_embeddings.weight",
                       "cls.predictions.decoder.bias": "cls.predictions.bias"}
    elif model.head == "question_answering":
        names.update(_linear(find(model, SelectSpan, expected)[0], "qa_outputs"))
    return names, {}


def gpt2_names(model: LanguageModel, layer: int, expected) -> tuple[dict, dict]:
    """As `bert_names`, for `dp.gpt2` (GPT2LMHeadModel; Conv1D weights are (in, out))."""
    if layer is not None:
        prefix = f"h.{layer}."
        split = lambda i: lambda w: np.split(w, 3, axis=-1)[i]
        attention = {**{(n, k): (prefix + "attn.c_attn." + k, split(i))
                        for i, n in enumerate(("query", "key", "value")) for k in ("weight", "bias")},
                     **_linear(("output",), prefix + "attn.c_proj", False)}
        return _block(model.body.layer, attention, prefix + "ln_1", prefix + "mlp.c_fc", prefix + "mlp.c_proj",
                      prefix + "ln_2", False), {}
    (token,), (position,) = find(model, EmbedToken, expected), find(model, LearnedPositions, expected)
    names = {token + ("table",): ("wte.weight", None), position + ("table",): ("wpe.weight", None),
             **_norm(find(model, type(model.norm), expected)[-1], "ln_f")}
    if not model.tied:
        names[find(model, GenerateToken, expected)[0] + ("table",)] = ("lm_head.weight", None)
    return names, ({"lm_head.weight": "wte.weight"} if model.tied else {})


def _top(model: LanguageModel, expected, tied_name: str, names: dict) -> tuple[dict, dict]:
    """A causal LM's embedding, final norm (RMSNorm: scale only) and untied head."""
    (token,) = find(model, EmbedToken, expected)
    norm = find(model, type(model.norm), expected)[-1]
    out = {token + ("table",): (names["embed"], None), norm + ("scale",): (names["norm"], None)}
    if not model.tied:
        out[find(model, GenerateToken, expected)[0] + ("table",)] = ("lm_head.weight", None)
    return out, ({"lm_head.weight": tied_name} if model.tied else {})


def llama_names(model: LanguageModel, layer: int, expected) -> tuple[dict, dict]:
    """As `bert_names`, for `dp.llama` (LlamaForCausalLM; Linear weights (out, in), no biases)."""
    if layer is None:
        return _top(model, expected, "embed_tokens.weight", {"embed": "embed_tokens.weight", "norm": "norm.weight"})
    block, prefix, flip = model.body.layer, f"layers.{layer}.", (lambda w: w.T)
    (at,), (first_norm, second_norm) = find(block, Attention), find(block, type(block.norm))
    (gated,), (down,) = find(block, GatedFeedForward), find(block, Dense)
    return {**{at + (ours, "weight"): (f"{prefix}self_attn.{theirs}_proj.weight", flip)
               for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v"), ("output", "o"))},
            first_norm + ("scale",): (prefix + "input_layernorm.weight", None),
            second_norm + ("scale",): (prefix + "post_attention_layernorm.weight", None),
            gated + ("gate", "weight"): (prefix + "mlp.gate_proj.weight", flip),
            gated + ("up", "weight"): (prefix + "mlp.up_proj.weight", flip),
            down + ("weight",): (prefix + "mlp.down_proj.weight", flip)}, {}


def mamba_names(model: LanguageModel, layer: int, expected) -> tuple[dict, dict]:
    """As `bert_names`, for `dp.mamba` (MambaForCausalLM; the convolution's weight (I, 1, K))."""
    if layer is None:
        return _top(model, expected, "embeddings.weight", {"embed": "embeddings.weight", "norm": "norm_f.weight"})
    block, prefix, flip = model.body.layer, f"layers.{layer}.", (lambda w: w.T)
    (mixer,), (norm,) = find(block, SelectiveSSM), find(block, type(block.norm))
    mixed = {("in_proj", "weight"): ("in_proj.weight", flip), ("conv", "kernel"): ("conv1d.weight", lambda w: w[:, 0, :].T),
             ("conv", "bias"): ("conv1d.bias", None), ("x_proj", "weight"): ("x_proj.weight", flip),
             ("dt_proj", "weight"): ("dt_proj.weight", flip), ("dt_proj", "bias"): ("dt_proj.bias", None),
             ("A_log",): ("A_log", None), ("D",): ("D", None), ("out_proj", "weight"): ("out_proj.weight", flip)}
    return {**{mixer + ours: (prefix + "mixer." + theirs, t) for ours, (theirs, t) in mixed.items()},
            norm + ("scale",): (prefix + "norm.weight", None)}, {}


def _kind(model, expected):
    """(prefix, names function, depth, path of the blocks' params) of a model diffprog can load."""
    if isinstance(model, Bert):
        return "bert.", bert_names, model.depth, find(model, TransformerBlock, expected)[0]
    body = getattr(model, "body", None)
    if isinstance(model, LanguageModel) and model.final_norm and model.per_position and isinstance(body, Repeat):
        block = body.layer
        if isinstance(block, TransformerBlock) and block.pre_norm and block.gated and not model.head_bias:
            return "model.", llama_names, body.n, find(model, TransformerBlock, expected)[0]
        if isinstance(block, TransformerBlock) and block.pre_norm and not model.head_bias:
            return "transformer.", gpt2_names, body.n, find(model, TransformerBlock, expected)[0]
        if find(block, SelectiveSSM) and not model.head_bias:
            return "backbone.", mamba_names, body.n, find(model, type(block), expected)[0]
    raise ArgumentError(f"load_pretrained: {model!r} is not a model built by dp.bert, dp.gpt2, dp.llama or dp.mamba"[:600])


def load_pretrained(model, source, *, fill=None, ignore: tuple = ()) -> dict:
    """The params of `model` (built by `dp.bert`, `dp.gpt2`, `dp.llama` or `dp.mamba`) from a Hugging Face checkpoint:
    a state dict, a `.safetensors` file or a `save_pretrained` directory (see the module).

    Strict: every param must come from the checkpoint with the expected shape, and every weight
    of the checkpoint must be used; otherwise a LayerError names the weights. Two ways to say
    otherwise: `fill=` params (e.g. `model.init(key, ids)`), or a key to initialise them with,
    supply the params the checkpoint lacks (a new head on a pretrained body), and `ignore=` name prefixes that may go unused (the
    pretraining heads "cls." of bert-base-uncased when loading the bare model)."""
    expected = jax.eval_shape(lambda key: model.init(key, jax.ShapeDtypeStruct((2,), np.int32)), jax.random.key(0))
    prefix, names_of, depth, stack = _kind(model, expected)
    state = _normalise(read_state_dict(source), prefix)
    if fill is not None and isinstance(fill, jax.Array) and jax.dtypes.issubdtype(fill.dtype, jax.dtypes.prng_key):
        fill = model.init(fill, jax.ShapeDtypeStruct((2,), np.int32))
    fill_leaves = {} if fill is None else {path_name(p): a for p, a in jax.tree_util.tree_flatten_with_path(fill)[0]}
    head_names, tied = names_of(model, None, expected)
    layer_names = [names_of(model, i, expected)[0] for i in range(depth)]
    used, missing = set(tied) & set(state), []
    for copy in used:  # a tied copy that differs is another (untied) model, not one to load silently
        if tied[copy] in state and not np.array_equal(state[copy], state[tied[copy]]):
            raise LayerError(f"load_pretrained: weight {copy} differs from {tied[copy]}, which {type(model).__name__} "
                             f"ties it to (a checkpoint with an untied head?)")

    def load(name, transform):
        used.add(name)
        return np.asarray((transform or (lambda a: a))(state[name]), np.float32)

    def leaf(path, spec):
        keys = tuple(getattr(k, "key", None) for k in path)
        in_blocks = keys[:len(stack)] == stack
        if in_blocks:
            sources = [names[keys[len(stack):]] for names in layer_names]
        elif keys in head_names:
            sources = [head_names[keys]]
        else:
            raise LayerError(f"load_pretrained({type(model).__name__}): no checkpoint weight maps to params{path_name(path)}")
        absent = [name for name, _ in sources if name not in state]
        if absent:
            if path_name(path) in fill_leaves:
                return fill_leaves[path_name(path)]
            missing.extend(absent)
            return None
        arrays = [load(*source) for source in sources]
        value = np.stack(arrays) if in_blocks else arrays[0]
        if value.shape != spec.shape:
            names = sources[0][0] if len(sources) == 1 else f"{sources[0][0]} (and the other {len(sources) - 1} layers)"
            raise LayerError(f"load_pretrained: weight {names} gives params{path_name(path)} the shape {value.shape}, "
                             f"the model expects {spec.shape} (a checkpoint of another configuration?)")
        return value

    params = jax.tree_util.tree_map_with_path(leaf, expected)
    if missing:
        raise LayerError(f"load_pretrained: the checkpoint lacks {sorted(missing)[:8]}{' ...' if len(missing) > 8 else ''} "
                         f"({len(missing)} weights; a new head? pass fill=params or fill=key to initialise them)")
    unused = sorted(n for n in set(state) - used if not n.startswith(tuple(ignore)))
    if unused:
        raise LayerError(f"load_pretrained: the checkpoint holds {unused[:8]}{' ...' if len(unused) > 8 else ''} "
                         f"({len(unused)} weights), which {type(model).__name__} has no place for "
                         f"(another head? pass ignore=(prefix, ...) to leave them out)")
    return jax.tree.map(jnp.asarray, params)


def from_pretrained(directory, head="pooler", **load) -> tuple:
    """(model, params) from a `save_pretrained` directory (config.json + model.safetensors) of a
    BERT (`head` as in `dp.bert`), GPT-2, Llama or Mamba; `load` keywords go to `load_pretrained`."""
    with open(os.path.join(os.fspath(directory), "config.json")) as f:
        config = json.load(f)
    kind = config.get("model_type")
    builders = {"bert": lambda: bert(config, head), "gpt2": lambda: gpt2(config), "llama": lambda: llama(config),
                "mamba": lambda: mamba(config)}
    if kind not in builders:
        raise ArgumentError(f"from_pretrained: config.json of {directory} has model_type={kind!r}; "
                            f"diffprog loads {sorted(builders)}")
    model = builders[kind]()
    return model, load_pretrained(model, directory, **load)
