"""The hub's tensor names and shapes for a ModelSpec.

The router half and the expert half ask for tensors by these names; the checkpoint reader checks every
name and shape against this table, so a missing, extra or mis-shaped tensor is caught by name.
"""

from __future__ import annotations

from emoe.spec import EXPERTS_FUSED, MXFP4_BLOCK, ModelSpec

Shape = tuple[int, ...]
FUSED_EXPERT_TENSORS = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
MXFP4_SUFFIXES = ("_blocks", "_scales")  # a quantized `name` is stored as name_blocks + name_scales


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}"


def expert_keys(spec: ModelSpec, layer: int, expert: int) -> tuple[str, str, str]:
    """(gate, up, down) weight names of one routed expert."""
    base = f"{layer_prefix(layer)}.{spec.moe_prefix}.experts.{expert}"
    return tuple(f"{base}.{n}.weight" for n in spec.expert_names)  # type: ignore[return-value]


def fused_expert_keys(spec: ModelSpec, layer: int) -> dict[str, str]:
    """gpt-oss: one layer's experts in four tensors, by role: gate_up_proj [E, H, 2I] (gate and up columns
    interleaved), gate_up_proj_bias [E, 2I], down_proj [E, I, H], down_proj_bias [E, H]."""
    base = f"{layer_prefix(layer)}.{spec.moe_prefix}.experts"
    return {role: f"{base}.{role}" for role in FUSED_EXPERT_TENSORS}


def _fused_expert_tensors(spec: ModelSpec, layer: int) -> dict[str, Shape]:
    """As stored: the weights plain, or (mxfp4) as `_blocks` [E, out, in/32, 16] + `_scales` [E, out, in/32]."""
    e, h, i = spec.num_experts, spec.hidden_size, spec.moe_intermediate_size
    keys = fused_expert_keys(spec, layer)
    out = {keys["gate_up_proj_bias"]: (e, 2 * i), keys["down_proj_bias"]: (e, h)}
    for role, (rows, cols) in (("gate_up_proj", (h, 2 * i)), ("down_proj", (i, h))):
        if spec.mxfp4:  # stored [out, in], blocked along in
            blocks, scales = (keys[role] + s for s in MXFP4_SUFFIXES)
            out[blocks] = (e, cols, rows // MXFP4_BLOCK, MXFP4_BLOCK // 2)
            out[scales] = (e, cols, rows // MXFP4_BLOCK)
        else:
            out[keys[role]] = (e, rows, cols)
    return out


def expert_shapes(spec: ModelSpec) -> tuple[Shape, Shape, Shape]:
    h, i = spec.hidden_size, spec.moe_intermediate_size
    return (i, h), (i, h), (h, i)


def _mlp(prefix: str, hidden: int, inter: int) -> dict[str, Shape]:
    return {
        f"{prefix}.gate_proj.weight": (inter, hidden),
        f"{prefix}.up_proj.weight": (inter, hidden),
        f"{prefix}.down_proj.weight": (hidden, inter),
    }


def _gqa(spec: ModelSpec, p: str) -> dict[str, Shape]:
    h, d = spec.hidden_size, spec.head_dim
    q_out, kv_out = spec.num_heads * d, spec.num_kv_heads * d
    out = {
        f"{p}.q_proj.weight": (q_out, h),
        f"{p}.k_proj.weight": (kv_out, h),
        f"{p}.v_proj.weight": (kv_out, h),
        f"{p}.o_proj.weight": (h, q_out),
    }
    if spec.qkv_bias:
        out.update(
            {f"{p}.q_proj.bias": (q_out,), f"{p}.k_proj.bias": (kv_out,), f"{p}.v_proj.bias": (kv_out,)}
        )
    if spec.o_bias:
        out[f"{p}.o_proj.bias"] = (h,)
    if spec.attention_sinks:
        out[f"{p}.sinks"] = (spec.num_heads,)
    if spec.qk_norm == "head":
        out.update({f"{p}.q_norm.weight": (d,), f"{p}.k_norm.weight": (d,)})
    elif spec.qk_norm == "full":
        out.update({f"{p}.q_norm.weight": (q_out,), f"{p}.k_norm.weight": (kv_out,)})
    return out


def _mla(spec: ModelSpec, p: str) -> dict[str, Shape]:
    h, nh = spec.hidden_size, spec.num_heads
    qk = spec.qk_nope_head_dim + spec.qk_rope_head_dim
    out: dict[str, Shape] = {}
    if spec.q_lora_rank is None:
        out[f"{p}.q_proj.weight"] = (nh * qk, h)
    else:
        out[f"{p}.q_a_proj.weight"] = (spec.q_lora_rank, h)
        out[f"{p}.q_a_layernorm.weight"] = (spec.q_lora_rank,)
        out[f"{p}.q_b_proj.weight"] = (nh * qk, spec.q_lora_rank)
        if spec.qkv_bias:
            out[f"{p}.q_a_proj.bias"] = (spec.q_lora_rank,)
    out[f"{p}.kv_a_proj_with_mqa.weight"] = (spec.kv_lora_rank + spec.qk_rope_head_dim, h)
    if spec.qkv_bias:
        out[f"{p}.kv_a_proj_with_mqa.bias"] = (spec.kv_lora_rank + spec.qk_rope_head_dim,)
    out[f"{p}.kv_a_layernorm.weight"] = (spec.kv_lora_rank,)
    out[f"{p}.kv_b_proj.weight"] = (nh * (spec.qk_nope_head_dim + spec.v_head_dim), spec.kv_lora_rank)
    out[f"{p}.o_proj.weight"] = (h, nh * spec.v_head_dim)
    if spec.o_bias:
        out[f"{p}.o_proj.bias"] = (h,)
    return out


def router_tensors(spec: ModelSpec) -> dict[str, Shape]:
    """Every tensor of the dense half: embeddings, attention, norms, gates, shared experts, dense MLPs, head."""
    h = spec.hidden_size
    out: dict[str, Shape] = {"model.embed_tokens.weight": (spec.vocab_size, h), "model.norm.weight": (h,)}
    if not spec.tie_word_embeddings:
        out["lm_head.weight"] = (spec.vocab_size, h)
    for layer in range(spec.num_layers):
        p = layer_prefix(layer)
        out[f"{p}.input_layernorm.weight"] = (h,)
        out[f"{p}.post_attention_layernorm.weight"] = (h,)
        attn = _mla if spec.attention == "mla" else _gqa
        out.update(attn(spec, f"{p}.self_attn"))
        if not spec.moe_layers[layer]:
            out.update(_mlp(f"{p}.mlp", h, spec.intermediate_size))
            continue
        moe = f"{p}.{spec.moe_prefix}"
        out[f"{moe}.{spec.gate_name}.weight"] = (spec.num_experts, h)
        if spec.gate_bias:
            out[f"{moe}.{spec.gate_name}.bias"] = (spec.num_experts,)
        if spec.bias_key:
            out[f"{moe}.{spec.bias_key}"] = (spec.num_experts,)
        if spec.shared_intermediate_size:
            name = "shared_expert" if spec.shared_gated else "shared_experts"
            out.update(_mlp(f"{moe}.{name}", h, spec.shared_intermediate_size))
            if spec.shared_gated:
                out[f"{moe}.shared_expert_gate.weight"] = (1, h)
    return out


def all_expert_tensors(spec: ModelSpec) -> dict[str, Shape]:
    shapes = expert_shapes(spec)
    out: dict[str, Shape] = {}
    for layer in spec.moe_layer_ids:
        if spec.expert_layout == EXPERTS_FUSED:
            out.update(_fused_expert_tensors(spec, layer))
            continue
        for e in range(spec.num_experts):
            out.update(zip(expert_keys(spec, layer, e), shapes, strict=True))
    return out


def expected_tensors(spec: ModelSpec) -> dict[str, Shape]:
    return {**router_tensors(spec), **all_expert_tensors(spec)}


QUANTIZABLE_SUFFIXES = ("_proj.weight", ".w1.weight", ".w2.weight", ".w3.weight", "_proj_with_mqa.weight")


def is_quantizable(name: str) -> bool:
    """Linear weights that FP8 checkpoints store quantized (not embeddings, norms, gates or the head)."""
    return (
        name.startswith("model.layers.")
        and name.endswith(QUANTIZABLE_SUFFIXES)
        and ".gate.weight" not in name
    )
