"""gradsmith optimizers: update-direction transformations (optax-compatible).

Coordinate-wise clipping, SPECTRA spectral clipping, Newton–Schulz matrix
functions, low-rank subspace optimizers (DCT, online PCA, SVD) and Sven.
"""

from optimizers.linalg import hard_spectral_clip, orthogonalize, soft_spectral_clip
from optimizers.matrices import MatrixDims

# >>> clipping exports
# <<< clipping exports
# >>> spectral exports
# <<< spectral exports
# >>> subspace exports
# <<< subspace exports
# >>> sven exports
# <<< sven exports
