"""gradsmith optimizers: update-direction transformations (optax-compatible).

Coordinate-wise clipping, SPECTRA spectral clipping, Newton–Schulz matrix
functions, low-rank subspace optimizers (DCT, online PCA, SVD) and Sven.
"""

from optimizers.clipping import (
    ClipCoordinatewiseState,
    clip_coordinatewise,
    coordinatewise_threshold,
)
from optimizers.curvature import (
    directional_sharpness,
    hessian_top_eigenvalue,
    hessian_vector_product,
)
from optimizers.linalg import hard_spectral_clip, orthogonalize, soft_spectral_clip
from optimizers.matrices import MatrixDims
from optimizers.spectral import (
    SpectralClipState,
    spectra_adamw,
    spectra_threshold_schedule,
    spectral_clip,
)
from optimizers.subspace import (
    DctProjectorState,
    OnlinePcaProjectorState,
    Projector,
    SubspaceState,
    SvdProjectorState,
    dct_adamw,
    dct_matrix,
    dct_projector,
    dct_transform,
    online_pca_gradient,
    online_pca_loss,
    online_pca_projector,
    online_subspace_descent,
    subspace,
    subspace_partition_specs,
    svd_projector,
)
from optimizers.sven import ScaleBySvenState, scale_by_sven, sven, sven_leaf_paths
