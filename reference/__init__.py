"""Float references (PyTorch, CPU or CUDA): what the accelerator must compute, and how fast a processor does it."""
