"""What a run starts from: the student and the data, named by specs (the command line, recipes) or
given as objects (the Python API: an ``nn.Module`` teacher or student, an ``api.TorchData``).

A student spec may carry a weights file (``ARCH=WEIGHTS``, or an edgekd checkpoint alone): it is
loaded by models.weights.from_spec, with a new head when its class count differs from the data's
(logged once). A student given as a module is copied for every student a scheme trains, and is
recorded as ``python-api``: export takes the run when given the module again. The run records the
architecture part of a spec (``arch``) and the weights file it started from (``init_weights``);
the run's own student.pt holds every weight, so export needs only the architecture.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Callable

from torch import nn

from ..core.errors import ConfigError
from ..data.torchdata import PYTHON_API
from .common import Log, quiet


@dataclass
class Objects:
    """Objects the Python API passes instead of specs."""

    data: object = None  # api.TorchData
    student: nn.Module | None = None
    teachers: list = field(default_factory=list)  # nn.Modules
    student_trained: bool = False  # the student module holds trained float weights

    def apply(self, opts):
        """``opts`` with the specs the objects replace set to ``python-api`` (what the run records)."""
        changes = {}
        if self.data is not None:
            changes["data"] = PYTHON_API
        if self.student is not None:
            changes["student"] = PYTHON_API
        if self.teachers:
            changes["teacher"] = None
        return replace(opts, **changes) if changes else opts


def as_objects(data=None, student=None, teacher=None, student_trained: bool = False) -> Objects:
    """Check and gather the API's objects (``teacher``: one module or a list of them)."""
    if student_trained and student is None:
        raise ConfigError("student_trained=True needs a student= module",
                          "pass the trained module as student=, or give its weights in the student spec (ARCH=WEIGHTS)")
    teachers = [] if teacher is None else list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
    for what, value in [("student", student)] + [("teacher", t) for t in teachers]:
        if value is not None and not isinstance(value, nn.Module):
            raise ConfigError(f"{what}= must be a torch.nn.Module, got {type(value).__name__}",
                              f"pass a spec string in the options instead (DistillOptions({what}=...))")
    if data is not None and not hasattr(data, "dataset"):
        raise ConfigError(f"data= must be an api.TorchData, got {type(data).__name__}",
                          "wrap your datasets: api.TorchData(train, test, classes=[...])")
    return Objects(data, student, teachers, bool(student_trained))


@dataclass
class Student:
    """How the run's students are made: the first one (checked to trace before anything trains), a
    factory for the others, and what the run records."""

    model: nn.Module
    arch: str  # the architecture part of the spec, or python-api
    weights: str | None  # the weights file it started from
    new_head: bool
    factory: Callable[[], nn.Module]
    notes: list = field(default_factory=list)  # what loading its weights repaired (a new head, the stem)
    module_trained: bool = False  # a Python API module given as trained (distill's student_trained)

    @property
    def trained(self) -> bool:
        """Whether the student starts from trained float weights (a weights file or a trained module)."""
        return self.weights is not None or self.module_trained


def make_student(spec: str, data, module: nn.Module | None = None, log: Log = quiet,
                 trust_code: bool = False, trained: bool = False) -> Student:
    """The student of a run (see the module docstring)."""
    from .. import models

    if module is not None:
        pristine = copy.deepcopy(module).cpu()
        _check_outputs(pristine, data)
        return Student(copy.deepcopy(pristine), PYTHON_API, None, False, lambda: copy.deepcopy(pristine),
                       module_trained=trained)
    built = models.from_spec(spec, data.num_classes, data.input_shape, student=True, trust_code=trust_code, log=log)

    def factory() -> nn.Module:
        if built.weights is None:
            return models.build_model(built.arch, data.num_classes, data.input_shape)
        return models.from_spec(f"{built.arch}={built.weights}", data.num_classes, data.input_shape,
                                student=True).model

    return Student(built.model, built.arch, built.weights, built.new_head, factory, built.notes)


def _check_outputs(module: nn.Module, data) -> None:
    """A module given as the student must map the data's images to one logit per class."""
    import torch

    x = torch.from_numpy(data.test.take([0]))
    module.eval()
    with torch.no_grad():
        out = module(x)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, data.num_classes):
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"the student module maps a {list(x.shape)} batch to {shape}, not [1, {data.num_classes}]",
                          f"give it {data.num_classes} outputs (the data's classes) and inputs of shape "
                          f"{list(data.input_shape)}")


def export_model(student, meta: dict, ckpt_path, run_dir, trust_code: bool = False) -> nn.Module:
    """The float architecture load_student quantizes and fills with the run's weights: the module the
    Python API distilled (a run recorded as python-api), the architecture named again at export (its
    ``=WEIGHTS`` part is dropped: the run's student.pt holds every weight), or the one the checkpoint
    names, which may be code (``module:callable``) only with ``trust_code``."""
    from .. import models

    if isinstance(student, nn.Module):
        return copy.deepcopy(student).cpu()
    if student is None:
        if meta.get("arch") == PYTHON_API:
            raise ConfigError(f"the student of {run_dir} came from the Python API (an nn.Module)",
                              "pass the same module again: api.export(run, target, student=module)")
        models.check_trusted(meta["arch"], str(ckpt_path), f"export {run_dir} --student {meta['arch']}", trust_code)
        arch = meta["arch"]
    else:
        arch, _ = models.split_weights(student)
        if arch is None:
            raise ConfigError(f"--student {student} names a weights file, not an architecture",
                              "name the architecture, e.g. --student mypkg.nets:make")
    return models.build_model(arch, meta["num_classes"], tuple(meta["input_shape"]))
