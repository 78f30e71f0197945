"""Padding-free training: packed rows, per-sequence attention, logits only where the loss is.

A packed batch (``DataCollatorWithFlattening``) is one row holding every sequence back to back, with
position ids restarting at 0 and the boundaries in ``cu_seq_lens_q``. Two things make it pay:

* **Attention that sees the boundaries.** Variable-length FlashAttention kernels do this on CUDA: the
  ``flash_attn`` package when installed, else PyTorch's own ``torch.nn.attention.varlen.varlen_attn``
  (bf16/fp16). Elsewhere (CPU, fp32 on CUDA) transformers' SDPA path would give the row a dense
  block-diagonal mask, quadratic in the row's length; :func:`varlen_sdpa_attention` instead runs causal
  SDPA on each sequence's slice, so attention costs what it costs on the unpadded sequences.
* **Logits only at answer positions.** Labels mask the prompt, so the LM head and the cross-entropy over
  the vocabulary are only needed where the next token is an answer token. :func:`answer_only_loss` asks
  the model for those positions alone (transformers' boolean ``logits_to_keep``); the loss is the same
  number, at 40–60% less LM-head work on Q&A data.
"""

from __future__ import annotations

import functools
from typing import Any

from loraops.core.config import ConfigError

VARLEN_SDPA = "loraops_varlen_sdpa"


def varlen_sdpa_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                          dropout: float = 0.0, scaling: float | None = None, cu_seq_lens_q: Any = None,
                          **kwargs: Any) -> tuple[Any, None]:
    """Causal attention on each packed sequence; the same signature as transformers' attention functions.

    Without ``cu_seq_lens_q`` (an ordinary padded or single-sequence batch) it is transformers' SDPA. A
    packed row goes to PyTorch's variable-length FlashAttention where it runs (:func:`_torch_varlen`),
    else to causal SDPA on each sequence's slice.
    """
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if cu_seq_lens_q is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    _check_supported(cu_seq_lens_q, kwargs)
    fused = _torch_varlen(query, scaling, dropout if module.training else 0.0)
    if fused is not None and kwargs.get("max_length_q") is not None:
        return _varlen_flash(fused, module, query, key, value, scaling, cu_seq_lens_q, kwargs["max_length_q"]), None
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    bounds = cu_seq_lens_q.tolist() if hasattr(cu_seq_lens_q, "tolist") else list(cu_seq_lens_q)
    lengths = [end - start for start, end in zip(bounds, bounds[1:])]
    outputs = [
        F.scaled_dot_product_attention(q, k, v, dropout_p=dropout if module.training else 0.0, is_causal=True, scale=scaling)
        for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))
    ]
    return torch.cat(outputs, 2).transpose(1, 2).contiguous(), None


def _check_supported(cu_seq_lens: Any, kwargs: dict[str, Any]) -> None:
    """Refuse what causal attention per sequence would get wrong: soft-capped scores (Gemma 2), or a
    sliding window (Mistral, Gemma) shorter than the longest sequence, where it would change the result.

    Raises:
        ConfigError: naming the setting and the way out (the CLI prints it and exits 2).
    """
    window, longest = kwargs.get("sliding_window"), kwargs.get("max_length_q")
    if window is not None and longest is None:
        bounds = cu_seq_lens.tolist()
        longest = max(end - start for start, end in zip(bounds, bounds[1:]))
    problem = None
    if kwargs.get("softcap") is not None:
        problem = "soft-capped attention scores"
    elif window is not None and longest > window:
        problem = f"a {window}-token sliding window, shorter than a {longest}-token sequence"
    if problem:
        raise ConfigError(f"train.batching=packed: this model's attention uses {problem}, which packed rows "
                         "support only with flash_attn installed on CUDA; set train.batching=padded")


def packing_problem(config: Any, device: str, max_length: int | None) -> str | None:
    """What in ``config``'s attention packed rows would get wrong here (as :func:`_check_supported` finds while
    training), or None: soft-capped scores, or a sliding window shorter than ``max_length``. flash_attn on CUDA
    handles both."""
    import importlib.util

    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return None
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "soft-capped attention scores"
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    sliding = "sliding_attention" in layer_types if layer_types else bool(getattr(config, "use_sliding_window", True))
    if window and sliding and max_length and window < max_length:
        return f"a {window}-token sliding window, shorter than model.max_length={max_length}"
    return None


@functools.lru_cache(maxsize=1)
def _varlen_kernel() -> tuple[Any, frozenset[str]] | None:
    """PyTorch's ``varlen_attn`` and the names of its parameters (they changed between releases), or None."""
    import inspect

    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _kernel_runs(query: Any) -> bool:
    """Whether the varlen FlashAttention kernel runs on ``query``: a CUDA tensor in bf16 or fp16."""
    import torch

    return query.is_cuda and query.dtype in (torch.bfloat16, torch.float16)


def _torch_varlen(query: Any, scaling: float | None, dropout: float) -> tuple[Any, frozenset[str]] | None:
    """``varlen_attn`` and its parameter names when it can run this call (no dropout, a scale it can
    take: releases without the ``scale`` argument always use 1/sqrt(head_dim)); else None."""
    kernel = _varlen_kernel()
    if kernel is None or dropout or not _kernel_runs(query):
        return None
    if scaling is not None and "scale" not in kernel[1] and abs(scaling - query.shape[-1] ** -0.5) > 1e-9:
        return None
    return kernel


def _varlen_flash(fused: Any, module: Any, query: Any, key: Any, value: Any, scaling: float | None,
                  cu_seq_lens: Any, max_length: int) -> Any:
    """One variable-length FlashAttention call over the packed row: (1, T, heads, head_dim) out."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv

    varlen_attn, accepted = fused
    options: dict[str, Any] = {"window_size": (-1, 0)} if "window_size" in accepted else {"is_causal": True}
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1 and "enable_gqa" in accepted:
        options["enable_gqa"] = True
    elif groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if scaling is not None and "scale" in accepted:
        options["scale"] = scaling
    cu = cu_seq_lens.to(device=query.device, dtype=torch.int32)
    # (1, heads, T, head_dim) -> (T, heads, head_dim), the layout of the varlen kernels
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
    out = varlen_attn(q, k, v, cu, cu, int(max_length), int(max_length), **options)
    return out.unsqueeze(0)


def _varlen_mask(*args: Any, attention_mask: Any = None, **kwargs: Any) -> Any:
    """No mask without padding (a packed row's boundaries travel as ``cu_seq_lens_q``), else SDPA's."""
    from transformers.masking_utils import sdpa_mask

    return None if attention_mask is None else sdpa_mask(*args, **{**kwargs, "attention_mask": attention_mask})


def register() -> None:
    """Make :data:`VARLEN_SDPA` a valid ``attn_implementation`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
    AttentionMaskInterface.register(VARLEN_SDPA, _varlen_mask)


def packed_attention(device: str) -> str:
    """The attention implementation for packed rows: the ``flash_attn`` package's FlashAttention-2 on CUDA
    when it is installed, else ours (PyTorch's varlen FlashAttention on CUDA, per-sequence SDPA elsewhere)."""
    import importlib.util

    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    register()
    return VARLEN_SDPA


def answer_only_loss(model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> tuple[Any, Any]:
    """Mean next-token cross-entropy over labelled positions, computing logits only there.

    Equal to the model's own causal-LM loss (labels shifted by one, -100 ignored): summed and divided by
    ``num_items_in_batch`` when Trainer passes it (gradient accumulation), else the mean.

    Returns:
        (loss, model outputs whose ``logits`` are the kept positions, flattened).
    """
    import torch
    import torch.nn.functional as F

    labels = inputs["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    targets = labels[:, 1:][keep[:, :-1]]
    outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=keep)
    loss = F.cross_entropy(outputs.logits.float(), targets, reduction="sum")
    if num_items_in_batch is None:
        return loss / max(targets.numel(), 1), outputs
    return loss / num_items_in_batch, outputs
