"""The optimizer of a training phase: parameter groups (weight decay on weights only; quantizer scales
at a fraction of the lr) and AdamW or SGD with a one-cycle schedule."""

from __future__ import annotations

import torch
from torch import nn

# Quantizer scales (QAT) train at this fraction of the lr. Measured (mobile-student, Fashion-MNIST, all 60,000
# training images, W2A2 depthwise=W8A8, QAT lr 3e-3, KD from its float student, val accuracy per epoch): scales at
# the lr .844 .835 .738 (diverging; 1.5e-3 fell to .648 by epoch 9); at lr/10 .834 .845 .862 .874 .877; gradient
# clipping at norm 1 instead .815 .832 .769 .715 .704. Log-domain scales move by about the lr per Adam step,
# whatever their gradient: at 2 bits a few percent shift a level for the whole tensor (LSQ scales its step-size
# gradient down for the same reason). Side by side with scales at the lr on other students (Fashion-MNIST, 10,000
# images, 3 QAT epochs, benchmarks/bench_scale_lr.py): cnn-student W8/W4/W2 87.07/86.56/84.16% vs 87.01/86.72/84.23%,
# resnet-student 88.02/87.19/83.38% vs 88.04/86.91/82.73%: no loss beyond run-to-run noise, +0.65 points at resnet W2.
SCALE_LR_FACTOR = 0.1


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights only: not on biases, norms, or quantizer scales; quantizer scales in
    a group of their own at ``SCALE_LR_FACTOR`` of the lr (``lr_factor``)."""
    from ..quant import is_quantizer_param

    decay, no_decay, scales = [], [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (scales if is_quantizer_param(name) else no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return groups + ([{"params": scales, "weight_decay": 0.0, "lr_factor": SCALE_LR_FACTOR}] if scales else [])


def optimizer(groups: list[dict], kind: str, lr: float, total_steps: int):
    """AdamW (or SGD with Nesterov momentum; ``kind`` "sgd") over ``groups`` with a one-cycle schedule over
    the whole phase (warm-up 15% of the steps with AdamW, 25% with SGD, as measured); a group's
    ``lr_factor`` scales its peak lr."""
    if kind == "sgd":
        opt, warmup = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True), 0.25
    else:
        opt, warmup = torch.optim.AdamW(groups, lr=lr), 0.15
    max_lr = [lr * g.get("lr_factor", 1.0) for g in groups]
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=total_steps, pct_start=warmup)
