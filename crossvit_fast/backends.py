"""The backend table: (op, backend) -> implementation, and why a backend is (un)available.

Every op the model runs is looked up here, never chosen by `if` chains in the model. A backend is
a module under `crossvit_fast.ops` that exposes

* ``availability(device_type: str) -> tuple[bool, str]`` — can it run on tensors of this device
  type ("cuda" or "cpu"), and a one-line reason either way;
* ``ops() -> dict[str, Callable]`` — its implementations, keyed by the op names in `OPS`, with the
  signatures of `crossvit_fast.ops.reference` (minus the dropout arguments). Imported lazily, so
  `import crossvit_fast` never imports Triton or loads a compiled extension;
* optionally ``DROPOUT_OPS: frozenset[str]`` — the ops whose implementation also takes the
  dropout arguments (`attn_drop`, `proj_drop`, `mlp_drop`: a declared capability). A training
  step with active dropout runs `OpSet.with_dropout(op)`: the first backend in the resolution
  order that declares it (today only the reference does), recorded in `dropout_sources`.

An op a backend does not (yet) implement falls back to the reference; `OpSet.sources` records
which backend serves each op, so what ran is never a guess (`CrossViT.extra_repr`, `info`).
Adding a kernel = adding an entry to that backend's `ops()`; the model does not change.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

# The ops of the table, in the order the model uses them. Signatures: crossvit_fast.ops.reference.
OPS = (
    "patch_embed",  # plain conv stem + CLS + pos embed -> token tensor
    "token_assemble",  # dagger stem output -> flatten + CLS + pos embed
    "self_attention",  # ViT block: x + proj(MHSA(LN1(x)))
    "mlp",  # ViT block: x + fc2(GELU(fc1(LN2(x))))
    "block",  # a whole ViT block (self_attention, then mlp) as one op
    "blocks",  # a branch's blocks of one stage, in order, as one op
    "cls_proj",  # projs / revert_projs: Linear(GELU(LN(cls)))
    "cross_attention",  # CrossAttentionBlock on the CLS query (K/V-free in fast backends)
    "cross_fusion",  # projs -> cross_attention -> revert_projs, one whole fusion step
    "fusion_stage",  # every fusion step of a stage + the token re-assembly, one autograd node
    "layer_norm",  # final norms
    "cast_params",  # autocast's casts of the GEMM weights / biases, once per forward
    # timm's sub-layers alone (input already normalised, no residual): what a sub-layer module
    # computes when called by itself or when hooks on it make its block run unfused
    "attention_layer",  # Attention: proj(MHSA(x))
    "mlp_layer",  # Mlp: fc2(GELU(fc1(x)))
    "cross_attention_layer",  # CrossAttention: proj(attn(q = x[:, :1], k = v = x))
)

# -- parameter groups: what the ops with several weights take ------------------------------------
# Immutable tuples of tensors, one per sub-layer (NamedTuple: torch.compile and pytrees take them
# as they are, and `*group` passes them on to a registered op in its argument order).


class AttentionLayerParams(NamedTuple):
    """Attention (timm's `attn`): qkv (3C, C) + bias (3C,) or None, proj (C, C) + bias."""

    qkv_weight: Tensor
    qkv_bias: Tensor | None
    proj_weight: Tensor
    proj_bias: Tensor | None


class MlpLayerParams(NamedTuple):
    """Mlp (timm's `mlp`): fc1 (Hd, C) + bias (Hd,) or None, fc2 (C, Hd) + bias."""

    fc1_weight: Tensor
    fc1_bias: Tensor | None
    fc2_weight: Tensor
    fc2_bias: Tensor | None


class CrossAttentionLayerParams(NamedTuple):
    """CrossAttention (timm's fusion `attn`): wq, wk, wv, proj (C, C) with biases (C,) or None."""

    wq: Tensor
    bq: Tensor | None
    wk: Tensor
    bk: Tensor | None
    wv: Tensor
    bv: Tensor | None
    proj_weight: Tensor
    proj_bias: Tensor | None


def _normed(name: str, layer: type, doc: str) -> type:
    """The group of a fused op: the LayerNorm affine before the sub-layer (norm_weight, norm_bias:
    (C,) or None), then the sub-layer's own group's fields."""
    fields = [("norm_weight", Tensor | None), ("norm_bias", Tensor | None)]
    cls = NamedTuple(name, fields + list(layer.__annotations__.items()))
    cls.__doc__ = doc
    return cls


SelfAttentionParams = _normed(
    "SelfAttentionParams", AttentionLayerParams, "self_attention: Block.norm1, then attn's group."
)
MlpParams = _normed("MlpParams", MlpLayerParams, "mlp: Block.norm2, then mlp's group.")
CrossAttentionParams = _normed(
    "CrossAttentionParams",
    CrossAttentionLayerParams,
    "cross_attention: fusion[i].norm1, then its attn's group.",
)


class BlockParams(NamedTuple):
    """A whole ViT block (`block`): its attention half's group, then its MLP half's."""

    attn: SelfAttentionParams
    mlp: MlpParams


def block_params(flat) -> BlockParams:
    """BlockParams from a block's 12 parameters listed flat (6 + 6, in the groups' field order)."""
    flat = tuple(flat)
    if len(flat) != 12:
        raise ValueError(f"expected 12 block parameters (6 + 6), got {len(flat)}")
    return BlockParams(SelfAttentionParams(*flat[:6]), MlpParams(*flat[6:]))


class ClsProjParams(NamedTuple):
    """projs[i] / revert_projs[i]: LayerNorm affine (C_in,) or None, Linear (C_out, C_in) + bias."""

    norm_weight: Tensor | None
    norm_bias: Tensor | None
    weight: Tensor
    bias: Tensor | None


class FusionParams(NamedTuple):
    """One fusion step of branch i: projs[i] (C_i -> C_j), fusion[i] (width C_j), revert_projs[i]
    (C_j -> C_i)."""

    proj: ClsProjParams
    attn: CrossAttentionParams
    revert: ClsProjParams


def as_params(kind: type, params) -> tuple:
    """`params` as the parameter group `kind` (one of the NamedTuples above); a plain tuple or
    list of the same fields, in order, is accepted. ValueError naming the fields otherwise."""
    if isinstance(params, kind):
        return params
    if not isinstance(params, (tuple, list)) or len(params) != len(kind._fields):
        got = f"{len(params)} items" if isinstance(params, (tuple, list)) else type(params).__name__
        raise ValueError(f"params: expected {kind.__name__}{kind._fields}, got {got}")
    return kind(*params)


def fusion_params(flat) -> FusionParams:
    """FusionParams from the 18 parameters of one fusion step listed flat, in the order
    proj, attn, revert (4 + 10 + 4): how tests and benchmarks build them."""
    flat = tuple(flat)
    if len(flat) != 18:
        raise ValueError(f"expected 18 fusion parameters (4 + 10 + 4), got {len(flat)}")
    return FusionParams(
        ClsProjParams(*flat[:4]), CrossAttentionParams(*flat[4:14]), ClsProjParams(*flat[14:])
    )


# The ops that take parameter groups: (leading tensors, flat parameters, how they are grouped).
_GROUPED = {
    "mlp": (1, 6, MlpParams._make),
    "self_attention": (1, 6, SelfAttentionParams._make),
    "block": (1, 12, block_params),
    "cls_proj": (1, 4, ClsProjParams._make),
    "cross_attention": (2, 10, CrossAttentionParams._make),
    "cross_fusion": (2, 18, fusion_params),
    "attention_layer": (1, 4, AttentionLayerParams._make),
    "mlp_layer": (1, 4, MlpLayerParams._make),
    "cross_attention_layer": (1, 8, CrossAttentionLayerParams._make),
}


def flat_args(op: str, fn: Callable) -> Callable:
    """`fn`, an implementation of the table op `op`, taking its parameters listed flat after the
    leading tensors, in the groups' field order: how tests and benchmarks build (and
    differentiate) them, e.g. `flat_args("mlp", ops.mlp)(x, nw, nb, w1, b1, w2, b2, eps)`. An
    op without parameter groups: `fn` itself."""
    if op not in _GROUPED:
        return fn
    lead, n, group = _GROUPED[op]
    return lambda *a, **kw: fn(*a[:lead], group(a[lead : lead + n]), *a[lead + n :], **kw)


_BACKEND_MODULES = {
    "reference": "crossvit_fast.ops.reference",
    "triton": "crossvit_fast.ops.triton",
    "cuda": "crossvit_fast.ops.cuda",
}
BACKENDS = tuple(_BACKEND_MODULES)

# `backend="auto"`: for each op, the first available backend (in this order) that implements it.
# The order is the cost ranking: the cost ledger (`python -m crossvit_fast cost`, H100 model)
# estimates every Triton op at or below the reference's cost for the same work (a CrossViT-18
# training step: 0.54x the time, 0.42x the launches, 0.53x the DRAM bytes); the `cuda` backend's
# kernels are correctness-first and have no cost model, so they serve only ops Triton lacks;
# the reference serves the rest. `benchmarks/gpu_session.sh` measures the same per op on a GPU
# (bench_<op>.py, each backend side by side) and is what should reorder this table.
# On CPU only the reference runs (the Triton interpreter is a test tool, not a fast path).
AUTO_ORDER = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("reference",),
}


def _backend_module(name: str):
    return importlib.import_module(_BACKEND_MODULES[name])


def check_name(name: str, allow_auto: bool = True) -> None:
    """ValueError unless `name` is a backend name (or "auto", when allowed)."""
    valid = (*BACKENDS, "auto") if allow_auto else BACKENDS
    if name not in valid:
        raise ValueError(f"backend must be one of {valid}, got {name!r}")


def backend_availability(name: str, device_type: str) -> tuple[bool, str]:
    """(available, reason) for running backend `name` on tensors of `device_type`."""
    check_name(name, allow_auto=False)
    try:
        mod = _backend_module(name)
    except ImportError as exc:  # a backend package missing entirely
        return False, f"cannot import {_BACKEND_MODULES[name]}: {exc}"
    return mod.availability(device_type)


def available_backends() -> dict[str, tuple[bool, str]]:
    """name -> (available, reason) on this machine, for its best device (the GPU if there is one).

    >>> available_backends()["reference"]
    (True, 'pure PyTorch, runs on every device')
    """
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    out = {}
    for name in BACKENDS:
        ok, why = backend_availability(name, device_type)
        if not ok and device_type == "cuda":  # e.g. interpreter-only setups still run on CPU
            ok_cpu, why_cpu = backend_availability(name, "cpu")
            if ok_cpu:
                ok, why = ok_cpu, why_cpu
        out[name] = (ok, why)
    return out


@dataclass(frozen=True)
class OpSet:
    """The implementations one forward pass uses, resolved for one (backend, device type).

    Attribute per op in `OPS`; `sources[op]` names the backend that serves it. Ops that declare
    dropout support (`DROPOUT_OPS`) also have `with_dropout(op)`, served by `dropout_sources[op]`.
    """

    backend: str
    device_type: str
    impls: dict[str, Callable] = field(repr=False)
    sources: dict[str, str]
    dropout_impls: dict[str, Callable] = field(default_factory=dict, repr=False)
    dropout_sources: dict[str, str] = field(default_factory=dict)
    casted: dict = field(default_factory=dict, repr=False)

    def __getattr__(self, op: str) -> Callable:
        # Only reached for names that are not fields; read `impls` from __dict__ so that an
        # instance being built (copy, replace, Dynamo) raises AttributeError, not recursion.
        impls = self.__dict__.get("impls")
        if impls is None or op not in impls:
            raise AttributeError(op)
        return impls[op]

    def param(self, t: Tensor | None) -> Tensor | None:
        """A GEMM parameter as the ops get it: its cast copy in a `bind`-made OpSet, else t."""
        return self.casted.get(t, t) if self.casted and t is not None else t

    def bind(self, casted: dict[Tensor, Tensor]) -> OpSet:
        """This OpSet for one forward whose GEMM parameters were cast once (`cast_params`):
        parameter -> its copy in the autocast dtype. Made per forward and passed down the call,
        never stored (the model's cached OpSets have none)."""
        return dataclasses.replace(self, casted=casted)

    def with_dropout(self, op: str) -> Callable:
        """The implementation of `op` that takes its dropout arguments."""
        try:
            return self.dropout_impls[op]
        except KeyError:
            raise NotImplementedError(
                f"no backend of this OpSet ({self.backend!r} on {self.device_type}) declares "
                f"dropout support for {op!r}"
            ) from None


def resolve(backend: str, device_type: str) -> OpSet:
    """Build the OpSet for `backend` ("auto" or a name in BACKENDS) on `device_type`.

    Raises RuntimeError naming the reason when an explicit backend can't run on that device.
    """
    check_name(backend)
    order = AUTO_ORDER.get(device_type, ("reference",)) if backend == "auto" else (backend,)
    reference = _backend_module("reference")
    reference_ops = reference.ops()
    impls, sources, drop_impls, drop_sources = {}, {}, {}, {}
    for name in order:
        ok, why = backend_availability(name, device_type)
        if not ok:
            if backend != "auto":
                raise RuntimeError(
                    f"backend {name!r} cannot run on {device_type} tensors: {why}. "
                    f"Available here: {_available_names(device_type)}"
                )
            continue
        mod = _backend_module(name)
        dropout_ops = getattr(mod, "DROPOUT_OPS", frozenset())
        for op, fn in mod.ops().items():
            if op not in OPS:
                raise KeyError(f"backend {name!r} registers unknown op {op!r}; known: {OPS}")
            impls.setdefault(op, fn)
            sources.setdefault(op, name)
            if op in dropout_ops:
                drop_impls.setdefault(op, fn)
                drop_sources.setdefault(op, name)
    for op in OPS:  # ops a backend lacks fall back to the reference
        impls.setdefault(op, reference_ops[op])
        sources.setdefault(op, "reference")
        if op in reference.DROPOUT_OPS:
            drop_impls.setdefault(op, reference_ops[op])
            drop_sources.setdefault(op, "reference")
    drop = [op for op in OPS if op in drop_impls]
    return OpSet(
        backend,
        device_type,
        {op: impls[op] for op in OPS},
        {op: sources[op] for op in OPS},
        {op: drop_impls[op] for op in drop},
        {op: drop_sources[op] for op in drop},
    )


class OpSets:
    """The OpSets of one model, one per device type, resolved on first use and cached.

    One instance is shared by reference by the model and every submodule that runs ops, so a
    submodule called on its own (`model.blocks[0].blocks[0][0](x)`), a forward hook or a feature
    tap runs the model's backend. Not a module: it holds no state_dict entries.
    """

    def __init__(self, backend: str = "auto"):
        check_name(backend)
        self.backend = backend
        self.cache: dict[str, OpSet] = {}

    def reset(self, backend: str) -> None:
        check_name(backend)
        self.backend = backend
        self.cache.clear()

    def get(self, device_type: str) -> OpSet:
        ops = self.cache.get(device_type)
        if ops is None:
            ops = self.cache[device_type] = resolve(self.backend, device_type)
        return ops


def _available_names(device_type: str) -> list[str]:
    return [n for n in BACKENDS if backend_availability(n, device_type)[0]]
