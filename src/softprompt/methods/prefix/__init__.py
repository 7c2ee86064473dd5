"""Prefix tuning (Li & Liang, 2021; P-tuning v2): trainable keys and values at every attention layer."""
