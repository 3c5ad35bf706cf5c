"""Custom kernels (Metal with a CUDA twin), each with a plain-MLX reference and a dispatcher; and
C for Linux CPUs (`cpu_kernels`), compiled on the user's machine."""
