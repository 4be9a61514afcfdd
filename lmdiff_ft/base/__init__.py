"""Loading a base: named bases built locally, checkpoints, quantization, the streaming quantized load."""
