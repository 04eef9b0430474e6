"""Passes, one per file, and the named pipelines that order them."""
from __future__ import annotations

from . import (attach_mtp, fuse_elementwise, fuse_kv_store, fuse_projections, plan_cuda_graphs, plan_deep_ep,
               plan_memory, quantize_kv, quantize_weights, select_kernels, shard_ep, shard_tp, verify)
from .manager import NoOptions, Pass, PassContext, PassManager, PassRecord

PASSES: dict[str, Pass] = {p.name: p for p in [
    verify.PASS, attach_mtp.PASS, quantize_weights.PASS, quantize_kv.PASS, shard_tp.PASS, shard_ep.PASS,
    fuse_elementwise.PASS, fuse_projections.PASS, select_kernels.PASS, fuse_kv_store.PASS, plan_deep_ep.PASS,
    plan_cuda_graphs.PASS, plan_memory.PASS,
]}
PIPELINES: dict[str, list[str]] = {
    "default": ["verify", "attach_mtp", "quantize_weights", "quantize_kv", "shard_tp", "shard_ep", "fuse_elementwise",
                "fuse_projections", "select_kernels", "fuse_kv_store", "plan_deep_ep", "plan_cuda_graphs",
                "plan_memory"],
}

__all__ = ["PASSES", "PIPELINES", "NoOptions", "Pass", "PassContext", "PassManager", "PassRecord"]
