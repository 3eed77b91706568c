"""gpt: a readable GPT / encoder-decoder Transformer library in pure PyTorch."""
from .config import ModelConfig, PRESETS, preset
from .kv_cache import KVCache
from .model import GPT, EncoderDecoder, build_model
from .tokenizer import Tokenizer, get_tokenizer
