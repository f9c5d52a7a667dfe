"""Every option of the commands in one table: default, type, bounds and help, checked and worded once.

The CLI builds its flags from ``OPTIONS`` (``edgekd.cli.common.flag``), recipe files and the Python
API check values with ``check``, and the catalog takes its bit range from here. A bound is therefore
stated in one place and its error reads the same everywhere, only the spelling of the name changes
(``--weight-bits`` on the command line, ``weight_bits`` in a TOML file).

``TrainOptions`` and ``DistillOptions`` are the options of ``train`` and ``distill`` as dataclasses
whose defaults come from the table; ``validate`` checks every field of one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from ..core.errors import ConfigError

MIN_BITS, MAX_BITS = 2, 8  # what edgekd trains
SAME = "same"  # first/last layers at the same bits as the rest: the one spelling, everywhere
DEFAULT_TEACHER = "cnnfc-teacher"
DEFAULT_STUDENT = "cnnfc-student"
DEFAULT_TARGET = "onnxruntime-cpu"
# QAT epochs when --epochs is not given: 2-bit cells were still rising after 4 (README: Defaults, and why)
QAT_EPOCHS, QAT_EPOCHS_LOW_BITS, LOW_BITS = 4, 12, 3
# Hinton KD temperature of the QAT phase at LOW_BITS or fewer (README: Defaults, and why)
QAT_TEMPERATURE_LOW_BITS = 1.0
MAX_LOSS_TERMS = 64  # a recipe with more terms is refused (each term runs on every step)
MAX_SEED = 2**32 - 1  # numpy's legacy seeding and most tools take 32-bit seeds; torch's offsets stay in range
MAX_INT = 2**31 - 1  # the ceiling of integer options without their own (counts reach C code as int32/int64)
MAX_TEMPERATURE = 1000.0  # KD temperatures: T^2 of a larger float overflows long before it means anything
# the methods whose KD temperature the QAT phase sets (qat_temperature): hinton and kd, its CE + KD form
QAT_TEMPERATURE_METHODS = ("hinton", "kd")


@dataclass(frozen=True)
class Opt:
    """One option: its default, its type, its bounds and what it does."""

    name: str
    default: Any
    kind: type | tuple
    help: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself is not allowed
    hi_open: bool = False  # hi itself is not allowed
    choices: tuple = ()
    nullable: bool = False  # None is allowed (means "derived", see help)
    metavar: str | None = None
    item: dict | None = None  # lists: the kind and bounds of every element (as for an Opt)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def bound_text(self, typed: bool = False) -> str:
        """'between 2 and 8', '>= 0', 'one of a, b'; ``typed`` adds the kind ('an integer between ...')."""
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
        kind = next(text for types, text in _KIND_TEXT if set(types) & set(kinds))
        low = f"{'>' if self.lo_open else '>='} {_g(self.lo)}" if self.lo is not None else None
        high = f"{'<' if self.hi_open else '<='} {_g(self.hi)}" if self.hi is not None else None
        if low and high:
            bound = f"{low} and {high}" if self.lo_open or self.hi_open else f"between {_g(self.lo)} and {_g(self.hi)}"
        elif low or high:
            bound = low or high
        else:
            return kind
        return f"{kind} {bound}" if typed else bound


_NUM = (int, float)
_KIND_TEXT = (((float,), "a number"), ((int,), "an integer"), ((bool,), "true or false"), ((str,), "a string"),
              ((list, tuple), "a list"), ((dict,), "a table"))


def _g(x: float) -> str:
    """A bound as written: whole numbers in full (4294967295, not 4.29497e+09), others as %g."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"

OPTIONS: dict[str, Opt] = {o.name: o for o in [
    # --- what to train on and with ---
    Opt("data", "digits", str, "Dataset: digits, fashion-mnist[:DIR], npz:FILE or imagefolder:DIR "
        "(DIR/train/<class>/*, optional DIR/val/ and DIR/test/)."),
    Opt("teacher", None, (str, list), "Teacher: an edgekd checkpoint file, ARCH=WEIGHTS (e.g. "
        "torchvision:resnet18=teacher.pth), or an architecture to train once and reuse [default: cnnfc-teacher]. "
        "Repeat for a multi-teacher ensemble.", nullable=True),
    Opt("student", DEFAULT_STUDENT, str, "Student: a built-in name, torchvision:NAME, timm:NAME or module:callable "
        "(must trace with torch.fx), optionally =WEIGHTS to start from a weights file (a new head if its class "
        "count differs), or an edgekd checkpoint file."),
    Opt("arch", DEFAULT_TEACHER, str, "Architecture: a built-in name, torchvision:NAME, timm:NAME or "
        "module:callable, optionally =WEIGHTS to start from a weights file."),
    # --- how the data is read ---
    Opt("normalize", "auto", str, "Input normalization: auto (train-split mean/std), imagenet, none, or MEAN/STD "
        "with comma-separated per-channel values (0.5,0.5,0.5/0.25,0.25,0.25). Feed a pretrained teacher what it "
        "was trained with.", metavar="auto|imagenet|none|MEAN/STD"),
    Opt("image_size", None, int, "Image folders: resize the shorter side and centre-crop to N x N (training: "
        "random resized crops) [default: the images' own size, which must agree].", lo=1, nullable=True,
        metavar="N"),
    Opt("channels", None, int, "Image folders: 1 (grayscale) or 3 (RGB) [default: 1 if every image is grayscale].",
        choices=(1, 3), nullable=True),
    Opt("augment", None, str, "Training augmentation: crop+flip (random resized crop and horizontal flip), flip or "
        "none [default: crop+flip for image folders, the dataset's flips otherwise].",
        choices=("crop+flip", "flip", "none"), nullable=True),
    Opt("workers", 2, int, "Image folders: DataLoader worker processes decoding images (0: in this process).", lo=0),
    Opt("skip_bad_images", False, bool, "Image folders: skip unreadable images (counted in metrics.json) instead "
        "of stopping."),
    Opt("image_cache", "auto", str, "Image folders: decode each split once into a uint8 cache under "
        "$EDGEKD_CACHE_DIR (default ~/.cache/edgekd) and read it memory-mapped: auto (a split up to 4 GiB "
        "decoded and a quarter of the memory), on, or off (decode every epoch).", choices=("auto", "on", "off")),
    Opt("force", False, bool, "Distill even when the teacher's test accuracy is near chance."),
    Opt("eval_samples", 2000, int, "Test images stored in the bundle's eval.npz (a seeded, stratified sample) for "
        "parity and on-device accuracy; the whole test split is measured at export.", lo=1),
    Opt("target", DEFAULT_TARGET, str, "Target whose quantizer conventions the student is trained with "
        "(name, alias or .toml)."),
    # --- quantization ---
    Opt("bits", 8, int, "Weight and activation bits.", lo=MIN_BITS, hi=MAX_BITS),
    Opt("weight_bits", 8, int, "Weight bits, overriding --bits.", lo=MIN_BITS, hi=MAX_BITS),
    Opt("act_bits", 8, int, "Activation bits, overriding --bits.", lo=MIN_BITS, hi=MAX_BITS),
    Opt("first_last_bits", 8, (int, str), "Weight bits of the first and last layers, or 'same' to use "
        "--weight-bits.", lo=MIN_BITS, hi=MAX_BITS),
    Opt("layer_bits", None, list, "Per-layer bits PATTERN=WxAy (repeatable; later wins): PATTERN a layer type "
        "(depthwise, pointwise, conv, linear, first, last) or a module-path glob ('features.3.*'); W the layer's "
        "weight bits, A the bits of the activations it reads; either may be left out (depthwise=W8A8, last=W8).",
        nullable=True, item=dict(kind=(str, dict)), metavar="PATTERN=WxAy"),
    Opt("auto_bits", False, bool, "Choose each layer's weight bits after the float phase (distill --bits auto): "
        "the least total sensitivity (each layer's error at the logits, measured at every width the target "
        "accepts) under the size budget of --budget or --profile; activations keep --act-bits."),
    Opt("budget", None, str, "Size budget of --bits auto: size=SIZE, the bytes of the weights packed at their bit "
        "widths (e.g. size=20KB, size=1.5MB; KB = 1000 B, KiB = 1024 B). Latency budgets are refused: int8 runtimes "
        "run weights of 2 to 8 bits on the same kernels.", nullable=True, metavar="size=SIZE"),
    Opt("profile", None, str, "--bits auto: take the size budget from this profile's size_mb (name, alias or "
        ".toml).", nullable=True, metavar="NAME|FILE.toml"),
    # --- distillation ---
    Opt("method", "hinton", str, "Distillation method (paper defaults; see README): hinton [default], kd, mse, "
        "dkd, tfkd, fitnet, at, rkd, fsp, or none (QAT only). Ignored with a --config recipe that lists "
        "[[loss]] terms."),
    Opt("temperature", 4.0, _NUM, "KD temperature T (hinton).", lo=0, lo_open=True, hi=MAX_TEMPERATURE),
    Opt("alpha", 0.9, _NUM, "Weight of the KD term, 1-alpha on labels (hinton).", lo=0, hi=1),
    Opt("qat_temperature", None, _NUM, "KD temperature T of the QAT phase (hinton, kd) [default: the float "
        f"phase's T; {QAT_TEMPERATURE_LOW_BITS:g} when weights or activations have {LOW_BITS} bits or fewer].",
        lo=0, lo_open=True, hi=MAX_TEMPERATURE, nullable=True),
    Opt("scheme", "offline", str, "offline: a fixed teacher; born-again: each generation taught by the previous "
        "student; dml: mutual learning with float peers; assistant: teacher -> assistant(s) -> student; "
        "progressive: bit schedule 8 -> 4 -> 2, each stage distilled from the last.",
        choices=("offline", "born-again", "dml", "assistant", "progressive")),
    Opt("order", None, str, "joint: KD and QAT together from the first step (no float phase); float-first: "
        "float KD for --float-epochs, then QAT with KD. [default: float-first if --float-epochs > 0, else joint]",
        choices=("joint", "float-first"), nullable=True),
    Opt("teacher_weights", None, list, "Weight of each --teacher in the ensemble [default: equal].", nullable=True,
        item=dict(kind=_NUM, lo=0)),
    Opt("teacher_mix", "probs", str, "Ensemble: average the teachers' probabilities or their logits.",
        choices=("probs", "logits")),
    Opt("generations", 2, int, "born-again generations.", lo=1),
    Opt("peers", 1, int, "dml: number of float peers.", lo=1),
    Opt("assistants", None, list, "assistant: architecture(s) of the chain, in order [default: resnet-student].",
        nullable=True, item=dict(kind=str)),
    Opt("assistant_epochs", None, int, "Epochs per assistant [default: float + QAT epochs].", lo=1, nullable=True),
    Opt("bit_schedule", None, list, "progressive: bits per stage, e.g. 8,4 [default: 8 -> 4 -> 2 down to --bits].",
        nullable=True, item=dict(kind=int, lo=MIN_BITS, hi=MAX_BITS)),
    Opt("params", None, dict, "Hyper-parameters of --method.", nullable=True),
    Opt("loss", None, list, "Recipe terms [{name, weight, ...}].", nullable=True),
    Opt("config", None, str, "Recipe: [[loss]] terms with weights, and any distill option as a top-level key.",
        nullable=True, metavar="FILE.toml"),
    # --- schedule ---
    Opt("epochs", None, int, f"QAT epochs [default: {QAT_EPOCHS}; {QAT_EPOCHS_LOW_BITS} when weights or activations "
        f"have {LOW_BITS} bits or fewer].", lo=1, nullable=True),
    Opt("float_epochs", 12, int, "Float KD epochs before QAT (0: QAT from scratch).", lo=0),
    Opt("teacher_epochs", 10, int, "Epochs when the teacher has to be trained first.", lo=1),
    # the teacher's recipe (edgekd train, and the teacher distill trains when none is given), measured on
    # Fashion-MNIST: cnnfc-teacher reaches 93.7% in 10 epochs (README: Defaults, and why)
    Opt("teacher_lr", 0.1, _NUM, "Peak learning rate when training a teacher (one-cycle).", lo=0, lo_open=True),
    Opt("teacher_batch_size", 128, int, "Batch size when training a teacher.", lo=1),
    Opt("teacher_optimizer", "sgd", str, "Optimizer when training a teacher.", choices=("sgd", "adamw")),
    Opt("label_smoothing", 0.1, _NUM, "Label smoothing of the cross-entropy when training a teacher.", lo=0, hi=0.99),
    Opt("lr", 2e-3, _NUM, "Learning rate of the float phase (QAT uses lr/4 after a float phase).", lo=0, lo_open=True),
    Opt("qat_lr", None, _NUM, "Learning rate of QAT [default: lr/4 after a float warm start (lr for students with "
        "depthwise convolutions), else lr].",
        lo=0, lo_open=True, nullable=True),
    Opt("batch_size", 64, int, "Batch size (global, across processes).", lo=1),
    Opt("flip", None, bool, "Random horizontal flips [default: the dataset's].", nullable=True),
    Opt("cache", True, bool, "Cache the teacher's outputs when the input pipeline is deterministic."),
    Opt("train_limit", None, int, "Train on the first N training samples only.", lo=1, nullable=True),
    Opt("seed", 0, int, "Seed for splits, init and order.", lo=0, hi=MAX_SEED),
    Opt("calib_samples", 1024, int, "Training images the activation ranges are calibrated on (quantize: PTQ).", lo=1),
    Opt("device", "cpu", str, "Where to train: cpu or cuda[:N]. Multi-process: launch with 'torchrun "
        "--nproc-per-node N -m edgekd ...' (gloo on CPU, nccl on CUDA; --batch-size is the global batch).",
        metavar="cpu|cuda[:N]"),
    Opt("amp", False, bool, "bfloat16 mixed precision for the float phases on CUDA (QAT stays float32)."),
    Opt("progress", True, bool, "Show progress bars."),
    # --- bench settings (profiles' [bench] tables take the same bounds) ---
    # (upper bounds: sane limits; bench also runs at most as many threads as this machine has CPUs)
    Opt("threads", 0, int, "Intra-op threads; 0 lets the runtime choose (more than the CPUs here: cut to them, "
        "said in the row).", lo=0, hi=1024),
    Opt("warmup", 10, int, "Minimum number of warm-up runs.", lo=0, hi=100_000),
    Opt("warmup_s", 0.2, _NUM, "Minimum warm-up time in seconds.", lo=0, hi=600, metavar="SECONDS"),
    Opt("iterations", 100, int, "Minimum number of timed runs.", lo=1, hi=1_000_000),
    Opt("min_time_s", 1.0, _NUM, "Minimum timed duration in seconds.", lo=0, hi=3600, metavar="SECONDS"),
    Opt("batch_sizes", (1,), (list, tuple), "Batch size to time (repeatable, at most 16); overrides the profile's "
        "list.", item=dict(kind=int, lo=1, hi=4096)),
]}


def default(name: str):
    return OPTIONS[name].default


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def shown(value, limit: int = 100) -> str:
    """``repr(value)`` for an error line: an integer too long to print by its size, long texts cut."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 100:
        digits = int((value.bit_length() - 1) * 0.30102999566) + 1  # the fewest its bit length allows
        return f"an integer of {digits + (abs(value) >= 10**digits)} digits"
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # Python's int-str limit inside a list; deep nesting
        return f"a {type(value).__name__} too large to show"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check(name: str, value, label: str | None = None):
    """``value`` if it is a valid ``name`` option, else one ConfigError worded from the table.

    ``label``: how the user spelled the option (``--weight-bits``, ``recipe.toml: weight_bits``);
    default the CLI flag. Numbers must be finite; ``first_last_bits`` also takes "same"."""
    opt = OPTIONS[name]
    label = label or opt.flag
    if value is None and opt.nullable:
        return value
    if name == "first_last_bits" and value == SAME:
        return value
    if name == "first_last_bits" and value is None:  # checkpoints written before "same" existed
        return SAME
    kinds = opt.kind if isinstance(opt.kind, tuple) else (opt.kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds) \
            or (name == "first_last_bits" and isinstance(value, str)):
        expected = opt.bound_text(typed=True) + (" or 'same'" if name == "first_last_bits" else "")
        raise ConfigError(f"{label} must be {expected}, got {shown(value)}")
    if _is_number(value):
        check_number(opt, value, label)
    if isinstance(value, (list, tuple)) and opt.item:
        element = Opt(name, None, help="", **opt.item)
        for v in value:
            if (isinstance(v, bool) and element.kind is not bool) or not isinstance(v, element.kind):
                raise ConfigError(f"every item of {label} must be {element.bound_text(typed=True)}, got {shown(v)}")
            if _is_number(v):
                check_number(element, v, f"every item of {label}")
    if opt.choices and value not in opt.choices:
        from ..core.registry import suggest

        raise ConfigError(f"{label} must be {opt.bound_text()}, got {shown(value)}"
                          f"{suggest(str(value)[:100], opt.choices)}")
    return value


def check_number(opt: Opt, value, label: str) -> None:
    """Finite, within the bounds; an integer without an upper bound at most MAX_INT (a count), or one
    that converts to a float (a float option given as a whole number)."""
    kinds = opt.kind if isinstance(opt.kind, tuple) else (opt.kind,)
    count = float not in kinds and isinstance(value, int)  # compared exactly, however long
    if not count and not finite(value):
        raise ConfigError(f"{label} must be a finite number, got {shown(value)}")
    low = opt.lo is not None and (value <= opt.lo if opt.lo_open else value < opt.lo)
    if low or (opt.hi is not None and (value >= opt.hi if opt.hi_open else value > opt.hi)):
        suffix = " or 'same'" if opt.name == "first_last_bits" else ""
        raise ConfigError(f"{label} must be {opt.bound_text()}{suffix}, got {shown(value)}")
    if opt.hi is None and float not in kinds and abs(value) > MAX_INT:
        raise ConfigError(f"{label} must be at most {MAX_INT}, got {shown(value)}")


def finite(value) -> bool:
    """A float that is not inf or nan, or an integer a float can hold (more digits overflow float())."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def qat_epochs(epochs: int | None, weight_bits: int, act_bits: int) -> int:
    """The QAT epochs of a run: ``epochs`` when given, else QAT_EPOCHS, or QAT_EPOCHS_LOW_BITS when the
    weights or the activations have LOW_BITS or fewer."""
    if epochs is not None:
        return epochs
    return QAT_EPOCHS_LOW_BITS if min(weight_bits, act_bits) <= LOW_BITS else QAT_EPOCHS


def qat_temperature(opts, weight_bits: int, act_bits: int) -> float | None:
    """The KD temperature of the QAT phase for the hinton and kd terms (QAT_TEMPERATURE_METHODS; None
    when the objective is another method): the one given, else QAT_TEMPERATURE_LOW_BITS at LOW_BITS or
    fewer, else the float phase's (``--param temperature``, else hinton's ``temperature``; kd's paper
    T is hinton's). A recipe's [[loss]] terms take only a given one. Given for another method: an error."""
    given = opts.qat_temperature
    if opts.loss:
        return given
    if opts.method not in QAT_TEMPERATURE_METHODS:
        if given is not None:
            raise ConfigError(f"--qat-temperature (qat_temperature) sets the QAT-phase temperature of --method "
                              f"{' or '.join(QAT_TEMPERATURE_METHODS)}, not of {opts.method!r}",
                              "leave it out, or set the method's own parameters with --param")
        return None
    if given is not None:
        return given
    if min(weight_bits, act_bits) <= LOW_BITS:
        return QAT_TEMPERATURE_LOW_BITS
    float_phase = opts.temperature if opts.method == "hinton" else default("temperature")
    return (opts.params or {}).get("temperature", float_phase)


def check_bits(weight_bits, act_bits, weight_label="--weight-bits", act_label="--act-bits") -> tuple[int, int]:
    check("weight_bits", weight_bits, weight_label)
    check("act_bits", act_bits, act_label)
    return weight_bits, act_bits


def validate(opts, where: str = "") -> None:
    """Check every field of a TrainOptions / DistillOptions against the table."""
    for f in fields(opts):
        if f.name in OPTIONS:
            check(f.name, getattr(opts, f.name), f"{where}{f.name}" if where else None)


@dataclass
class ReadOptions:
    """How the data set is read: shared by ``train`` and ``distill`` (edgekd.data.DataOptions)."""

    normalize: str = default("normalize")
    image_size: int | None = default("image_size")
    channels: int | None = default("channels")
    augment: str | None = default("augment")
    workers: int = default("workers")
    skip_bad_images: bool = default("skip_bad_images")
    image_cache: str = default("image_cache")


@dataclass
class TrainOptions(ReadOptions):
    data: str = default("data")
    arch: str = default("arch")
    epochs: int = default("teacher_epochs")
    lr: float = default("teacher_lr")
    batch_size: int = default("teacher_batch_size")
    optimizer: str = default("teacher_optimizer")
    label_smoothing: float = default("label_smoothing")
    seed: int = default("seed")
    progress: bool = default("progress")
    device: str = default("device")
    amp: bool = default("amp")


@dataclass
class DistillOptions(ReadOptions):
    """Options of ``distill``. Method hyper-parameters default to their papers (see edgekd.kd)."""

    data: str = default("data")
    teacher: str | list[str] | None = default("teacher")  # several: an ensemble
    student: str = default("student")
    weight_bits: int = default("weight_bits")
    act_bits: int = default("act_bits")
    target: str = default("target")
    method: str = default("method")  # a name in kd.LOSSES; ignored when ``loss`` (a recipe) is given
    temperature: float = default("temperature")  # hinton only (other methods: params)
    alpha: float = default("alpha")  # hinton only
    qat_temperature: float | None = default("qat_temperature")  # hinton's T in QAT; None: qat_temperature()
    epochs: int | None = default("epochs")  # QAT epochs; None: qat_epochs() of the bits
    float_epochs: int = default("float_epochs")  # float KD epochs first (order float-first)
    teacher_epochs: int = default("teacher_epochs")
    lr: float = default("lr")
    qat_lr: float | None = default("qat_lr")  # None: lr / 4 after a float warm start, lr without one
    batch_size: int = default("batch_size")
    first_last_bits: int | str = default("first_last_bits")  # or "same"
    layer_bits: list | None = default("layer_bits")  # per-layer rules (quant.layerbits), in order
    auto_bits: bool = default("auto_bits")  # --bits auto: weight bits chosen per layer (quant.autobits)
    budget: str | None = default("budget")  # its size budget (config.budget), or
    profile: str | None = default("profile")  # the profile whose size_mb is
    seed: int = default("seed")
    progress: bool = default("progress")
    params: dict = field(default_factory=dict)  # the method's hyper-parameters, e.g. {"beta": 8.0} for dkd
    loss: list[dict] | None = None  # recipe terms [{"name": ..., "weight": ..., **params}]
    config: str | None = None  # recipe TOML (loss terms and options)
    order: str | None = default("order")  # joint | float-first; None: float-first when float_epochs > 0
    scheme: str = default("scheme")
    teacher_weights: list[float] | None = None
    teacher_mix: str = default("teacher_mix")
    generations: int = default("generations")
    peers: int = default("peers")
    assistants: list[str] = field(default_factory=lambda: ["resnet-student"])  # assistant chain, in order
    assistant_epochs: int | None = default("assistant_epochs")
    bit_schedule: list[int] | None = default("bit_schedule")
    flip: bool | None = default("flip")  # None: the dataset's default
    cache: bool = default("cache")
    train_limit: int | None = default("train_limit")
    device: str = default("device")
    amp: bool = default("amp")
    force: bool = default("force")  # distill even when the teacher is near chance
