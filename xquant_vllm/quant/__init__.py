"""Pure-PyTorch reference quantizers: the ground truth every kernel and the engine are tested against."""
