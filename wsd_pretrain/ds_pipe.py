"""The main job on DeepSpeed's PipelineEngine (``train.engine: deepspeed`` with ``parallel.pp > 1``).

The project's Llama (:class:`~wsd_pretrain.model.LlamaLM`) becomes a ``PipelineModule``: one ``LayerSpec`` for the
embedding, one per decoder layer, one for the final norm and one for the output layer (with tied embeddings the
embedding and the output layer are one ``TiedLayerSpec``, key ``embed``, held by the first and the last stage), and
the loss (the model's own cross-entropy) on the last stage. Every layer module carries the Hugging Face names under
it (``model.embed_tokens``, ``model.layers.<i>``, ``model.norm``, ``lm_head``), so a parameter's PipelineModule name
is ``<layer index>.<its Hugging Face name>`` (``tied_modules.embed.<its name>`` for the tied one), and
:func:`hf_name` (the manager's ``Pipeline(names=...)``) drops that first part: the checkpoint's model folder loads
with ``from_pretrained`` under the model's own names, whatever the number of stages.

Every rank builds the whole model from the job's seed first (the weights are the unsplit model's exactly), and the
PipelineModule keeps its own stage's layers (decision 133's limitation: no meta-device initialisation yet).
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .model import DecoderLayer, LlamaLM, ModelConfig

__all__ = ["build_pipeline_module", "hf_name", "pipe_batches"]

_PREFIX = re.compile(r"^(?:\d+|tied_modules\.[^.]+)\.")


def hf_name(name: str) -> str:
    """A PipelineModule parameter's name in the model (``3.model.layers.2.mlp.up_proj.weight`` ->
    ``model.layers.2.mlp.up_proj.weight``; ``tied_modules.embed.model.embed_tokens.weight`` ->
    ``model.embed_tokens.weight``)."""
    out, n = _PREFIX.subn("", name, count=1)
    if not n:
        raise ConfigError(f"{name!r} is not a PipelineModule layer's parameter name", where="DeepSpeed pipeline")
    return out


class _Holder(nn.Module):
    """An empty module that only carries a name segment (``model``)."""


class EmbedLayer(nn.Module):
    """The first layer: token ids -> hidden states (``model.embed_tokens``). With tied embeddings the last stage's
    copy of it computes the logits (:func:`tied_logits`)."""

    def __init__(self, embed: nn.Embedding) -> None:
        super().__init__()
        self.model = _Holder()
        self.model.embed_tokens = embed

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(tokens)


def tied_logits(module: EmbedLayer, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, module.model.embed_tokens.weight)


class DecoderStageLayer(nn.Module):
    """Decoder layer ``index`` (``model.layers.<index>``) with its own rotary tables (the model computes them once
    per forward; a pipeline stage has no model around it)."""

    def __init__(self, layer: DecoderLayer, index: int, inv_freq: torch.Tensor) -> None:
        super().__init__()
        self.model = _Holder()
        self.model.layers = nn.ModuleDict({str(index): layer})
        self.index = str(index)
        self.register_buffer("inv_freq", inv_freq.clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.size(1)
        pos = torch.arange(t, device=x.device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq.to(x.device))
        emb = torch.cat((freqs, freqs), dim=-1)  # as LlamaLM._rope
        cos, sin = emb.cos().to(x.dtype)[None, None], emb.sin().to(x.dtype)[None, None]
        return self.model.layers[self.index](x, cos, sin)


class NormLayer(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.model = _Holder()
        self.model.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.norm(x)


class HeadLayer(nn.Module):
    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.lm_head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(x)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The model's own loss (:meth:`LlamaLM.forward` with targets)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


def build_pipeline_module(full: LlamaLM, pp: int, activation_checkpointing: bool = False) -> Any:
    """``full`` (the whole model, built from the job's seed) as a ``PipelineModule`` of ``pp`` stages, the decoder
    layers spread evenly (``model.num_layers`` divisible by ``pp``: checked with the config)."""
    import deepspeed
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    # the PipelineModule makes its groups through deepspeed.comm, over the job's torch process group
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    cfg: ModelConfig = full.cfg
    body = full.model
    specs: list[Any] = []
    if cfg.tie_embeddings:
        embed = TiedLayerSpec("embed", EmbedLayer, body.embed_tokens, tied_weight_attr=["model.embed_tokens.weight"])
        specs.append(embed)
    else:
        specs.append(LayerSpec(EmbedLayer, body.embed_tokens))
    for i, layer in enumerate(body.layers):
        layer.checkpointing = activation_checkpointing
        specs.append(LayerSpec(DecoderStageLayer, layer, i, full.inv_freq))
    specs.append(LayerSpec(NormLayer, body.norm))
    if cfg.tie_embeddings:
        specs.append(
            TiedLayerSpec(
                "embed",
                EmbedLayer,
                body.embed_tokens,
                forward_fn=tied_logits,
                tied_weight_attr=["model.embed_tokens.weight"],
            )
        )
    else:
        specs.append(LayerSpec(HeadLayer, full.lm_head))
    # the decoder layers are what is balanced: num_layers / pp each, the embedding on the first stage, the norm and
    # the output layer on the last
    return PipelineModule(
        specs,
        num_stages=pp,
        loss_fn=loss_fn,
        partition_method="type:DecoderStageLayer",
        activation_checkpoint_interval=0,
    )


def pipe_batches(
    inputs: list[torch.Tensor], targets: list[torch.Tensor], microbatches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The micro-steps' batches (each ``train.micro_batch_size`` sequences) cut into ``microbatches`` pipeline
    microbatches each, in order: what ``train_batch``/``eval_batch`` pull from their iterator."""
    out = []
    for x, y in zip(inputs, targets):
        out += list(zip(x.chunk(microbatches), y.chunk(microbatches)))
    return out
