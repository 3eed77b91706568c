"""gpt: a readable GPT / encoder-decoder Transformer library in pure PyTorch.

model, tokenizer = gpt.load(path)
text = gpt.generate(model, tokenizer, "a prompt", max_new_tokens=64, temperature=0.0)
"""

from .beam import BeamSearch, beam_search
from .bpe import BPETokenizer, train_bpe
from .checkpoint import CheckpointError, load, load_checkpoint, save
from .compile import compile_decode
from .config import PRESETS, ModelConfig, preset
from .constraints import Constraint
from .cuda_graphs import cuda_graph_decode
from .decoding import Piece, SequenceDecoder, decode_tokens
from .evaluate import Score, score_pairs, score_texts
from .generate import Completion, complete, generate
from .hf import export_hf_gpt2, load_hf_gpt2
from .kv_cache import KVCache
from .limits import ContextLimits, RequestError
from .linear import pack_linear_weights
from .model import GPT, EncoderDecoder, build_model
from .quantization import quantize
from .sampling import SamplingParams
from .streaming import IncrementalDetokenizer, StopMatcher, TextStream
from .tokenizer import Tokenizer, get_tokenizer

__all__ = [
    "GPT",
    "EncoderDecoder",
    "build_model",
    "pack_linear_weights",
    "ModelConfig",
    "PRESETS",
    "preset",
    "KVCache",
    "load",
    "save",
    "load_checkpoint",
    "CheckpointError",
    "load_hf_gpt2",
    "export_hf_gpt2",
    "generate",
    "complete",
    "beam_search",
    "BeamSearch",
    "Completion",
    "Piece",
    "SamplingParams",
    "Constraint",
    "SequenceDecoder",
    "decode_tokens",
    "ContextLimits",
    "RequestError",
    "quantize",
    "compile_decode",
    "cuda_graph_decode",
    "Tokenizer",
    "get_tokenizer",
    "BPETokenizer",
    "train_bpe",
    "IncrementalDetokenizer",
    "TextStream",
    "StopMatcher",
    "Score",
    "score_texts",
    "score_pairs",
]
