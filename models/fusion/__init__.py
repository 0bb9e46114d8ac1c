"""Face fusion: trained fused-KV adapter weights."""
