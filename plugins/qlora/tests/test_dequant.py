"""The 4-bit dequantization kernel (CUDA, or Triton's CPU interpreter with TRITON_INTERPRET=1) against bitsandbytes.

(Under the interpreter, test_fast_path's float32 case compares against bitsandbytes 0.50's CPU
``dequantize_4bit``, which is wrong for rows shorter than a 64-value block, as in its tiny models;
the kernel is checked against the unquantized weight below.)
"""

from __future__ import annotations

import os

import pytest
import torch

from peftkit_qlora import dequant
from peftkit_qlora.quantize import bnb

triton_runs = dequant._triton_kernel() is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
pytestmark = pytest.mark.skipif(not triton_runs, reason="needs Triton with CUDA, or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def packed_weight(shape: tuple[int, int], quant_type: str, nested: bool) -> torch.nn.Parameter:
    torch.manual_seed(0)
    dense = torch.randn(shape, dtype=torch.bfloat16)
    params = bnb().nn.Params4bit(dense, requires_grad=False, quant_type=quant_type, compress_statistics=nested)
    return params.to(DEVICE) if DEVICE == "cuda" else params._quantize(DEVICE)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slices_rebuild_what_bitsandbytes_dequantizes(quant_type: str, nested: bool, dtype: torch.dtype) -> None:
    weight = packed_weight((70, 192), quant_type, nested)  # 70 rows: slices that end inside a scale block
    expected = bnb().functional.dequantize_4bit(weight.data, weight.quant_state)  # in the weight's own dtype, bf16
    slices = list(dequant.dense_row_slices(weight.data, weight.quant_state, dtype, max_bytes=20 * 192 * torch.finfo(dtype).bits // 8))
    assert [(rows.start, rows.stop) for rows, _ in slices] == [(0, 18), (18, 36), (36, 54), (54, 70)]
    rebuilt = torch.cat([dense for _, dense in slices])
    assert rebuilt.dtype == dtype
    # code * scale in float32, as bitsandbytes, then one rounding: within a bf16 ulp (Triton's interpreter
    # truncates to bf16 where a GPU rounds)
    torch.testing.assert_close(rebuilt.to(expected.dtype), expected, rtol=8e-3, atol=0)
    if dtype == torch.float32:  # rounded by torch: the same values, but where a fused multiply-add moved a scale
        assert (rebuilt.to(expected.dtype) == expected).float().mean() > 0.99


def test_rows_shorter_than_a_block_dequantize_to_the_weight() -> None:
    torch.manual_seed(0)
    dense = torch.randn(16, 16)
    weight = bnb().nn.Params4bit(dense, requires_grad=False, quant_type="nf4", compress_statistics=True)
    weight = weight.to(DEVICE) if DEVICE == "cuda" else weight._quantize(DEVICE)
    ((rows, rebuilt),) = dequant.dense_row_slices(weight.data, weight.quant_state, torch.float32)
    assert rows == slice(0, 16)
    assert torch.linalg.norm(rebuilt.cpu() - dense) / torch.linalg.norm(dense) < 0.1  # NF4's error, about 9%


def test_a_weight_within_the_cap_is_one_slice() -> None:
    weight = packed_weight((64, 128), "nf4", True)
    assert [rows for rows, _ in dequant.dense_row_slices(weight.data, weight.quant_state, torch.bfloat16)] == [slice(0, 64)]
