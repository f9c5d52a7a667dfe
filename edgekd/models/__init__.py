"""Models: built-in architectures, specs (names, torchvision:NAME, module:callable), safe checkpoints."""

from .checkpoints import check_input, check_meta, load_checkpoint, load_model, load_weights, save_checkpoint  # noqa: F401
from .specs import (UntrustedCodeError, build_model, check_trusted, count_params, names_code,  # noqa: F401
                    refuse_code, split_weights)
from .zoo import (ARCHS, calibrate_batchnorm, cnn_student, cnn_teacher, mlp_student, random_passes,  # noqa: F401
                  resnet_student)
from .weights import Built, apply_weights, from_spec, read_state_dict, read_weights  # noqa: F401
