"""Hugging Face GPT-2 checkpoints: load them into our GPT, and write ours in their layout.

Our GPT already uses GPT-2's parameter names, so converting is mostly bookkeeping:
- GPT-2's projections are `Conv1D` modules whose weights are stored (in, out); nn.Linear
  wants (out, in), so those four weights per layer are transposed;
- old checkpoints carry the causal-mask buffers `attn.bias` / `attn.masked_bias`, which we drop;
- `GPT2Model` checkpoints lack the "transformer." prefix that `GPT2LMHeadModel` ones have;
- a tied `lm_head.weight` is usually absent, and is the token embedding anyway.
"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch

from .config import ModelConfig
from .files import (
    CONFIG_FILE,
    CheckpointError,
    PathLike,
    atomic_directory,
    load_tensors_into,
    read_json,
    read_safetensors,
    stored_dtype,
    tied_names,
)
from .model import GPT
from .quantization import is_quantized

SAFETENSORS_FILE = "model.safetensors"
PICKLE_FILE = "pytorch_model.bin"
# Both are GELU's tanh approximation, which is what our "gelu" computes.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
MASK_BUFFERS = ("attn.bias", "attn.masked_bias")


def _is_layer_param(name: str, suffixes: tuple[str, ...]) -> bool:
    # "transformer.h.<i>.<suffix>"; matching whole components keeps "attn.c_attn.bias" from
    # looking like the "attn.bias" mask buffer.
    parts = name.split(".")
    return len(parts) > 3 and parts[:2] == ["transformer", "h"] and ".".join(parts[3:]) in suffixes


def config_from_hf(hf: dict, source: PathLike = CONFIG_FILE) -> ModelConfig:
    """Our ModelConfig for a Hugging Face GPT2Config dict; rejects variants we cannot reproduce."""

    def fail(msg: str):
        raise CheckpointError(f"{source}: {msg}")

    act = hf.get("activation_function", "gelu_new")
    if act not in TANH_GELUS:
        fail(
            f"activation_function {act!r} is not supported; this model's GELU is the tanh "
            f"approximation ({' or '.join(TANH_GELUS)})"
        )
    if hf.get("scale_attn_by_inverse_layer_idx"):
        fail("scale_attn_by_inverse_layer_idx=true is not supported")
    if hf.get("scale_attn_weights", True) is False:
        fail("scale_attn_weights=false is not supported")
    if hf.get("add_cross_attention"):
        fail("add_cross_attention=true is not supported")
    try:
        return ModelConfig(
            arch="gpt",
            pos_encoding="learned",
            norm="pre",
            bias=True,
            activation="gelu",
            dropout=0.0,
            vocab_size=hf["vocab_size"],
            block_size=hf.get("n_positions", hf.get("n_ctx")),
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
            d_ff=hf.get("n_inner") or 0,
            layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            tokenizer="gpt2",
        )
    except (KeyError, TypeError, ValueError) as e:
        fail(f"not a usable GPT-2 config ({type(e).__name__}: {e})")


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], Path]:
    st, pt = path / SAFETENSORS_FILE, path / PICKLE_FILE
    if st.is_file():
        return read_safetensors(st), st
    if pt.is_file():
        try:
            # weights_only: a plain tensor dict loads, anything that would run code is refused.
            sd = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{pt}: cannot read PyTorch weights ({type(e).__name__}: {e})") from e
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{pt}: expected a state dict of tensors")
        return sd, pt
    if (path / f"{SAFETENSORS_FILE}.index.json").is_file():
        raise CheckpointError(f"{path}: sharded checkpoints (model.safetensors.index.json) are not supported")
    raise CheckpointError(f"{path}: no weights found (expected {SAFETENSORS_FILE} or {PICKLE_FILE})")


def convert_hf_state(hf_state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename/transpose a GPT2LMHeadModel or GPT2Model state dict into our GPT's names.

    Shapes are not checked here; loading does that with the model at hand."""
    out = {}
    for name, t in hf_state.items():
        if not (name.startswith("transformer.") or name.startswith("lm_head.")):
            name = "transformer." + name
        if _is_layer_param(name, MASK_BUFFERS):
            continue
        if name == "lm_head.weight" and config.tie_embeddings:
            continue  # GPT-2 ties it to wte, as we do; a stored copy is redundant
        if _is_layer_param(name, CONV1D_WEIGHTS) and t.dim() == 2:
            t = t.t()
        out[name] = t
    return out


def load_hf_gpt2(
    path: PathLike, *, device="cpu", dtype: torch.dtype | None = None
) -> tuple[GPT, ModelConfig]:
    """A Hugging Face GPT-2 directory (config.json plus model.safetensors or pytorch_model.bin)
    as our GPT, in eval mode. dtype None keeps the stored dtype."""
    path = Path(path)
    config = config_from_hf(read_json(path / CONFIG_FILE), path / CONFIG_FILE)
    hf_state, source = _read_weights(path)
    model = GPT(config)
    load_tensors_into(model, convert_hf_state(hf_state, config), source)
    model.to(device=device, dtype=dtype or stored_dtype(hf_state))
    return model.eval(), config


def export_hf_gpt2(model: GPT, path: PathLike) -> Path:
    """Write a GPT-2-shaped model as a Hugging Face GPT2LMHeadModel directory (atomically),
    loadable with `transformers.GPT2LMHeadModel.from_pretrained(path)`."""
    if is_quantized(model):
        raise ValueError(
            "an int8-quantized model cannot be exported to the Hugging Face layout; export the "
            "float model (gpt.save keeps int8 weights in our own checkpoint format)"
        )
    c: ModelConfig = model.config
    unlike = {
        k: getattr(c, k)
        for k, v in dict(
            arch="gpt",
            pos_encoding="learned",
            norm="pre",
            bias=True,
            activation="gelu",
            scale_embeddings=False,
        ).items()
        if getattr(c, k) != v
    }
    if unlike:
        raise ValueError(
            f"only GPT-2-shaped models can be exported to the Hugging Face layout; this one has {unlike}"
        )
    hf_config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": None if c.d_ff == 4 * c.n_embd else c.d_ff,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": c.layer_norm_eps,
        "resid_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout,
        "tie_word_embeddings": c.tie_embeddings,
        "scale_attn_weights": True,
        # GPT-2's and the byte tokenizer both put end-of-text last.
        "bos_token_id": c.vocab_size - 1,
        "eos_token_id": c.vocab_size - 1,
    }
    aliases = tied_names(model)
    tensors = {}
    for name, t in model.state_dict().items():
        if name in aliases:
            continue
        tensors[name] = (t.t() if _is_layer_param(name, CONV1D_WEIGHTS) else t).detach().contiguous()
    with atomic_directory(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp / SAFETENSORS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
    return Path(path)
