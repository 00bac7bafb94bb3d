"""gradsmith regularizers: objective-shaping transformations (optax-compatible).

Sharpness-aware training (SAM, ASAM, m-sharpness), SAF and MESA loss-side
regularisers, Bloop gradient surgery with its baselines, and the
perpendicular gradient.
"""

from optimizers import directional_sharpness, hessian_top_eigenvalue
from regularizers.bloop import BloopState, PCGradEmaState, bloop
from regularizers.perp_grad import PerpGradState, perp_grad
from regularizers.saf import MESA, SAF, MESAState, SAFState, distillation_kl, mesa, saf
from regularizers.sharpness import SAMState, m_sharpness_gradient, sam, sam_perturbation
from regularizers.surgery import (
    DynamicBarrierState,
    MixedState,
    PCGradState,
    dynamic_barrier,
    main_and_aux_grads,
    mixed,
    pcgrad,
)
