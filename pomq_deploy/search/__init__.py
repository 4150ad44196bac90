"""PoMQ-ViT's Pareto search over per-block bit-width plans, on optuna."""

# Rules that pick best.yaml from the front; here, free of heavy imports, for the CLI's --help.
SELECT_RULES = {
    "top1-within-1pt": "among the front's plans within 1 point of uniform 8-bit's top-1, the lowest latency "
                       "(if none is that close, the highest top-1)",
    "max-top1": "highest top-1 on the front",
    "min-latency": "lowest latency on the front",
    "min-size": "smallest artifact on the front",
}
SPACES = ("paper", "engine")  # search spaces (search.space), here for --help
