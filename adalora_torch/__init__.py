"""adalora_torch: SVD adapter layers, orthogonal regularisation, the rank allocator hook."""
