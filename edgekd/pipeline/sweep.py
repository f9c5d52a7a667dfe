"""Sweep bit widths, methods and seeds: distill (or quantize after training), export and bench each
cell, then pick.

A *cell* is one (bits, method, seed) on one dataset, student and target (pipeline.cells): a KD
method or ``none`` (QAT alone) trains a student; ``ptq`` quantizes the float student of the first
trained method after training; ``reference`` adds that float student as an fp32 bundle. Its
artifacts live under the sweep root, so that a re-run resumes where the last one stopped:

    ROOT/sweep.json                  the training options; a resume must use the same ones
    ROOT/runs/<cell>/                ``edgekd distill`` run dir   (done when metrics.json exists)
    ROOT/bundles/<cell>/             ``edgekd export`` bundle     (done when manifest.json exists)
    ROOT/bench/<profile>/<cell>.json its bench rows              (written only when no row errored)

A stage that fails turns the cell into one ``error`` row naming the stage; the other cells go on.
``pareto_front`` and ``best_under_budget`` are plain functions over bench rows (dicts).
Functions here return data; they never print or exit (``log`` gets one line at a time).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import options as op
from ..core import jsonfile
from ..core.errors import EdgekdError
from ..core.fsutil import RUNS_DIR, SWEEP_FORMAT, check_output, write_json
from .cells import BASELINES, Cell, cached_rows, cell_paths, run_cell, shares_float_phase  # noqa: F401
from .choose import best_under_budget, dominates, pareto_front, spread  # noqa: F401
from .common import Log, dataset_name, quiet, slug

# Options that decide what a cell's training produces: a resumed sweep must not mix them.
RECIPE_KEYS = ("data", "target", "student", "teacher", "epochs", "float_epochs", "teacher_epochs", "seed",
               "data_options", "qat_lr")
# What the sweep decides, per cell (bits, method, seed) or from its own options: a --config recipe
# setting one would override it unseen (recipe.apply fills what a cell leaves at its default: a cell
# named bits8-hinton would train the recipe's bits or method), so a recipe may not.
SWEEP_DECIDES = ("weight_bits", "act_bits", "method", "seed", "data", "target", "student", "teacher", "epochs",
                 "float_epochs", "teacher_epochs", "layer_bits", "normalize", "image_size", "channels", "augment",
                 "workers", "skip_bad_images", "image_cache")


@dataclass
class SweepOptions:
    bits: tuple[int, ...] = (8, 4, 2)
    methods: tuple[str, ...] = ("hinton",)  # KD methods, none (QAT alone), ptq
    data: str = "digits"
    target: str = "onnxruntime-cpu"
    student: str = op.DEFAULT_STUDENT
    teacher: str | None = None
    epochs: int | None = op.default("epochs")  # None: each cell's default for its bits (config.options.qat_epochs)
    float_epochs: int = op.default("float_epochs")
    teacher_epochs: int = op.default("teacher_epochs")
    qat_temp: float | None = None  # --qat-temperature: the QAT-phase T of the hinton / kd cells (None: by bits)
    qat_lr: float | None = op.default("qat_lr")  # --qat-lr of every trained cell (None: distill's default)
    seed: int = 0
    seeds: tuple[int, ...] | None = None  # several seeds (None: seed alone)
    reference: bool = False  # an fp32 bundle of the float student, per seed
    config: str | None = None  # a recipe applied to every trained cell
    layer_bits: tuple[str, ...] = ()  # per-layer rules (--layer-bits PATTERN=WxAy) of every quantized cell
    profile: str | None = None
    root: Path | None = None
    progress: bool = False
    overwrite: bool = False  # the root may replace a folder edgekd did not write (never other runs)
    read: dict = field(default_factory=dict)  # data.DataOptions fields (normalize, image_size, ...) given

    def cells(self) -> list[Cell]:
        """Per seed: every trained method at every bit width, then ptq at every bit width, then the
        fp32 reference (baselines take the float student of the seed's first trained method)."""
        seeds = tuple(self.seeds or (self.seed,))
        tagged, trained = len(seeds) > 1, [m for m in self.methods if m not in BASELINES]
        out = []
        for seed in seeds:
            out += [Cell(b, m, seed, tagged) for m in trained for b in self.bits]
            out += [Cell(b, "ptq", seed, tagged) for b in self.bits if "ptq" in self.methods]
            out += [Cell(32, "fp32", seed, tagged)] if self.reference else []
        return out

    def _per_bits(self, value) -> object:
        """``value(bits)`` of the trained cells: one value, or per bit width ({"2": 12, "4": 4}) when it
        differs between them (what a resume must keep)."""
        per = {str(b): value(b) for b in self.bits if b < 32}
        return next(iter(per.values())) if len(set(per.values())) <= 1 and per else per

    def qat_epochs(self) -> int | dict:
        """The QAT epochs of the trained cells (config.options.qat_epochs)."""
        return self._per_bits(lambda b: op.qat_epochs(self.epochs, b, b))

    def qat_temperature(self) -> float | dict | None:
        """The QAT-phase KD temperature of the trained hinton / kd cells (None without either)."""
        if not set(self.methods) & set(op.QAT_TEMPERATURE_METHODS):
            return None
        return self._per_bits(lambda b: op.qat_temperature(op.DistillOptions(qat_temperature=self.qat_temp), b, b))

    def recipe(self) -> dict:
        from ..data.options import DataOptions

        record, temperature = DataOptions(**self.read).record(), self.qat_temperature()
        return {k: v for k, v in asdict(self).items() if k in RECIPE_KEYS} | {"epochs": self.qat_epochs(),
            "data_options": record if record != DataOptions().record() else None,
            "seeds": list(self.seeds) if self.seeds else None, "config": self.config,
            "layer_bits": list(self.layer_bits) or None} | (
            {"qat_temperature": temperature} if temperature is not None else {})


@dataclass
class SweepResult:
    root: Path
    rows: list[dict]  # bench rows (one per cell and batch size), with cell, method, pareto, best
    pareto: list[dict]
    best: dict | None
    batch_size: int | None  # the batch size the Pareto set is computed at
    budgets: object | None = None
    reused: dict = field(default_factory=dict)  # cell name -> stages taken from disk


# --- layout and resume ----------------------------------------------------------------------------

def default_root(opts: SweepOptions, target_name: str) -> Path:
    return RUNS_DIR / "sweeps" / slug(dataset_name(opts.data), opts.student, target_name)


def check_recipe(root: Path, recipe: dict) -> None:
    """Record the training options in ROOT/sweep.json, or refuse a resume that changes them."""
    file = root / "sweep.json"
    if file.is_file():
        try:
            old = jsonfile.read(file).get("recipe", {})
        except (ValueError, AttributeError):
            raise EdgekdError(f"{file} is damaged (not a JSON object with the sweep's options)",
                              "delete it to start the sweep root afresh, or use another --out") from None
        diff = [f"{k} {old.get(k)!r} -> {recipe[k]!r}" for k in recipe if old.get(k) != recipe[k]]
        if diff:
            raise EdgekdError(f"sweep root {root} was made with other options ({'; '.join(diff)})",
                              "use the same options to resume, or another --out")
        return
    write_json(file, {"format": SWEEP_FORMAT, "recipe": recipe})


# --- the sweep ---------------------------------------------------------------------------------------

def run_sweep(opts: SweepOptions, log: Log = quiet, settings=None) -> SweepResult:
    """Distill, export and bench every cell of ``opts`` under its root; mark the Pareto set and
    the best configuration under the profile's budgets. ``settings`` overrides the profile's
    bench settings (tests use it to time briefly)."""
    from .. import bench, catalog

    check_lists(opts)
    check_qat(opts)
    if opts.layer_bits:  # as is a bad --layer-bits rule
        from ..config.layerbits import rules_from

        rules_from(list(opts.layer_bits))
    check_models(opts)
    config_digest = check_config(opts)
    target = catalog.load_target(opts.target)
    prof = catalog.load_profile(opts.profile) if opts.profile else None
    budgets = prof.budgets if prof else None
    settings = settings or bench.resolve_settings(prof)
    root = Path(opts.root) if opts.root else default_root(opts, target.name)
    check_output(root, "sweep", overwrite=opts.overwrite)
    check_recipe(root, opts.recipe() | {"target": target.name}
                 | ({"config_sha256": config_digest} if config_digest else {}))
    rows: list[dict] = []
    for cell in opts.cells():
        source = _source(cell, opts, root)
        rows.extend(run_cell(cell, opts, root, settings, budgets, prof.name if prof else None, log, source))
    batch = settings.batch_sizes[0] if settings.batch_sizes else None
    front, best = pareto_front(rows, batch), best_under_budget(rows)
    for r in rows:
        r["pareto"] = any(r is f for f in front)
        r["best"] = r is best
    return SweepResult(root=root, rows=rows, pareto=front, best=best, batch_size=batch, budgets=budgets)


def check_lists(opts: SweepOptions) -> None:
    """Every bit width, method and seed of the sweep, before any work: a bad value is one error (the
    bounds of --bits and --seed, a known method), as is an empty list or a value listed twice."""
    from ..kd import LOSSES

    for option, values in (("--bits", opts.bits), ("--methods", opts.methods), ("--seeds", opts.seeds)):
        if values is not None and not values:
            raise EdgekdError(f"{option} lists no value", "give at least one, e.g. " +
                              {"--bits": "--bits 8,4", "--methods": "--methods hinton,none", "--seeds": "--seeds 0,1"}[option])
        twice = next((v for i, v in enumerate(values or ()) if v in tuple(values)[:i]), None)
        if twice is not None:
            raise EdgekdError(f"{option} lists {op.shown(twice)} twice", "list each value once")
    for bits in opts.bits:
        op.check("bits", bits, "every bit width of --bits")
    for method in opts.methods:  # a misspelt method is a usage error, not one error row per cell
        if not isinstance(method, str):
            raise EdgekdError(f"--methods takes method names, got {op.shown(method)}")
        if method == "fp32":  # a baseline cell, but not a method: alone it made a sweep of no cell
            raise EdgekdError("--methods lists fp32, which is not a method", "add the fp32 reference with --reference")
        if method not in BASELINES:
            LOSSES.get(method)
    if not [m for m in opts.methods if m not in BASELINES] and ("ptq" in opts.methods or opts.reference):
        raise EdgekdError(f"{'ptq' if 'ptq' in opts.methods else '--reference'} takes the float student of a "
                          "trained method, and --methods lists none", "add one, e.g. --methods none,ptq")
    for seed in opts.seeds or ():
        op.check("seed", seed, "every seed of --seeds")
    op.check("seed", opts.seed, "--seed")


def check_qat(opts: SweepOptions) -> None:
    """--qat-temperature and --qat-lr as distill checks them: in bounds, and a QAT temperature only
    for a sweep with a hinton or kd cell (it goes to those cells; the others have no such T)."""
    op.check("qat_temperature", opts.qat_temp, "--qat-temperature")
    op.check("qat_lr", opts.qat_lr, "--qat-lr")
    if opts.qat_temp is not None and not set(opts.methods) & set(op.QAT_TEMPERATURE_METHODS):
        raise EdgekdError(f"--qat-temperature sets the QAT-phase temperature of the "
                          f"{' or '.join(op.QAT_TEMPERATURE_METHODS)} cells, and --methods lists neither",
                          "leave it out, or add one of them to --methods")


def check_models(opts: SweepOptions) -> None:
    """The student and teacher specs, before any cell: empty, an unknown built-in name or a weights file
    that is not there is one usage error, not an error row per cell."""
    from .. import models
    from .teachers import teacher_specs

    arch, file = models.split_weights(opts.student)
    if file is not None:
        models.check_input(Path(file), "student weights file", "check the path in --student ARCH=WEIGHTS")
        _no_code_named(arch, file, "--student")
    elif ":" not in arch:
        models.ARCHS.get(arch)
    for spec in teacher_specs(opts.teacher):
        arch, file = models.split_weights(spec) if spec is not None else (None, None)
        if file is not None:
            models.check_input(Path(file), "teacher checkpoint")
            _no_code_named(arch, file, "--teacher")


def _no_code_named(arch: str | None, file: str, flag: str) -> None:
    """A checkpoint given without its architecture (``--teacher FILE``) that names code: every cell
    would refuse it (a sweep has no --trust-code), so the sweep refuses it once, before any work."""
    from .. import models

    if arch is not None:  # ARCH=FILE: the architecture named on the command line
        return
    named = models.load_checkpoint(file)["meta"].get("arch")
    if models.names_code(named):
        raise models.UntrustedCodeError(f"{file} names the model {op.shown(named, 80)}, which is code "
                                        "(module:callable); a sweep runs no code a file names",
                                        f"name it on the command line: {flag} {op.shown(named, 80)[1:-1]}={file}")


def check_config(opts: SweepOptions) -> str | None:
    """The sha256 of the --config recipe (recorded, so that a resume with an edited recipe is refused),
    after checking it as distill would, before any cell: its values and terms, no code named in it
    (a sweep has no --trust-code), no key the sweep decides (SWEEP_DECIDES, [[loss]] terms: the cells
    take their method from --methods), its method parameters valid for every trained method."""
    if not opts.config:
        return None
    import hashlib

    from ..config import recipe
    from ..kd import Objective
    from ..models import check_trusted, split_weights
    from .distill import parse_recipe

    text = recipe.read(opts.config)
    options, terms = parse_recipe(text, str(opts.config))
    decided = [k for k in SWEEP_DECIDES if k in options] + (["[[loss]]"] if terms else [])
    if decided:
        raise EdgekdError(f"{opts.config} sets {', '.join(decided)}, which the sweep decides (per cell: bits, "
                          "method and seed; the rest from its own options)",
                          "remove them from the recipe and give them to edgekd sweep (--bits, --methods, "
                          "--seeds, --layer-bits, ...)")
    for arch in [split_weights(a)[0] for a in options.get("assistants") or []]:
        check_trusted(arch, f"{opts.config}: assistants", f"--assistant {arch}", False)
    for method in [m for m in opts.methods if m not in BASELINES]:
        try:
            Objective.single(method, **(options.get("params") or {}))
        except EdgekdError as e:
            raise EdgekdError(f"{opts.config}: params: {e.message} (the recipe's params go to every method "
                              "of --methods)", e.hint) from None
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _source(cell: Cell, opts: SweepOptions, root: Path) -> Path | None:
    """The run a cell takes its float student from: for a baseline, the seed's first trained method
    (none preferred: a plain float student) at the first bit width; for a trained cell at a later bit
    width, the same method's first cell, when its float phase can be shared."""
    trained = [m for m in opts.methods if m not in BASELINES]
    if cell.method in BASELINES:
        method = "none" if "none" in trained else (trained[0] if trained else None)
        return root / "runs" / Cell(opts.bits[0], method, cell.seed, cell.tagged).name if method else None
    if cell.bits == opts.bits[0] or not shares_float_phase(cell.method) or opts.config:
        return None
    return root / "runs" / Cell(opts.bits[0], cell.method, cell.seed, cell.tagged).name


def summary(result: SweepResult) -> list[str]:
    """Lines under the sweep table: the Pareto set and the best configuration under budget."""
    from ..bench.report import bits_label

    def describe(r: dict) -> str:
        return (f"{r['cell']} ({bits_label(r)}, batch {r.get('batch_size')}): accuracy {100 * r['accuracy']:.2f}%, "
                f"p50 {r['latency_ms']['p50']:.3g} ms, {r['size_mb']:.3g} MB")

    lines = []
    groups = [g for g in spread(result.rows, result.batch_size) if g["seeds"] > 1]
    if groups:
        lines.append("accuracy over seeds (mean, min..max):")
        lines += [f"  W{g['bits']}A{g['bits']} {g['method']}: {100 * g['mean']:.2f}% "
                  f"({100 * g['min']:.2f}..{100 * g['max']:.2f}, {g['seeds']} seeds)" for g in groups]
    lines.append(f"Pareto set at batch {result.batch_size} (higher accuracy, lower p50 latency, smaller size):")
    lines += [f"  {describe(r)}" for r in result.pareto] or ["  (no measured cell)"]
    if result.best is not None:
        what = "meets every budget of the profile" if result.budgets is not None else "no profile: best accuracy"
        lines.append(f"best: {describe(result.best)} - {what}")
    else:
        lines.append("best: no configuration meets the profile's budgets" if result.budgets is not None
                     else "best: no measured cell")
    return lines
