"""NumPy-facing forward/backward pairs over the C kernels.

Every function takes NumPy arrays (floating arrays are computed in float32,
index arrays in int64), checks its arguments with messages that name them,
never modifies its inputs, and returns new arrays.
"""
from ._check import NonFiniteInputError  # noqa: F401
from .activation import ACTIVATIONS, activation_backward, activation_forward  # noqa: F401
from .router import NORMALIZE, RouterResult, router_backward, router_forward, router_logits_backward  # noqa: F401
from .moe import (combine_backward, combine_forward, dispatch_backward, dispatch_forward,  # noqa: F401
                  expert_ffn_backward, expert_ffn_forward, moe_backward, moe_forward)
from .box import (  # noqa: F401
    box_cxcywh_to_xyxy_backward, box_cxcywh_to_xyxy_forward, box_iou_forward,
    box_xyxy_to_cxcywh_backward, box_xyxy_to_cxcywh_forward, generalized_box_iou_backward,
    generalized_box_iou_forward, generalized_box_iou_paired_backward,
    generalized_box_iou_paired_forward, l1_loss_backward, l1_loss_forward, sigmoid_focal_loss_backward,
    sigmoid_focal_loss_forward)
from .nn import *  # noqa: F401,F403
from .routing_loss import *  # noqa: F401,F403
from .optim import MultiStepLR, adamw_step, clip_grad_norm, grad_global_norm  # noqa: F401
from .attention import attention_backward, attention_forward  # noqa: F401
from .msda import ms_deform_attn_backward, ms_deform_attn_forward  # noqa: F401
from .pool import maxpool2d_backward, maxpool2d_forward  # noqa: F401
