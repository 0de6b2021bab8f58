"""Getting a quantized model ready to train adapters, without upcasting its large weights."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from peftkit import PeftkitError
from peftkit_qlora import blocks
from peftkit_qlora.loss import use_sliced_loss


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
    offload_checkpoints: bool = False,
    memory_efficient_loss: bool = True,
    compile_blocks: bool = False,
) -> nn.Module:
    """Freeze the base, keep fp16 norms in float32, turn on gradient checkpointing; returns ``model``.

    Unlike Hugging Face PEFT's function of the same name, no large weight
    changes dtype: PEFT casts every non-quantized fp16/bf16 parameter
    (embeddings, output head) to float32, 2 more bytes per value (0.24 GiB
    each for a 32000 x 4096 embedding and head) and, through float32 norm
    weights, a float32 residual stream and float32 checkpointed activations.
    Here only the weights of fp16 normalisation layers (a few thousand values)
    move to float32 (fp16's range is what makes norms overflow; bf16 has
    float32's range), and their output is cast back to the input's dtype so
    activations keep theirs.

    Gradient checkpointing defaults to ``use_reentrant=False``, which needs
    no input gradients; with ``use_reentrant=True`` the input embeddings'
    output is made to require grad, as PEFT does. ``offload_checkpoints=True``
    keeps each checkpointed block's input in pinned host memory between its
    forward and backward (:class:`peftkit_qlora.blocks.HostOffloadedCheckpoint`):
    ``layers x tokens x hidden`` values less on the GPU, for an asynchronous
    copy each way per block and step.

    ``compile_blocks=True`` compiles each block's parts with ``torch.compile``
    (:func:`peftkit_qlora.blocks.compile_blocks`): a step at a small batch is
    bound by the host's kernel launches, which compiled code cuts; the first
    step takes the compilation (about a minute for a 7B model).

    ``memory_efficient_loss`` gives a transformers causal LM the same loss
    computed without float32 logits (:func:`peftkit_qlora.loss.causal_lm_loss`),
    whose float32 copies are otherwise among the largest tensors of a step.
    """
    if any(getattr(m, "is_peftkit_wrapper", False) for m in model.modules()):
        raise PeftkitError("prepare_model_for_kbit_training freezes every weight: call it before get_peft_model")
    # every argument checked before the model changes, so that an error leaves it as it was
    if use_gradient_checkpointing:
        options = _checkpointing_options(model, gradient_checkpointing_kwargs, offload_checkpoints)
    elif offload_checkpoints or compile_blocks:
        raise PeftkitError("offload_checkpoints and compile_blocks work on checkpointed blocks: keep use_gradient_checkpointing=True")
    if compile_blocks:
        blocks.require_blocks(model)
    for param in model.parameters():
        param.requires_grad_(False)
    for norm in _norm_layers(model):
        if any(p.dtype == torch.float16 for p in norm.parameters(recurse=False)):
            norm.to(torch.float32)
            norm.register_forward_hook(_output_in_input_dtype)
    if use_gradient_checkpointing:
        enable_gradient_checkpointing(model, options, offload_checkpoints)
    if memory_efficient_loss:
        use_sliced_loss(model)
    if compile_blocks:
        blocks.compile_blocks(model)
    return model


def enable_gradient_checkpointing(
    model: nn.Module, kwargs: dict[str, Any] | None = None, offload: bool = False
) -> None:
    """transformers' gradient checkpointing, non-reentrant unless ``kwargs`` say otherwise; caching off.

    ``offload=True`` keeps each block's input in pinned host memory between its
    forward and backward (needs a GPU and non-reentrant checkpointing).
    """
    options = _checkpointing_options(model, kwargs, offload)
    if callable(getattr(model, "activation_checkpointing_enable", None)):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    if offload:
        for block in blocks.checkpointed_blocks(model):
            block._gradient_checkpointing_func = blocks.HostOffloadedCheckpoint(block._gradient_checkpointing_func)
    if options["use_reentrant"]:
        model.enable_input_require_grads()
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", None):
        config.use_cache = False  # a cache is useless in training and conflicts with checkpointing


def _checkpointing_options(model: nn.Module, kwargs: dict[str, Any] | None, offload: bool) -> dict[str, Any]:
    """The checkpointing arguments (non-reentrant by default), or a clear error for what cannot work."""
    options = {"use_reentrant": False, **(kwargs or {})}
    if offload and not _has_accelerator():
        raise PeftkitError(
            "offload_checkpoints=True moves activations from a GPU to pinned host memory; there is no GPU here"
        )
    if offload and options["use_reentrant"]:
        raise PeftkitError("offload_checkpoints=True needs non-reentrant checkpointing: drop use_reentrant=True")
    if not any(callable(getattr(model, m, None)) for m in ("activation_checkpointing_enable", "gradient_checkpointing_enable")):
        raise PeftkitError(
            f"{type(model).__name__} has no gradient checkpointing; pass use_gradient_checkpointing=False "
            f"(and offload_checkpoints=False) and checkpoint its blocks yourself"
        )
    return options


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def _norm_layers(model: nn.Module) -> Iterator[nn.Module]:
    torch_norms = (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", nn.LayerNorm))
    for module in model.modules():
        if isinstance(module, torch_norms) or type(module).__name__.endswith(("Norm", "LayerNorm", "RMSNorm")):
            yield module


def _output_in_input_dtype(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
        return output.to(args[0].dtype)
    return output
