"""Tiny random Hugging Face MoE checkpoints, built with transformers' own model classes.

These are correctness oracles: a checkpoint written here is loaded both by elastic-moe and by
``transformers`` (:func:`load_hf_model`), and the two must agree.

Plain helper functions only (no pytest fixtures), so any test, script or benchmark can import it::

    from tests.hf_fixtures import FAMILIES, make_hf_checkpoint, load_hf_model, make_fp8_minimax_checkpoint

Design notes
------------
* Every parameter is re-drawn from a ``torch.Generator`` seeded with ``seed`` (in ``named_parameters``
  order), so checkpoints do not depend on transformers' ``_init_weights`` details.  Matrices get
  N(0, ``INIT_STD``) -- much larger than the usual 0.02 -- and ``lm_head`` (or the tied embedding) N(0,
  ``LM_HEAD_STD``), so that logits are spread out (std ~2.5) and greedy decoding is not decided by near-ties
  (top-1 minus top-2 logit < 1e-3 at ~0.1% of positions of random prompts, median gap ~0.6-1.2). RMSNorm
  weights get ``1 + 0.1 * N(0, 1)`` and biases ``0.1 * N(0, 1)`` so that a loader which forgets them is caught.
* Routers (``*.mlp.gate.weight`` in memory, i.e. the MoE router -- never the dense ``gate_proj`` nor the
  qwen2_moe ``shared_expert_gate``) are redrawn with std ``ROUTER_LOGIT_STD / sqrt(hidden)`` so router logits
  have std ~``ROUTER_LOGIT_STD``: routing depends strongly on the input, but sigmoid routers
  (minimax_m2, deepseek_v3) do not saturate into exact ties at 1.0.
* ``e_score_correction_bias`` buffers (minimax_m2, deepseek_v3) are filled with ``0.1 * N(0, 1)``: they change
  the top-k choice for some tokens but not all.
* transformers 5.x keeps experts fused in memory (``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj``)
  but ``save_pretrained`` reverts its conversion mapping, so the files keep the hub per-expert layout
  (``model.layers.1.block_sparse_moe.experts.3.w1.weight``, ``model.layers.1.mlp.experts.3.gate_proj.weight``).
  gpt_oss is the exception: its release stores the experts fused (``mlp.experts.gate_up_proj`` [E, H, 2I],
  gate/up interleaved, with biases), and so do its files here; ``make_mxfp4_gpt_oss_checkpoint`` stores them
  MXFP4-quantized as the release does.
* ``releases.make_release`` shapes checkpoints like the hub releases (config field set, generation_config,
  FP8 scales, MTP layer).
"""

from tests.hf_fixtures.fp8 import (
    dequantize_fp8_block,
    make_fp8_minimax_checkpoint,
    quantize_fp8_block,
    write_sharded_safetensors,
)
from tests.hf_fixtures.loading import load_hf_model
from tests.hf_fixtures.models import FAMILIES, FAMILY_CONFIG_KWARGS, build_hf_model, make_hf_checkpoint
from tests.hf_fixtures.mxfp4 import make_mxfp4_gpt_oss_checkpoint

__all__ = [
    "FAMILIES",
    "FAMILY_CONFIG_KWARGS",
    "build_hf_model",
    "dequantize_fp8_block",
    "load_hf_model",
    "make_fp8_minimax_checkpoint",
    "make_hf_checkpoint",
    "make_mxfp4_gpt_oss_checkpoint",
    "quantize_fp8_block",
    "write_sharded_safetensors",
]
