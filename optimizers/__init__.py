"""gradsmith optimizers: update-direction transformations (optax-compatible).

Coordinate-wise clipping, SPECTRA spectral clipping, Newton–Schulz matrix
functions, low-rank subspace optimizers (DCT, online PCA, SVD) and Sven.
"""

from optimizers.clipped_adam import ScaleByClippedAdamState, clipped_adamw, scale_by_clipped_adam
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
from optimizers.dct import dct_matrix, dct_transform
from optimizers.linalg import hard_spectral_clip, orthogonalize, soft_spectral_clip
from optimizers.lowrank import dct_adamw, online_subspace_descent
from optimizers.matrices import MatrixDims, MatrixRules, describe_matrix_dims, matrix_rules
from optimizers.projectors import (
    DctProjectorState,
    OnlinePcaProjectorState,
    Projector,
    SvdProjectorState,
    dct_projector,
    online_pca_gradient,
    online_pca_loss,
    online_pca_projector,
    svd_projector,
)
from optimizers.specs import logical_partition_specs, subspace_partition_specs
from optimizers.spectral import (
    SpectralClipState,
    spectra_adamw,
    spectra_threshold_schedule,
    spectral_clip,
)
from optimizers.subspace import SubspaceState, subspace
from optimizers.sven import ScaleBySvenState, scale_by_sven, sven, sven_leaf_paths
from optimizers.trion import TrionState, scale_by_trion, trion
from optimizers.zero import zero1_partition_specs
