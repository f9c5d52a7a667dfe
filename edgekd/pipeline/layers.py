"""``distill --list-layers``: the layer names feature terms can use, for a student and a teacher."""

from __future__ import annotations

from ..config.options import DEFAULT_TEACHER, DistillOptions
from .common import data_options, load_data, quiet
from .inputs import make_student
from .teachers import load_teacher_file, teacher_specs


def _split_rules(student, spec):
    """``spec`` without the ``--layer-bits`` rules that name no Conv / Linear layer of ``student``,
    and those rules' patterns: a listing shows the layers rather than stopping at a rule that misses."""
    from dataclasses import replace

    from ..core.errors import ConfigError
    from ..quant import layerbits
    from ..quant.brevitas import trace

    if not spec.layer_bits:
        return spec, []
    layers = layerbits.compute_layers(trace(student))
    hits, misses = [], []
    for rule in spec.layer_bits:
        try:
            layerbits.resolve(layers, (rule,), spec.weight_bits)
            hits.append(rule)
        except ConfigError:
            misses.append(rule.pattern)
    return replace(spec, layer_bits=tuple(hits)), misses


def list_layers(opts: DistillOptions, trust_code: bool = False) -> dict:
    """The layer names feature terms can use: the student's (those that run both in float and
    quantized at the run's bits) and the teacher's (its first ``--teacher``); ``unmatched_rules``:
    the ``--layer-bits`` rules that name no Conv / Linear layer of the student (not an error here)."""
    import torch

    from .. import models, quant
    from ..kd.features import layer_table
    from .distill import quant_spec, with_recipe

    opts = with_recipe(opts, trust_code)
    data = load_data(opts.data, opts.seed, data_options(opts))
    _, spec = quant_spec(opts, quiet)
    x = torch.from_numpy(data.train.take(range(2)))
    student = make_student(opts.student, data, trust_code=trust_code).model
    spec, unmatched = _split_rules(student, spec)
    qnames = {r["name"] for r in layer_table(quant.quantize(student, spec), x)}
    rows = [r for r in layer_table(student, x) if r["name"] in qnames]
    first = teacher_specs(opts.teacher)[0]
    arch, file = models.split_weights(first) if first else (DEFAULT_TEACHER, None)
    if file is not None:
        teacher = load_teacher_file(first, data, trust_code)[0]
    else:  # an architecture: an untrained copy has the same layers
        teacher = models.build_model(arch, data.num_classes, data.input_shape)
    return {"student": rows, "teacher": layer_table(teacher, x), "unmatched_rules": unmatched}
