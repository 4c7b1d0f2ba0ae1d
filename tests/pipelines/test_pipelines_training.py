"""STA under diffusers' own training conventions: ``enable_gradient_checkpointing()`` and
``compile_repeated_blocks()`` on a transformer carrying ``enable_sta``.

Tiny Wan / HunyuanVideo transformers on the CPU (fp32, reference STA backend), compared with
diffusers' dense processors at windows covering the whole tile grid and with STA itself
without the feature at sparse windows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.utils.checkpoint
from pipeline_testing import FULL_WINDOW, TILE, tiny_transformer, transformer_inputs
from torch import nn

from stafinetune import disable_sta, enable_sta
from stafinetune.models.binding import CARRIES_STATE, binding_of
from stafinetune.models.families import get_family

SPARSE = [3, 1, 3]
TIGHT = {"atol": 1e-6, "rtol": 1e-5}


def _gradients(transformer: nn.Module, family: str) -> dict[str, torch.Tensor]:
    """Every parameter's gradient of one training step (loss: the output's mean square)."""
    transformer.train()
    out = transformer(**transformer_inputs(family))[0]  # (1, 16, 5, 16, 16)
    out.square().mean().backward()
    return {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}


def _assert_same_gradients(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys() and len(want) > 20
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TIGHT, msg=name)


def _reentrant(block: Callable[..., Any], *args: Any) -> Any:
    """A user's own checkpoint function: torch's reentrant variant."""
    return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=True)


def _train(
    family: str, window: list[int] | None, checkpointing: str | None
) -> dict[str, torch.Tensor]:
    """Gradients of the tiny transformer with STA at ``window`` (None: diffusers' processors)
    and ``checkpointing``: None, ``after`` / ``before`` ``enable_sta``, or ``reentrant`` (a
    custom checkpoint function, given after ``enable_sta``)."""
    transformer = tiny_transformer(family)
    if checkpointing == "before":
        transformer.enable_gradient_checkpointing()
    if window is not None:
        enable_sta(transformer, tile=TILE, window=window)
    if checkpointing == "after":
        transformer.enable_gradient_checkpointing()
    if checkpointing == "reentrant":
        transformer.enable_gradient_checkpointing(gradient_checkpointing_func=_reentrant)
    installed = transformer._gradient_checkpointing_func
    grads = _gradients(transformer, family)
    assert transformer._gradient_checkpointing_func is installed  # untouched outside a forward
    if window is not None:
        assert binding_of(transformer).runtime.state is None
    return grads


@pytest.mark.parametrize("family", ["wan", "hunyuan"])
@pytest.mark.parametrize("checkpointing", ["after", "before", "reentrant"])
def test_diffusers_gradient_checkpointing_with_sta(family: str, checkpointing: str) -> None:
    """Full windows: the dense model's gradients; sparse windows: those without checkpointing."""
    dense = _train(family, None, "after")
    _assert_same_gradients(_train(family, FULL_WINDOW, checkpointing), dense)
    sparse = _train(family, SPARSE, None)
    _assert_same_gradients(_train(family, SPARSE, checkpointing), sparse)
    assert max((sparse[n] - dense[n]).abs().max() for n in dense) > 1e-4  # the windows matter


def test_checkpointing_survives_disable_sta() -> None:
    """``disable_sta`` leaves diffusers' checkpoint function in place and dense again."""
    transformer = tiny_transformer("wan")
    enable_sta(transformer, tile=TILE, window=SPARSE)
    transformer.enable_gradient_checkpointing()
    _gradients(transformer, "wan")
    disable_sta(transformer)
    assert not getattr(transformer._gradient_checkpointing_func, CARRIES_STATE, False)
    transformer.zero_grad(set_to_none=True)
    _assert_same_gradients(_gradients(transformer, "wan"), _train("wan", None, "after"))


def _compiled_graphs(transformer: nn.Module, family: str) -> tuple[torch.Tensor, int]:
    """The output of ``transformer`` after ``compile_repeated_blocks(fullgraph=True)`` (dynamo
    only, ``backend="eager"``) and the number of graphs dynamo compiled for it."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    transformer.compile_repeated_blocks(fullgraph=True, backend="eager")
    with torch.no_grad():
        out = transformer(**transformer_inputs(family))[0]
    assert not counters["graph_break"]
    return out, counters["stats"]["unique_graphs"]


@pytest.mark.parametrize(
    ("family", "blocks"),
    [("wan", {"num_layers": 9}), ("hunyuan", {"num_layers": 2, "num_single_layers": 2})],
)
def test_compiled_repeated_blocks_share_one_graph(family: str, blocks: dict[str, int]) -> None:
    """STA compiles as many graphs as dense (one for Wan's blocks, more than dynamo's default
    recompile limit of 8), and every compiled block still uses its own layer's windows."""
    _, dense_graphs = _compiled_graphs(tiny_transformer(family, **blocks), family)
    transformer = tiny_transformer(family, **blocks)
    layers = len(get_family(family).sta_layers(transformer))
    windows = [[5, 4, 4], [3, 1, 3], [1, 1, 1], [5, 2, 2]]
    enable_sta(transformer, tile=TILE, window=[windows[i % 4] for i in range(layers)])
    with torch.no_grad():
        eager = transformer(**transformer_inputs(family))[0]
    compiled, graphs = _compiled_graphs(transformer, family)
    assert graphs == dense_graphs
    if family == "wan":
        assert graphs == 1
    torch.testing.assert_close(compiled, eager, **TIGHT)


def test_compiled_blocks_train_with_checkpointing() -> None:
    """``compile_repeated_blocks`` plus ``enable_gradient_checkpointing``: the eager gradients."""
    eager = _train("wan", SPARSE, "after")
    transformer = tiny_transformer("wan")
    enable_sta(transformer, tile=TILE, window=SPARSE)
    transformer.enable_gradient_checkpointing()
    transformer.compile_repeated_blocks(fullgraph=True, backend="eager")
    _assert_same_gradients(_gradients(transformer, "wan"), eager)
