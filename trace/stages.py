"""The stage names of the forward, in forward order (see ../shared/DESIGN.md).

STAGES is every stage of every architecture; which of them a model has is
engine.arch.model_stages (both derived from engine/arch.py's one table)."""
from engine.arch import ALL_STAGES

STAGES = ALL_STAGES
# Stages computed once per forward rather than once per layer.
# `embedding` is whole-model too, but its file lives at layer-0/embedding.bin.
WHOLE_MODEL_STAGES = ("embedding", "final_norm", "lm_head")
ALIASES = {"layer_output": "post_ffn_residual"}
STAGE_INDEX = {name: i for i, name in enumerate(STAGES)}
# Stages that are a weight matrix times the stage before: each output unit (column) is one row
# of the matrix, so a fault in some of its rows shows on those units.
WEIGHT_MATMUL_STAGES = ("qkv_matmul", "attn_out", "ffn_gate", "ffn_up", "ffn_out", "lm_head")
