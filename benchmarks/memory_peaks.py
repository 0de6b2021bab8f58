"""Where a training step's backward pass peaks: each autograd node's own peak, named after the module it belongs to.

Used by gpu_qlora.py ``--phases``; synchronises at every node, so never in timed steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

GIB = 2**30


@contextlib.contextmanager
def labelled_outputs(model: Any) -> Iterator[dict[Any, str]]:
    """Within: each module's output autograd node is named after the module (innermost first).

    The layers bitsandbytes wraps (``base_layer``) get no hook: a hook on them
    would send peftkit's fused layers down their plain path.
    """
    labels: dict[Any, str] = {}

    def hook(name: str) -> Any:
        def record(module: Any, args: Any, output: Any) -> None:
            node = getattr(output, "grad_fn", None)
            if node is not None:
                labels.setdefault(node, name)

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n and not n.endswith("base_layer")]
    try:
        yield labels
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def backward_peaks(loss: Any, labels: dict[Any, str], device: Any, top: int = 6) -> Iterator[dict[str, Any]]:
    """Within: a backward pass whose nodes each get their own peak; yields a dict filled on exit.

    ``peak_gib``: the peak of the whole pass; ``top``: lines for the ``top`` largest node peaks.

    Each autograd node's run (including the recomputation of a checkpointed
    block, which happens when its first node unpacks what it saved) is
    bracketed by a synchronised pre-hook and post-hook; the lines give the
    peak of the window, the memory allocated as it began, the node and the
    module whose output it is. The peak statistics are reset at each hook.
    """
    import torch

    windows: list[tuple[float, float, str]] = []
    overall = [0.0]

    def close_window() -> float:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / GIB
        overall[0] = max(overall[0], peak)
        torch.cuda.reset_peak_memory_stats(device)
        return peak

    handles, seen, stack = [], set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
        name = f"{node.name()} ({labels[node]})" if node in labels else node.name()
        began: dict[str, float] = {}

        def before(grad_outputs: Any, began: dict[str, float] = began) -> None:
            close_window()  # the gap since the last node: the engine summing and freeing gradients
            began["gib"] = torch.cuda.memory_allocated(device) / GIB

        def after(grad_inputs: Any, grad_outputs: Any, name: str = name, began: dict[str, float] = began) -> None:
            windows.append((close_window(), began.get("gib", 0.0), name))

        handles += [node.register_prehook(before), node.register_hook(after)]
    result: dict[str, Any] = {}
    try:
        yield result
    finally:
        for handle in handles:
            handle.remove()
        close_window()
        result["peak_gib"] = overall[0]
        result["top"] = [f"{peak:.2f} GiB peak (from {start:.2f}) in {name}" for peak, start, name in sorted(windows, reverse=True)[:top]]
