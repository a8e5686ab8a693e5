"""Training and post-training recipes that turn float detectors into QANNs (above the model adapters)."""
