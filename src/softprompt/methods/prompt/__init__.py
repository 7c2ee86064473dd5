"""Prompt tuning (Lester et al., 2021): k trainable input vectors, the method the others relate to."""
