"""gradsmith regularizers: objective-shaping transformations (optax-compatible).

Sharpness-aware training (SAM, ASAM, m-sharpness), SAF and MESA loss-side
regularisers, Bloop gradient surgery with its baselines, and the
perpendicular gradient.
"""

# >>> sharpness exports
# <<< sharpness exports
# >>> saf exports
# <<< saf exports
# >>> surgery exports
# <<< surgery exports
