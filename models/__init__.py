"""Neural network modules of the studio (``nn.Module`` classes only, no file I/O)."""
