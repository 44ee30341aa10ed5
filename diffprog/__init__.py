"""diffprog: differentiable programs written the way the notes write them.

    import diffprog as dp
    model = dp.FeedForward(1, activation="identity") @ dp.FeedForward(16) ** 2
    params = model.init(jax.random.key(0), x)
    y = model(params, x)
"""
from .attention import Attention
from .basic import (ACTIVATIONS, Activation, Dense, Dropout, FeedForward, Flatten, Gelu,
                    LayerNorm, Relu, Sigmoid, Softmax, Step, Tanh, step)
from .conv import AvgPool, Conv, MaxPool
from .core import (ArgumentError, Batched, Compose, Layer, LayerError, Pipeline, Remat, Repeat, batched, layerclass,
                   serial, spec_of)
from .embed import EmbedToken
from .generate import GenerateToken, LanguageModel, generate, sample
from .interop import from_flax, to_flax
from .memory import keep_freed_memory
from .recurrent import GRU, LSTM, LSTM_GATES, Bidirectional, Recurrent, SimpleRNN
from .seq2seq import SequenceToSequence, rnn_seq2seq, transformer_seq2seq, translate
from .sequence import Collapse
from . import soft, text
from .soft import Gated, SoftLookup, Switch
from .summary import summary
from .torch_weights import load_torch
from .transformer import AddNorm, EmbedSegment, LearnedPositions, SinusoidalPositions, TransformerBlock
from .models import Bert, SelectSpan, bert, gpt2
from .hf import from_pretrained, load_pretrained

from . import metrics
from .train import CheckpointError, TrainingError, TrainResult, TrainStep, train

__version__ = "0.1.0"
