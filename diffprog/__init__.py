"""diffprog: differentiable programs written the way the notes write them.

    import diffprog as dp
    model = dp.FeedForward(1, activation="identity") @ dp.FeedForward(16) ** 2
    params = model.init(jax.random.key(0), x)
    y = model(params, x)
"""
from .attention import Attention
from .basic import (ACTIVATIONS, Activation, Dense, Dropout, FeedForward, Flatten, GatedFeedForward, Gelu,
                    LayerNorm, RMSNorm, Relu, Sigmoid, Softmax, Step, Tanh, step)
from .batching import Batched, batched
from .conv import AvgPool, Conv, MaxPool
from .checks import ArgumentError, LayerError, spec_of
from .core import Compose, Layer, Pipeline, Remat, Repeat, Wrapper, find, layerclass, rewrite, serial, walk
from .embed import EmbedToken
from .generate import GenerateToken, LanguageModel, generate, sample
from .interop import from_flax, to_flax
from .lora import LowRank, low_rank, merge_low_rank
from .memory import keep_freed_memory
from .recurrent import GRU, LSTM, LSTM_GATES, Bidirectional, Recurrent, SimpleRNN
from .seq2seq import SequenceToSequence, rnn_seq2seq, transformer_seq2seq, translate
from .sequence import Collapse
from . import soft, text
from .soft import Gated, SoftLookup, Switch
from .summary import summary
from .taps import Tapped, taps
from .upgrade import upgrade_params
from .torch_weights import load_torch
from .transformer import AddNorm, EmbedSegment, LearnedPositions, SinusoidalPositions, TransformerBlock
from .models import Bert, SelectSpan, bert, gpt2, llama, mamba
from .ssm import SelectiveSSM
from .hf import from_pretrained, load_pretrained

from . import metrics
from .train import CheckpointError, TrainingError, TrainResult, TrainStep, train

__version__ = "0.1.0"
