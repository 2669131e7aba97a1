"""L1: the pure-function Transformer (transformer), its scalar heads (heads: reward and value models) and named
sizes (presets)."""
