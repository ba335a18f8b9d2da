"""GenSeg multi-level optimisation: losses, pure level I/II steps, the exact hypergradient, the trainer."""
