"""Fast paths: ``torch.compile``'d kernels, each the compiled form of a plain-torch function that is its reference."""
