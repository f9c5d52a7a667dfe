"""Quantization: QuantSpec (bits + a target's conventions) and Brevitas QAT model surgery."""

from .brevitas import (describe, is_quantizer_param, materialize, quantize, restore_runtime_state,  # noqa: F401
                       runtime_state, trace)
from .spec import QuantSpec, spec_for_target  # noqa: F401
