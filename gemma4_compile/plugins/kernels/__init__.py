"""Triton kernels behind the gemma4 plugins, with torch wrappers that match the custom ops in `model.ops`.

    kernels.attention.attention(q, k, v, past_k, past_v, past_len, seq_len, window, scale, block_ids=None)
        -> (out, present_k, present_v)                         same contract as ops.attention_reference
    kernels.moe.moe(x, router_logits, per_expert_scale, gate_up, down, top_k) -> y   (ops.moe_reference)

Also public: attention.attention_fwd (the single fused launch), attention.attention_decode (flash-decoding),
attention.ring_update, moe.route and moe.sort_by_expert (the pipeline's stages), and for TensorRT AOT
plugins attention.aot_config / moe.aot_configs (the constexprs `plugins/aot.py` compiles for a layer).
The submodules are the surface (re-exporting `attention` here would shadow its own module). Importing them
imports Triton: set TRITON_INTERPRET=1 first to run the kernels on a CPU.
"""

from . import attention, moe

__all__ = ["attention", "moe"]
