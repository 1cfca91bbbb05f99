"""Flax NNX encoder-decoder Transformer; names logical axes only (no mesh, no trainer)."""

from model import axes
from model.attention import (MultiHeadAttention, combine_masks, dot_product_attention,
                             make_attention_mask, make_causal_mask, make_segment_mask)
from model.axes import ACTIVATION_AXES, ALL_AXES, PARAM_AXES, constrain
from model.blocks import DecoderBlock, EncoderBlock
from model.config import ModelConfig
from model.layers import (Embed, FeedForward, LearnedPositions, Logits, Norm, dropout,
                          sinusoidal_positions)
from model.stack import Decoder, Encoder
from model.output import PADDED_VOCAB_LOGIT
from model.transformer import Transformer, positions_from_segments, shift_right

__all__ = [
    "ACTIVATION_AXES", "ALL_AXES", "PARAM_AXES", "PADDED_VOCAB_LOGIT", "Decoder", "DecoderBlock",
    "Embed", "Encoder", "EncoderBlock", "FeedForward", "LearnedPositions", "Logits",
    "ModelConfig", "MultiHeadAttention", "Norm", "Transformer", "axes", "combine_masks",
    "constrain", "dot_product_attention", "dropout", "make_attention_mask", "make_causal_mask",
    "make_segment_mask", "positions_from_segments", "shift_right", "sinusoidal_positions",
]
