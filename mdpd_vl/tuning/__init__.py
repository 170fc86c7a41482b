"""One entry for every tuning method: `apply_method(backbone, head_factory, MethodConfig) -> TunedModel`.

See tuning/README.md for the methods and mdpd_vl/README.md for the contracts.
"""

from mdpd_vl.tuning.config import MethodConfig
from mdpd_vl.tuning.counts import count_module, count_params, unique_params
from mdpd_vl.tuning.methods import METHODS, apply_method
from mdpd_vl.tuning.model import HeadTuned, MdpdTuned, PeftTuned, SideTuned, TunedModel
from mdpd_vl.tuning.objective import describe_objective

__all__ = [
    "METHODS",
    "HeadTuned",
    "MdpdTuned",
    "MethodConfig",
    "PeftTuned",
    "SideTuned",
    "TunedModel",
    "apply_method",
    "count_module",
    "count_params",
    "describe_objective",
    "unique_params",
]
