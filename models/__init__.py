"""Networks and weights: reference passes, checkpoint conversion, face analysis, caches."""
