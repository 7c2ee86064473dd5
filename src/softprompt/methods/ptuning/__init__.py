"""P-tuning (Liu et al., 2021): input vectors that come out of a prompt encoder while training."""
