"""A small Llama-style decoder, built from a config (no hub download), with Hugging Face Llama's parameter names.

RMSNorm, rotary position embeddings (the "rotate half" form, as transformers' Llama), grouped-query attention
through ``scaled_dot_product_attention``, SwiGLU MLP, optional tied embeddings. The names
(``model.embed_tokens.weight``, ``model.layers.0.self_attn.q_proj.weight``, ``lm_head.weight``, ...) and
:meth:`ModelConfig.hf_config` make every checkpoint a folder that ``transformers.LlamaForCausalLM.from_pretrained``
loads, with the same logits (tested).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

__all__ = ["LlamaLM", "ModelConfig"]


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The ``model:`` section. The default is the tiny CPU model (about 0.8M parameters, byte-level)."""

    vocab_size: int = 256
    """Vocabulary size (256: bytes)."""
    hidden_size: int = 128
    intermediate_size: int = 352
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention); must divide num_heads."""
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    attention_dropout: float = 0.0
    """Dropout on the attention probabilities while training, in [0, 1) (Hugging Face Llama's
    ``attention_dropout``); it draws from each rank's torch generator, which checkpoints save and restore."""

    def __post_init__(self) -> None:
        problems = []
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "max_seq_len",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name}={value!r}: a whole number > 0")
        if not problems:
            if self.hidden_size % self.num_heads:
                problems.append(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
            elif (self.hidden_size // self.num_heads) % 2:
                problems.append(f"head size {self.hidden_size // self.num_heads} must be even for rotary embeddings")
            if self.num_heads % self.num_kv_heads:
                problems.append(f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            problems.append(f"rope_theta={self.rope_theta!r}: must be > 0")
        if not (
            isinstance(self.attention_dropout, (int, float))
            and not isinstance(self.attention_dropout, bool)
            and 0 <= self.attention_dropout < 1
        ):
            problems.append(f"attention_dropout={self.attention_dropout!r}: a probability in [0, 1)")
        if problems:
            raise ConfigError(problems, where="model config")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def num_parameters(self) -> int:
        """Parameter count, computed from the shapes (checks a recipe's size without building it)."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.num_kv_heads * self.head_dim
        per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + embeddings + h

    def hf_config(self) -> dict[str, Any]:
        """A transformers ``LlamaConfig`` as a dict (the checkpoint's ``config.json``)."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_seq_len,
            "rope_theta": float(self.rope_theta),
            "rms_norm_eps": self.rms_norm_eps,
            "attention_dropout": float(self.attention_dropout),
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": "float32",
            "wsd_pretrain": asdict(self),
        }


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, kv = cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, kv, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, kv, bias=False)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.head_dim = d

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        cfg = self.cfg
        # -1 heads: under tensor parallelism a rank's q/k/v hold its num_heads / tp and num_kv_heads / tp heads
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if cfg.num_kv_heads != cfg.num_heads:
            rep = cfg.num_heads // cfg.num_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        dropout = cfg.attention_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

        self.checkpointing = False
        """Recompute this layer's activations in the backward (``train.activation_checkpointing``)."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self._forward, x, cos, sin, use_reentrant=False)
        return self._forward(x, cos, sin)

    def _forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Body(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaLM(nn.Module):
    """The language model. ``forward(tokens)`` returns logits; ``forward(tokens, targets)`` the mean
    cross-entropy (the loss the trainer and the engines use)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = _Body(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.seq_shards = 1
        """Slices of the sequence a pipeline stage's input is cut in (tensor/sequence parallelism: tp), else 1."""
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() == 2:
                # scaled init of the residual projections (GPT-2 / OLMo): keeps the residual stream's scale
                scale = (
                    1.0 / math.sqrt(2 * self.cfg.num_layers)
                    if name.endswith(("o_proj.weight", "down_proj.weight"))
                    else 1.0
                )
                nn.init.normal_(p, mean=0.0, std=std * scale)
            else:
                nn.init.ones_(p)

    def _rope(self, t: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(t, device=device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq.to(device))
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[None, None], emb.sin().to(dtype)[None, None]

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if tokens.size(1) > self.cfg.max_seq_len:
            raise ConfigError(
                f"sequence of {tokens.size(1)} tokens is longer than model.max_seq_len={self.cfg.max_seq_len}",
                where="model",
            )
        # a pipeline stage (parallel.py) keeps only its own parts: no embedding after the first stage (its input is
        # the previous stage's hidden states), no final norm and output layer before the last (it returns them)
        x = self.model.embed_tokens(tokens) if self.model.embed_tokens is not None else tokens
        # a later stage under sequence parallelism receives its rank's slice of the sequence (seq_shards of them);
        # attention gathers the whole sequence, which the rotary tables must cover
        cos, sin = self._rope(tokens.size(1) * self.seq_shards, x.device, x.dtype)
        layers = self.model.layers
        for layer in layers.values() if isinstance(layers, nn.ModuleDict) else layers:
            x = layer(x, cos, sin)
        if self.model.norm is None:
            return x
        logits = self.lm_head(self.model.norm(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
