"""A decode-only forward of the loaded model with fewer, larger ops: our module, reading the model's own weights.

The static step feeds one token per row. transformers' layer forward spends most of that step's ops on small
pieces: three projections where one would do (q, k, v), two for the MLP (gate, up), rotary applied to q and k
separately through slices and a concatenation, RMSNorm as five elementwise ops. FusedDecoder computes the same
function for llama, mistral, qwen2 and qwen3 decoders with
- one QKV and one gate/up projection per layer (merge_projections re-lays the weights so that the model's own
  q/k/v and gate/up Linear modules hold views of one tensor: no second copy, the model computes what it did);
- rotary on q and k together (they are adjacent rows of the QKV output) with a sign-folded sine, no cat;
- each layer as two pure regions, attention_inputs (norm, QKV, rotary) and layer_output (output projection,
  residual add + RMSNorm, gate/up, SiLU·mul, down, residual add + the next RMSNorm), the same code for every layer:
  compiled (compiled_step.py), each region becomes a few fused kernels around its GEMMs, compiled once for all
  layers instead of once per layer.
Between the regions it writes keys and values through the cache's own `update` and attends through the attention
function the model is set to (the static path's, registered with transformers' AttentionInterface), so eviction
policies observe attention as they do on the model's forward; nothing of transformers' code is replaced.
`tests/test_compiled_step.py` checks it equals the model's forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from dynts.errors import DynTSError
from dynts.fast.packed_linear import PackedWeight, project

FUSED_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def merged_weight(linears: list[nn.Linear], attr: str) -> torch.Tensor | None:
    """One tensor holding the linears' `attr` (weight or bias) stacked along the output dimension; the linears are
    rebound to views of it (values unchanged). Already merged: the existing tensor."""
    tensors = [getattr(lin, attr) for lin in linears]
    if any(t is None for t in tensors):
        if not all(t is None for t in tensors):
            raise DynTSError(f"cannot merge projections where only some have a {attr}")
        return None
    base = tensors[0]
    offset = 0
    contiguous = True
    for t in tensors:
        same = t.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
        if not same or t.storage_offset() != base.storage_offset() + offset or not t.is_contiguous():
            contiguous = False
            break
        offset += t.numel()
    if contiguous and base.storage_offset() == 0:
        rows = sum(t.shape[0] for t in tensors)
        return base.as_strided((rows, *base.shape[1:]), base.stride())
    merged = torch.cat([t.detach() for t in tensors], dim=0)
    start = 0
    for lin, t in zip(linears, tensors):
        view = merged[start : start + t.shape[0]]
        setattr(lin, attr, nn.Parameter(view, requires_grad=False))
        start += t.shape[0]
    return merged


class FusedLayer(nn.Module):
    """One decoder layer's decode step (see the module docstring)."""

    def __init__(self, layer, config):
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        self.attn = attn  # the model's attention module: the attention function and observers read it
        self.layer_idx = attn.layer_idx
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.qkv_weight = merged_weight([attn.q_proj, attn.k_proj, attn.v_proj], "weight")
        self.qkv_bias = merged_weight([attn.q_proj, attn.k_proj, attn.v_proj], "bias")
        self.o_proj = attn.o_proj
        self.gate_up_weight = merged_weight([mlp.gate_proj, mlp.up_proj], "weight")
        self.gate_up_bias = merged_weight([mlp.gate_proj, mlp.up_proj], "bias")
        self.intermediate = mlp.gate_proj.weight.shape[0]
        self.down_proj = mlp.down_proj
        self.input_norm = layer.input_layernorm
        self.post_norm = layer.post_attention_layernorm
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        self.qk_norm = None
        if q_norm is not None:  # qwen3: RMSNorm over each head's dims, its own weights for q and k heads
            q_weight = q_norm.weight.detach()[None].expand(self.heads, -1)
            weight = torch.cat([q_weight, k_norm.weight.detach()[None].expand(self.kv_heads, -1)])
            self.qk_norm = (weight, q_norm.variance_epsilon)
        # What the projections multiply by: the plain weights, or their packed copies (FusedDecoder.pack)
        # (plain tensors sharing the parameters' storage, so that a packed copy can take their place)
        self.qkv_w, self.o_w = self.qkv_weight, self.o_proj.weight.detach()
        self.gate_up_w, self.down_w = self.gate_up_weight, self.down_proj.weight.detach()

    def pack(self, rows: int) -> int:
        """Multiply by packed copies of the four weights from now on (packed_linear.py); returns their bytes."""
        self.qkv_w, self.o_w, self.gate_up_w, self.down_w = (
            w if isinstance(w, PackedWeight) else PackedWeight(w, rows)
            for w in (self.qkv_w, self.o_w, self.gate_up_w, self.down_w)
        )
        return sum(w.nbytes for w in (self.qkv_w, self.o_w, self.gate_up_w, self.down_w))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: computed in fp32, scaled by the weight after the cast back."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def attention_inputs(h, qkv_weight, qkv_bias, qk_norm_weight, cos, sin, heads: int, kv_heads: int, eps: float):
    """Region 1 of a layer (pure: same code for every layer): the normed input h [n, 1, hidden] -> query
    [n, H, 1, d], key and value [n, kvh, 1, d], with one QKV projection and rotary on q and k together."""
    n, d = h.shape[0], cos.shape[-1]
    qkv = project(h, qkv_weight, qkv_bias).view(n, 1, heads + 2 * kv_heads, d)
    qk, v = qkv[:, :, : heads + kv_heads], qkv[:, :, heads + kv_heads :]
    if qk_norm_weight is not None:  # qwen3: RMSNorm over each head's dims
        qk = qk_norm_weight * F.rms_norm(qk.float(), (d,), None, eps).to(qk.dtype)
    swapped = qk.unflatten(-1, (2, d // 2)).flip(-2).flatten(-2)
    qk = qk * cos + swapped * sin
    return qk[:, :, :heads].transpose(1, 2), qk[:, :, heads:].transpose(1, 2), v.transpose(1, 2)


def layer_output(
    x,
    attn,
    o_weight,
    o_bias,
    post_weight,
    gate_up_weight,
    gate_up_bias,
    down_weight,
    down_bias,
    next_weight,
    eps: float,
    next_eps: float,
):
    """Region 2 of a layer (pure): residual + output projection, RMSNorm, one gate/up projection, SiLU·mul, down
    projection, residual, and the next RMSNorm (the next layer's input norm, or the final one) -> (x, normed x)."""
    x = x + project(attn, o_weight, o_bias)
    h = rms_norm(x, post_weight, eps)
    gate, up = project(h, gate_up_weight, gate_up_bias).chunk(2, dim=-1)
    x = x + project(F.silu(gate) * up, down_weight, down_bias)
    return x, rms_norm(x, next_weight, next_eps)


class FusedDecoder(nn.Module):
    """decode(tokens [n], positions [n], cache, mask, **attention kwargs) -> last hidden state [n, 1, hidden]."""

    def __init__(self, model):
        super().__init__()
        config = model.config
        if config.model_type not in FUSED_TYPES:
            raise DynTSError(f"no fused decoder for {config.model_type!r} models (have: {', '.join(FUSED_TYPES)})")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise DynTSError(f"the fused decoder needs SiLU MLPs, the model uses {config.hidden_act!r}")
        decoder = model.get_decoder()
        self.config = config
        self.embed = decoder.embed_tokens
        self.rotary = decoder.rotary_emb
        self.norm = decoder.norm
        self.layers = nn.ModuleList([FusedLayer(layer, config) for layer in decoder.layers[: config.num_hidden_layers]])
        self.regions = (attention_inputs, layer_output)  # or their compiled forms (set_regions)

    def pack(self, rows: int) -> int:
        """Every layer's projections multiply by packed copies of their weights (the eager step on a CPU); returns
        the bytes the copies hold."""
        return sum(layer.pack(rows) for layer in self.layers)

    def set_regions(self, pre, post) -> None:
        """Run the layers' two regions through these callables (compiled_step.CompiledStage of attention_inputs and
        layer_output): every layer calls the same code, so each compiles once for all layers."""
        self.regions = (pre, post)

    def rotary_tables(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos [n, 1, d] and the sign-folded sin [n, 1, d] (-sin on the first half): rope(x) = x cos + swap(x) sin',
        swap exchanging the two halves of the head dims."""
        cos, sin = self.rotary(x, positions[:, None])  # the model's rotary (its scaling type included)
        half = sin.shape[-1] // 2
        signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        return cos, signed

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache, attention_mask, **kwargs) -> torch.Tensor:
        attention = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        pre, post = self.regions
        x = self.embed(tokens[:, None])  # [n, 1, hidden]
        n = x.shape[0]
        cos, sin = self.rotary_tables(x, positions)
        cos, sin = cos[:, None], sin[:, None]  # [n, 1, 1, d]: broadcast over heads
        first = self.layers[0].input_norm
        h = rms_norm(x, first.weight, first.variance_epsilon)
        for i, layer in enumerate(self.layers):
            qk_weight, qk_eps = layer.qk_norm if layer.qk_norm is not None else (None, 0.0)
            query, key, value = pre(
                h, layer.qkv_w, layer.qkv_bias, qk_weight, cos, sin, layer.heads, layer.kv_heads, qk_eps
            )
            keys, values = cache.update(key, value, layer.layer_idx)  # the cache's own write rule
            out, _ = attention(
                layer.attn, query, keys, values, attention_mask, dropout=0.0, scaling=layer.scaling, **kwargs
            )
            following = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else self.norm
            post_norm, o, gate_up, down = layer.post_norm, layer.o_proj, layer, layer.down_proj
            x, h = post(
                x,
                out.reshape(n, 1, -1),
                layer.o_w,
                o.bias,
                post_norm.weight,
                layer.gate_up_w,
                gate_up.gate_up_bias,
                layer.down_w,
                down.bias,
                following.weight,
                post_norm.variance_epsilon,
                following.variance_epsilon,
            )
        return h
