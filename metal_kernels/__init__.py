"""Custom kernels (Metal with a CUDA twin), each with a plain-MLX reference and a dispatcher."""
