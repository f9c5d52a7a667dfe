"""Knowledge-distillation losses by family, registered by name, and their weighted sum.

``objective`` (the Term base, the LOSSES registry, Objective), ``response`` (hinton, kd, mse, dkd,
tfkd, ce, none), ``feature`` (fitnet, at), ``relation`` (rkd, fsp), ``features`` (hooks, probes,
adapters), ``teachers`` (several networks' logits: an ensemble, DML peers). Importing this package
registers every term.
"""

from . import feature, relation, response  # noqa: F401  (registers the terms)
from .feature import FitNets, AttentionTransfer, attention_map, common_size  # noqa: F401
from .objective import LOSSES, Objective, Term, check_terms, describe_methods, make_loss, term_params  # noqa: F401
from .relation import FlowOfSolution, RelationalKD, fsp_matrix, rkd_angle, rkd_distance  # noqa: F401
from .response import (CrossEntropy, CrossEntropyOnly, DecoupledKD, HintonKD, LogitMSE, SoftTargets,  # noqa: F401
                       TeacherFreeKD, dkd_parts, kd_divergence)
from .teachers import Teachers  # noqa: F401
