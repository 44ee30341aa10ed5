"""BERT, GPT-2, Llama and Mamba in the notes' notation, built from the fields of a Hugging Face config:

    BERT  = TransformerBlock^L ∘ Dropout ∘ LayerNorm ∘ EmbedSegment ∘ LearnedPositions ∘ EmbedToken
    GPT2  = GenerateToken ∘ LayerNorm ∘ TransformerBlock(causal, pre-LN)^L ∘ Dropout ∘ LearnedPositions ∘ EmbedToken
    Llama = GenerateToken ∘ RMSNorm ∘ TransformerBlock(causal, pre-norm, RMSNorm, rotary, GQA, SwiGLU)^L ∘ EmbedToken
    Mamba = GenerateToken ∘ RMSNorm ∘ (x + SelectiveSSM(RMSNorm(x)))^L ∘ EmbedToken

`dp.bert(config, head=...)` computes what `BertModel` (with its pooler), `BertForMaskedLM` and
`BertForQuestionAnswering` compute, `dp.gpt2(config)` what `GPT2LMHeadModel` computes,
`dp.llama` and `dp.mamba` what `LlamaForCausalLM` and `MambaForCausalLM` compute; their
weights load with `dp.load_pretrained`. A config field that would make a different model than
the one diffprog builds (relative positions, an unknown activation, a decoder) is an
`ArgumentError` naming it, never a silently different model.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from .basic import Dense, Dropout, FeedForward, PositionWise, RMSNorm, affine, norm_field, set_norm
from .core import ArgumentError, Layer, Pipeline, built_field, layerclass, set_built
from .embed import EmbedToken
from .generate import GenerateToken, LanguageModel
from .sequence import Collapse
from .ssm import SelectiveSSM
from .transformer import AddNorm, EmbedSegment, LearnedPositions, TransformerBlock

ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu"}
"""Hugging Face `hidden_act` / `activation_function` names → diffprog activations."""


@layerclass
class SelectSpan(PositionWise):
    """The notes' span selection: for every position t of the encoded sequence h (T, d),

        start_t = w_s · h_t + b_s,   end_t = w_e · h_t + b_e,

    the logits of t being the first and the last token of the answer (softmax over t).
    Type: (T, d) → ((T,), (T,)). Params: weight (d, 2), bias (2,) (BERT's `qa_outputs`).
    """

    def init_params(self, key, spec, **side):
        self.expect(spec, ("T", "d"))
        return Dense(2).init_params(key, spec)

    def map(self, params, h):
        logits = affine(params, h)
        return logits[..., 0], logits[..., 1]


BERT_HEADS = (None, "pooler", "masked_lm", "question_answering")


@layerclass
class Bert(Pipeline):
    """BERT(x) = TransformerBlock^depth(E(x)), E = Dropout ∘ LayerNorm ∘ EmbedSegment ∘
    LearnedPositions ∘ EmbedToken (post-LN blocks, `activation` in the feed-forward), then `head`:

    - None: the hidden states, int[T] → (T, d);
    - "pooler": (hidden states, tanh(W h_0 + b)) — `BertModel`'s two outputs, int[T] → ((T, d), (d,));
    - "masked_lm": GenerateToken(+ bias, tied to the token table) ∘ LayerNorm ∘ FeedForward(d,
      activation), the logits (T, vocab) of every position's token — `BertForMaskedLM`;
    - "question_answering": SelectSpan, the start and end logits ((T,), (T,)) —
      `BertForQuestionAnswering`.

    Every norm is `norm` (LayerNorm(eps) unless given). The depth blocks run as one lax.scan. Side inputs: `segments=` int[T] (which of `types`
    segments each token is in; absent: all 0), `lengths=` (valid steps: padded keys are hidden
    from every query), `key=` (dropout). Params: {"embeddings", "encoder", and "pooler",
    "masked_lm" (+ "decoder": {"bias"}) or "question_answering"}; every head shares the
    embeddings and encoder, so a pretrained body moves from one head to another as it is.
    """

    vocab: int
    d: int
    heads: int
    ff: int
    depth: int
    max_len: int = 512
    types: int = 2
    activation: str = "gelu"
    eps: float = 1e-12
    dropout: float = 0.1
    attention_dropout: float = 0.1
    head: Optional[str] = "pooler"
    norm: Layer = norm_field()
    parts: tuple = built_field()
    """(name, layer): the embeddings, the encoder and the head, as the fields build them
    (`build`) or as `dp.rewrite` made them."""

    def __post_init__(self):
        super().__post_init__()
        set_norm(self)
        if self.head not in BERT_HEADS:
            raise ArgumentError(f"Bert: head must be one of {BERT_HEADS}, got {self.head!r}")
        set_built(self, "parts", self.build())

    def build(self) -> tuple:
        block = TransformerBlock(self.d, self.heads, self.ff, dropout=self.dropout, activation=self.activation,
                                 eps=self.eps, attention_dropout=self.attention_dropout, norm=self.norm)
        embeddings = (Dropout(self.dropout) @ self.norm @ EmbedSegment(self.types)
                      @ LearnedPositions(self.max_len) @ EmbedToken(self.vocab, self.d))
        head = {None: None, "pooler": FeedForward(self.d, "tanh") @ Collapse("first"),
                "masked_lm": self.norm @ FeedForward(self.d, self.activation),
                "question_answering": SelectSpan()}[self.head]
        return (("embeddings", embeddings), ("encoder", block ** self.depth)) + ((self.head, head),) * (head is not None)

    @property
    def block(self) -> TransformerBlock:
        """The encoder's block (the layer of its `block ** depth`)."""
        return self.parts[1][1].layer

    def named_stages(self):
        """The body: the embeddings and the encoder."""
        return list(self.parts[:2])

    def children(self):
        return list(self.parts)

    @property
    def head_layer(self):
        return self.parts[2][1] if self.head is not None else None

    def init_params(self, key, spec, **side):
        params = super().init_params(key, spec, **side)
        hidden = jax.ShapeDtypeStruct(spec.shape + (self.d,), jnp.float32)
        if self.head is not None:
            params[self.head] = self.head_layer.init(jax.random.fold_in(key, len(self.named_stages())), hidden)
        if self.head == "masked_lm":
            params["decoder"] = {"bias": jnp.zeros((self.vocab,), jnp.float32)}
        return params

    def route(self, run, params, ids, *, key=None, **side):
        hidden = super().route(run, params, ids, key=key, **side)
        if self.head is None:
            return hidden
        out = run(self.head_layer, params[self.head], hidden)
        if self.head == "pooler":
            return hidden, out
        if self.head == "masked_lm":
            (name, embeddings), _ = self.named_stages()
            table = params[name][embeddings.names()[0]]["table"]  # the token table: the first stage
            return run(GenerateToken(self.vocab, use_bias=True), {"table": table, **params["decoder"]}, out)
        return out

    def __repr__(self):
        head = {None: "", "pooler": "Pooler ∘ ", "question_answering": "SelectSpan ∘ ",
                "masked_lm": f"GenerateToken ∘ {self.head_layer!r} ∘ "}[self.head]
        return head + " ∘ ".join(repr(layer) for _, layer in reversed(self.named_stages()))


BERT_CONFIG = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
                   attention_probs_dropout_prob=0.1, max_position_embeddings=512, type_vocab_size=2,
                   layer_norm_eps=1e-12, position_embedding_type="absolute", is_decoder=False,
                   add_cross_attention=False, tie_word_embeddings=True)
"""`BertConfig`'s defaults (bert-base) for the fields that decide the computation."""

GPT2_CONFIG = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
                   activation_function="gelu_new", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                   layer_norm_epsilon=1e-5, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                   add_cross_attention=False, tie_word_embeddings=True)
"""`GPT2Config`'s defaults (GPT-2 small) for the fields that decide the computation."""

LLAMA_CONFIG = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu", rms_norm_eps=1e-6,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rope_theta=None, rope_scaling=None,
                    attention_bias=False, mlp_bias=False, attention_dropout=0.0, pretraining_tp=1,
                    tie_word_embeddings=False)
"""`LlamaConfig`'s defaults (Llama 2 7B's shape) for the fields that decide the computation
(`rope_theta` / `rope_scaling`: the fields of configs written before `rope_parameters`)."""

MAMBA_CONFIG = dict(vocab_size=50280, hidden_size=768, state_size=16, num_hidden_layers=32, layer_norm_epsilon=1e-5,
                    expand=2, conv_kernel=4, intermediate_size=None, time_step_rank="auto", use_bias=False,
                    use_conv_bias=True, hidden_act="silu", tie_word_embeddings=True)
"""`MambaConfig`'s defaults for the fields that decide the computation."""

SUPPORTED = {"position_embedding_type": ("absolute",), "is_decoder": (False,), "add_cross_attention": (False,),
             "scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,), "rope_scaling": (None,),
             "attention_bias": (False,), "mlp_bias": (False,), "pretraining_tp": (1,), "use_bias": (False,),
             "use_conv_bias": (True,)}
"""Fields diffprog reads only at these values (any other value is another model)."""


IGNORED = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "pad_token_id",
    "bos_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id", "initializer_range", "use_cache",
    "classifier_dropout", "gradient_checkpointing", "id2label", "label2id", "num_labels", "problem_type",
    "finetuning_task", "task_specific_params", "tokenizer_class", "prefix", "return_dict", "output_hidden_states",
    "output_attentions", "torchscript", "pruned_heads", "chunk_size_feed_forward", "is_encoder_decoder",
    "n_ctx", "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
    "summary_first_dropout", "reorder_and_upcast_attn", "max_position_embeddings", "residual_in_fp32", "time_step_scale",
    "time_step_min", "time_step_max", "time_step_init_scheme", "time_step_floor", "rescale_prenorm_residual",
    "use_mambapy", "use_associative_scan", "layer_types"})
"""Fields of Hugging Face configs (config.json) that do not change what the model computes."""


def read_config(function: str, defaults: dict, config, fields: dict) -> dict:
    """defaults ← config (a Hugging Face config object, or a dict of its fields) ← keyword
    fields. Fields a Hugging Face config object carries that do not change the computation
    (`architectures`, `pad_token_id`, ...) are ignored; a dict may hold those of IGNORED. Any
    other field diffprog does not know (in a dict or as a keyword: a typo would otherwise be
    dropped), or a value it cannot express, is an ArgumentError naming the field."""
    given = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    if given.get("model_type", function) != function:
        raise ArgumentError(f"{function}: got the config of a {given['model_type']!r} model")
    unknown = sorted(set(fields) - set(defaults))
    if not hasattr(config, "to_dict"):
        unknown += sorted(set(given) - set(defaults) - IGNORED)
    if unknown:
        raise ArgumentError(f"{function}: unknown config field(s) {unknown}; it reads {sorted(defaults)}")
    merged = {**defaults, **{k: v for k, v in given.items() if k in defaults}, **fields}
    for name, allowed in SUPPORTED.items():
        if name in merged and merged[name] not in allowed:
            raise ArgumentError(f"{function}: config field {name}={merged[name]!r} is not supported "
                                f"(diffprog builds {name}={allowed[0]!r})")
    for name in ("hidden_act", "activation_function"):
        if name in merged and merged[name] not in ACTIVATIONS:
            raise ArgumentError(f"{function}: config field {name}={merged[name]!r} is not supported; "
                                f"supported: {sorted(ACTIVATIONS)}")
    return merged


def bert(config=None, head: Optional[str] = "pooler", **fields) -> Bert:
    """BERT from a `BertConfig` (or a dict of its fields; keyword fields override it; absent
    fields take BertConfig's defaults, i.e. bert-base). `head`: None, "pooler" (BertModel),
    "masked_lm" (BertForMaskedLM) or "question_answering" (BertForQuestionAnswering)."""
    c = read_config("bert", BERT_CONFIG, config, fields)
    if not c["tie_word_embeddings"] and head == "masked_lm":
        raise ArgumentError("bert: config field tie_word_embeddings=False is not supported (the masked-LM "
                            "head reads the token table)")
    return Bert(c["vocab_size"], c["hidden_size"], c["num_attention_heads"], c["intermediate_size"],
                c["num_hidden_layers"], c["max_position_embeddings"], c["type_vocab_size"],
                ACTIVATIONS[c["hidden_act"]], c["layer_norm_eps"], c["hidden_dropout_prob"],
                c["attention_probs_dropout_prob"], head)


def gpt2(config=None, **fields) -> LanguageModel:
    """GPT-2 (`GPT2LMHeadModel`) from a `GPT2Config` (or a dict of its fields; keyword fields
    override it; absent fields take GPT2Config's defaults, i.e. GPT-2 small): int[T] → (T, vocab),
    the next-token logits after every prefix; `dp.generate` decodes it with a KV cache."""
    c = read_config("gpt2", GPT2_CONFIG, config, fields)
    d = c["n_embd"]
    block = TransformerBlock(d, c["n_head"], c["n_inner"] or 4 * d, causal=True, pre_norm=True,
                             dropout=c["resid_pdrop"], activation=ACTIVATIONS[c["activation_function"]],
                             eps=c["layer_norm_epsilon"], attention_dropout=c["attn_pdrop"])
    return LanguageModel(c["vocab_size"], d, block ** c["n_layer"], positions=LearnedPositions(c["n_positions"]),
                         final_norm=True, per_position=True, tied=c["tie_word_embeddings"],
                         eps=c["layer_norm_epsilon"], dropout=c["embd_pdrop"])


def llama(config=None, **fields) -> LanguageModel:
    """Llama (`LlamaForCausalLM`, the "Transformer++") from a `LlamaConfig` (or a dict of its
    fields; keyword fields override it):

        Llama = GenerateToken ∘ RMSNorm ∘ TransformerBlock(causal, pre-norm, RMSNorm, rotary,
                grouped-query, SwiGLU, no biases)^L ∘ EmbedToken

    int[T] → (T, vocab), the next-token logits after every prefix; `dp.generate` decodes it
    with a KV cache of kv_heads heads."""
    c = read_config("llama", LLAMA_CONFIG, config, fields)
    d, heads = c["hidden_size"], c["num_attention_heads"]
    rope = dict(c["rope_parameters"] or {})
    if rope.get("rope_type", "default") != "default":
        raise ArgumentError(f"llama: config field rope_parameters={rope!r} is not supported (diffprog builds rope_type 'default')")
    if c["head_dim"] not in (None, d // heads):
        raise ArgumentError(f"llama: config field head_dim={c['head_dim']} is not supported (diffprog builds "
                            f"hidden_size / num_attention_heads = {d // heads})")
    kv_heads = c["num_key_value_heads"] if c["num_key_value_heads"] not in (None, heads) else None
    norm = RMSNorm(c["rms_norm_eps"])
    block = TransformerBlock(d, heads, c["intermediate_size"], causal=True, pre_norm=True, dropout=0.0,
                             activation=ACTIVATIONS[c["hidden_act"]], gated=True, use_bias=False, kv_heads=kv_heads,
                             rotary=float(rope.get("rope_theta") or c["rope_theta"] or 10000.0), norm=norm,
                             attention_dropout=c["attention_dropout"])
    return LanguageModel(c["vocab_size"], d, block ** c["num_hidden_layers"], final_norm=True, norm=norm,
                         per_position=True, tied=c["tie_word_embeddings"])


def mamba(config=None, **fields) -> LanguageModel:
    """Mamba (`MambaForCausalLM`) from a `MambaConfig` (or a dict of its fields; keyword fields
    override it):

        Mamba = GenerateToken ∘ RMSNorm ∘ (x + SelectiveSSM(RMSNorm(x)))^L ∘ EmbedToken

    int[T] → (T, vocab); `dp.generate` decodes it carrying each layer's state and convolution
    window."""
    c = read_config("mamba", MAMBA_CONFIG, config, fields)
    d = c["hidden_size"]
    if c["intermediate_size"] not in (None, c["expand"] * d):
        raise ArgumentError(f"mamba: config field intermediate_size={c['intermediate_size']} is not expand · "
                            f"hidden_size = {c['expand'] * d}")
    rank = c["time_step_rank"]
    rank = None if rank == "auto" or rank == math.ceil(d / 16) else int(rank)
    norm = RMSNorm(c["layer_norm_epsilon"])
    block = AddNorm(SelectiveSSM(c["state_size"], c["expand"], c["conv_kernel"], rank), pre_norm=True, norm=norm)
    return LanguageModel(c["vocab_size"], d, block ** c["num_hidden_layers"], final_norm=True, norm=norm,
                         per_position=True, tied=c["tie_word_embeddings"])
