"""Fused kernels for paperzoo's models: attention, scans, linear attention.

    from pallas_kernels import (block_sparse_attention,
                                chunked_linear_attention, decode_attention,
                                flash_attention, selective_scan)

See README.md in this package for the design, the lowering per backend and
what has been verified where.
"""
from __future__ import annotations

from pallas_kernels.block_sparse_attention import block_sparse_attention
from pallas_kernels.chunked_linear_attention import chunked_linear_attention
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.selective_scan import selective_scan

__all__ = ["flash_attention", "block_sparse_attention", "selective_scan",
           "chunked_linear_attention", "decode_attention"]
