"""Neural-network building blocks: routers, experts, the MoE layer (DESIGN.md §2–3)."""

from moealign.nn.experts import SwiGLUExperts, grouped_mm_supported
from moealign.nn.moe import (
    MoELayer,
    RoutingInfo,
    SwiGLU,
    precompute_routers,
    update_expert_biases,
)
from moealign.nn.routers import (
    ROUTER_KINDS,
    HierarchicalRouter,
    MPIRouter,
    Router,
    RouterOutput,
    SoftmaxTopKRouter,
    SwitchRouter,
    build_router,
)

__all__ = [
    "ROUTER_KINDS",
    "HierarchicalRouter",
    "MPIRouter",
    "MoELayer",
    "Router",
    "RouterOutput",
    "RoutingInfo",
    "SoftmaxTopKRouter",
    "SwiGLU",
    "SwiGLUExperts",
    "SwitchRouter",
    "build_router",
    "grouped_mm_supported",
    "precompute_routers",
    "update_expert_biases",
]
