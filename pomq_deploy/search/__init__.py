"""PoMQ-ViT's Pareto search over per-block bit-width plans, on optuna."""
