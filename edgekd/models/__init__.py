"""Models: built-in architectures, specs (names, torchvision:NAME, module:callable), safe checkpoints."""

from .checkpoints import load_checkpoint, load_model, load_weights, save_checkpoint  # noqa: F401
from .specs import build_model, count_params  # noqa: F401
from .zoo import (ARCHS, calibrate_batchnorm, cnn_student, cnn_teacher, mlp_student, random_passes,  # noqa: F401
                  resnet_student)
