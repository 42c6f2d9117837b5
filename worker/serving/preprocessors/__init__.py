"""The processor wrappers, one a modality: a decoded input -> the graph's inputs at a bucket shape."""
