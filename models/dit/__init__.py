"""DiTs (Flux.1, Flux Kontext, Flux.2, Chroma, Qwen-Image): reference routing and training-free reference
attention through the host's joint-attention hooks; the family adapters, the reference pass, the per-call engine."""
