"""Training: the loop (``fit``), the teacher-output cache, schemes (who teaches whom), checkpoints
with exact resume, and multi-process training under torchrun."""

from .cache import TeacherCache, build_teacher_cache, cache_off_reason, teacher_cache  # noqa: F401
from .evaluate import accuracy, as_tensors, logits_agree, predict  # noqa: F401
from .loop import FitConfig, FitResult, fit, set_threads  # noqa: F401
