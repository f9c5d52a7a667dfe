"""Post-training quantization with Brevitas: a trained float model -> a quantized one, no training.

The model is quantized with the same maps as QAT (``quant.quantize``: batch norms merged, the
target's conventions), then, following Brevitas's PTQ flow (``brevitas_examples`` imagenet PTQ,
``ptq_common.apply_calibration`` / ``apply_bias_correction``):

1. activation calibration: ``brevitas.graph.calibrate.calibration_mode`` runs the calibration
   images with quantization off while every activation quantizer collects its statistics (edgekd's
   activation quantizers take the 99.999th percentile, averaged over all calibration batches
   instead of QAT's 30-step running statistic); the scales are fixed when the context ends;
2. bias correction (Nagel et al. 2019, "Data-free quantization", section 4.2, computed on data):
   ``bias_correction_mode`` measures, per output channel of every quantized layer, the mean shift
   between the float and the quantized layer's output on the calibration images and folds it into
   the bias (layers without a bias get one).

Weight scales are per-channel absolute maxima, as Brevitas initialises them. Nothing is learned.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .brevitas import quantize
from .spec import QuantSpec


def batches(x: torch.Tensor, batch_size: int):
    for i in range(0, len(x), batch_size):
        yield x[i: i + batch_size]


@torch.no_grad()
def post_training_quantize(model: nn.Module, spec: QuantSpec, calib: torch.Tensor, batch_size: int = 128,
                           bias_correction: bool = True) -> nn.Module:
    """A quantized copy of float ``model`` at ``spec``, calibrated on the images ``calib`` (N, C, H, W).

    Statistics are collected in eval mode (batch norms are already merged into the convolutions)."""
    from brevitas.graph.calibrate import bias_correction_mode, calibration_mode

    qmodel = quantize(model, spec).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with calibration_mode(qmodel):
            for xb in batches(calib, batch_size):
                qmodel(xb)
        if bias_correction:
            with bias_correction_mode(qmodel):
                for xb in batches(calib, batch_size):
                    qmodel(xb)
    return qmodel.eval()
