"""The base of every loss term, the registry of terms by name, and their weighted sum (an Objective).

A *term* is an ``nn.Module`` dataclass: its hyper-parameters are dataclass fields with the
paper's defaults, learned adapters (feature terms) are submodules, so they follow ``.to(device)``,
``state_dict`` and the optimizer with the student. It is called as ``term(student_logits,
teacher_logits, labels, feats)`` and returns the scalar loss and a dict of its named parts
(floats, for logging). ``teacher_logits`` is None for terms that need no teacher, or a
``kd.teachers.Teachers`` for a multi-teacher ensemble or several DML peers (the terms read it through
the helpers of kd.teachers); ``feats`` (a ``kd.features.Feats``) holds the outputs of the layers a
feature term names. ``set_epoch`` tells the terms where the phase stands (DKD's warm-up).

Every term states its paper defaults twice: its own hyper-parameters and, as class attributes,
``weight`` (its weight in the sum) and ``ce_weight`` (the weight of the cross-entropy on labels
that goes with it). ``--method NAME`` builds ``ce_weight * CE + weight * NAME``; a recipe lists
terms and weights explicitly.
"""

from __future__ import annotations

import inspect
from dataclasses import field, fields

import torch
from torch import nn

from ..config import options as op
from ..core.errors import ConfigError
from ..core.registry import Registry, suggest
from .features import LOGITS, Feats
from .teachers import Teachers

LOSSES: Registry = Registry("distillation method")
# the largest weight of a term in the sum, and of a weight inside a term (dkd's beta, rkd's angle_weight): the
# papers' largest is 1000 (at); 1e308 overflows the loss to inf at the first step
MAX_WEIGHT = 1e6


def _f(value) -> float:
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def bounded(default: float, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
          hi_open: bool = False):
    """A number hyper-parameter of a term with its bounds, checked when the term is built (``check_params``)
    and worded as the options table words an option's (config.options.Opt)."""
    return field(default=default, metadata={"bounds": dict(lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open)})


def kd_temperature(default: float):
    """A KD temperature: > 0 and at most config.options.MAX_TEMPERATURE."""
    return bounded(default, lo=0, lo_open=True, hi=op.MAX_TEMPERATURE)


def nonnegative(default: float):
    """A weight inside a term: >= 0 (and finite, as every number), and at most MAX_WEIGHT (worded
    apart, so that a negative weight still reads "must be >= 0")."""
    spec = bounded(default, lo=0)
    spec.metadata = {**spec.metadata, "at_most": MAX_WEIGHT}
    return spec


def method_name(cls) -> str:
    return next((name for name in LOSSES if LOSSES.get(name) is cls), cls.__name__)


def check_params(term) -> None:
    """Every number hyper-parameter of ``term`` (a field with a float default): a number (not text nor
    true/false), finite, within its ``bounded`` bounds. One ConfigError naming the method and parameter."""
    for f in fields(term):
        if not (f.init and isinstance(f.default, float)):
            continue
        value, label = getattr(term, f.name), f"method {method_name(type(term))!r}: parameter {f.name!r}"
        hint = f"e.g. {f.name}={f.default:g}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{label} must be a number, got {op.shown(value)}", hint)
        bounds = f.metadata.get("bounds", {})
        try:
            op.check_number(op.Opt(f.name, f.default, (int, float), "", **bounds), value, label)
        except ConfigError as e:
            raise ConfigError(e.message, hint) from None
        most = f.metadata.get("at_most")
        if most is not None and value > most:
            raise ConfigError(f"{label} must be at most {most:.0f}, got {op.shown(value)}", hint)


class Term(nn.Module):
    """Base of every registered loss term (see the module docstring)."""

    needs_teacher = True
    weight = 1.0  # paper default weight of this term in a single-method objective
    ce_weight = 1.0  # paper default weight of the label cross-entropy that goes with it
    student_layers: tuple[str, ...] = ()
    teacher_layers: tuple[str, ...] = ()
    first_stage = False  # trained alone in a first stage, then dropped (fsp; run by training.schemes)

    def __post_init__(self):
        nn.Module.__init__(self)  # dataclass fields are set first: plain attributes, kept
        check_params(self)

    def setup(self, probe) -> None:
        """Resolve layer names and build adapters (feature terms); ``probe`` is a kd.features.Probe."""

    def set_epoch(self, epoch: float, epochs: int) -> None:
        """Where the phase stands (see Objective.set_epoch); terms with a schedule override it."""

    @property
    def wants_layers(self) -> bool:
        return False

    @property
    def needs_setup(self) -> bool:
        return False


def term_params(cls) -> dict:
    """A term's hyper-parameters and their defaults (the dataclass fields a user may set)."""
    return {f.name: f.default for f in fields(cls) if f.init}


def make_loss(method: str, **params) -> Term:
    """Build a registered term; unknown parameters fail with a did-you-mean and the accepted ones."""
    cls = LOSSES.get(method)
    accepted = term_params(cls)
    bad = [k for k in params if k not in accepted]
    if bad:
        raise ConfigError(f"method {method!r} has no parameter {op.shown(bad[0], 60)}"
                          f"{suggest(str(bad[0])[:100], list(accepted))}",
                          f"its parameters: {', '.join(accepted) or 'none'}")
    return cls(**params)  # its numbers are checked as it is built (check_params), not mid-training


def describe_methods() -> list[dict]:
    """One row per registered term: name, summary line, parameters with defaults, weights."""
    rows = []
    for name in LOSSES:
        cls = LOSSES.get(name)
        doc = inspect.getdoc(cls) or ""
        rows.append({"name": name, "summary": doc.split("\n")[0], "params": term_params(cls),
                     "weight": cls.weight, "ce_weight": cls.ce_weight, "needs_teacher": cls.needs_teacher})
    return rows


class Objective(nn.Module):
    """A weighted sum of terms (torchdistill's WeightedSumLoss); what the training loop calls.

    ``Objective.single(name, **params)`` is ``--method NAME``: the term at its paper weight plus
    cross-entropy at the paper's ce_weight. ``Objective.from_specs([{"name":..., "weight":..., ...}])``
    is a recipe. The terms are submodules: their adapters train and move with the objective.
    """

    def __init__(self, terms: list[tuple[str, float, Term]]):
        super().__init__()
        if not terms:
            raise ConfigError("a distillation objective needs at least one loss term")
        self.names = [n for n, _, _ in terms]
        self.weights = [w for _, w, _ in terms]
        self.members = nn.ModuleList([t for _, _, t in terms])
        # set by training.schemes for a multi-teacher ensemble: teacher outputs of shape (batch, members,
        # classes) are then read as a kd.Teachers with these weights (mix "probs")
        self.teacher_weights: torch.Tensor | None = None

    @property
    def terms(self) -> list[tuple[str, float, Term]]:
        return list(zip(self.names, self.weights, self.members))

    @classmethod
    def single(cls, method: str, **params) -> "Objective":
        from .response import CrossEntropy

        term = make_loss(method, **params)
        terms = [(method, float(term.weight), term)]
        if term.ce_weight:
            terms.insert(0, ("ce", float(term.ce_weight), CrossEntropy()))
        return cls(terms)

    @classmethod
    def from_specs(cls, specs: list[dict], where: str = "loss term", whole: bool = True) -> "Objective":
        """The objective of a recipe's terms; ``whole``: ``specs`` are all of them (the weights of
        each training stage must not all be 0), not one checked alone."""
        terms = []
        for spec in specs:
            spec = dict(spec)
            name = spec.pop("name")
            weight = spec.pop("weight", None)
            term = make_loss(name, **spec)
            if weight is not None and not (_is_number(weight) and op.finite(weight) and weight >= 0):
                raise ConfigError(f"{where} {name!r}: weight must be a finite number >= 0, got {op.shown(weight)}")
            if weight is not None and weight > MAX_WEIGHT:  # 1e308 twice: a loss of inf at the first step
                raise ConfigError(f"{where} {name!r}: weight must be at most {MAX_WEIGHT:.0f}, got {op.shown(weight)}")
            terms.append((name, float(term.weight if weight is None else weight), term))
        out = cls(terms)
        if whole:
            _check_weights(out)
        return out

    @property
    def needs_teacher(self) -> bool:
        return any(t.needs_teacher for t in self.members)

    @property
    def student_layers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n for t in self.members for n in t.student_layers))

    @property
    def teacher_layers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n for t in self.members for n in t.teacher_layers))

    @property
    def wants_layers(self) -> bool:
        return any(t.wants_layers for t in self.members)

    @property
    def needs_setup(self) -> bool:
        """True until the feature terms' layers are resolved and their adapters built."""
        return any(t.needs_setup for t in self.members)

    @property
    def name(self) -> str:
        return "+".join(n for n in self.names if n != "ce") or "none"

    def setup(self, probe) -> None:
        for term in self.members:
            term.setup(probe)

    def set_epoch(self, epoch: float, epochs: int) -> None:
        """Where training stands, for terms with a schedule (DKD's warm-up): ``epoch`` is the number of
        epochs done at the end of the coming step (fractional: training.loop calls this before every
        step), ``epochs`` the phase's."""
        for term in self.members:
            term.set_epoch(epoch, epochs)

    def stages(self) -> tuple["Objective | None", "Objective"]:
        """(the first-stage objective, or None; the objective after it). A first-stage term (fsp) is
        trained alone first and then dropped, as Yim et al. and RepDistiller do; what remains is
        trained after it (cross-entropy when nothing remains)."""
        first = [(n, w, t) for n, w, t in self.terms if t.first_stage]
        if not first:
            return None, self
        rest = [(n, w, t) for n, w, t in self.terms if not t.first_stage]
        if not rest:
            from .response import CrossEntropy

            rest = [("ce", 1.0, CrossEntropy())]
        return self._like(first), self._like(rest)

    def _like(self, terms) -> "Objective":
        out = Objective(terms)
        out.teacher_weights = self.teacher_weights
        return out

    def read_teachers(self, teacher_logits, feats):
        """An ensemble's member logits (batch, members, classes) as a kd.Teachers; a feature term naming
        ``logits`` then gets the group's single output (kd.Teachers.as_logits)."""
        t = teacher_logits
        if self.teacher_weights is not None and isinstance(t, torch.Tensor) and t.ndim == 3:
            t = Teachers(t.transpose(0, 1), self.teacher_weights, "probs")
        if isinstance(t, Teachers) and feats is not None and LOGITS in feats.teacher:
            feats = Feats(feats.student, {**feats.teacher, LOGITS: t.as_logits()})
        return t, feats

    def forward(self, student_logits, teacher_logits, labels, feats=None):
        teacher_logits, feats = self.read_teachers(teacher_logits, feats)
        total, parts = 0.0, {}
        for name, weight, term in self.terms:
            value, sub = term(student_logits, teacher_logits, labels, feats)
            total = total + weight * value
            parts.update({k if k not in parts else f"{name}.{k}": v for k, v in sub.items()})
        return total, parts

    def describe(self) -> list[dict]:
        """The resolved terms (layers and defaults filled in), as a recipe's ``[[loss]]`` list."""
        return [{"name": n, "weight": w, **{f.name: getattr(t, f.name) for f in fields(t) if f.init}}
                for n, w, t in self.terms]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_weights(objective: Objective) -> None:
    """Refuse an objective whose terms of one training stage all weigh 0: the student would be trained
    on a loss of 0 (nothing learned, no error) for that stage (the first stage: fsp; then the rest)."""
    first = [w for _, w, t in objective.terms if t.first_stage]
    rest = [w for _, w, t in objective.terms if not t.first_stage]
    for weights, what in ((first, "of the first stage (fsp) "), (rest, "")):
        if weights and not any(weights):
            which = "the only [[loss]] term has" if len(objective.terms) == 1 else \
                f"every [[loss]] term {what}has"
            raise ConfigError(f"{which} weight 0: the student would train on a loss of 0 and learn nothing",
                              "give at least one term a weight > 0 (e.g. name = \"ce\", weight = 1)")


def check_terms(terms: list[dict], source: str) -> None:
    """Check a recipe's ``[[loss]]`` tables: a known name, known keys, valid values, and not every
    weight 0."""
    for i, term in enumerate(terms):
        where = f"{source}: [[loss]] #{i + 1}"
        if "name" not in term:
            raise ConfigError(f"{where} has no 'name'", f"methods: {', '.join(LOSSES.names())}")
        if not isinstance(term["name"], str):
            raise ConfigError(f"{where}: name must be a method name (a string), got {op.shown(term['name'])}",
                              f"methods: {', '.join(LOSSES.names())}")
        cls = LOSSES.get(term["name"])
        allowed = ["name", "weight", *term_params(cls)]
        for key in term:
            if key not in allowed:
                raise ConfigError(f"{where} ({term['name']}): unknown key {key!r}{suggest(key, allowed)}",
                                  f"its keys: {', '.join(allowed)}")
        try:
            Objective.from_specs([term], where, whole=False)  # values are checked by the term itself
        except ConfigError as e:
            if e.message.startswith(where):
                raise
            raise ConfigError(f"{where}: {e.message}", e.hint) from None
    if terms:
        try:
            _check_weights(Objective.from_specs(terms, source, whole=False))
        except ConfigError as e:
            raise ConfigError(f"{source}: {e.message}", e.hint) from None
