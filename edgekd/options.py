"""The options of the training commands (``train``, ``distill``) as plain dataclasses.

Shared by api.py (which runs them) and recipe.py (which fills them from a TOML file); the CLI
builds them from its flags. Method hyper-parameters default to their papers (see edgekd.losses).
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_TEACHER = "cnn-teacher"
DEFAULT_STUDENT = "cnn-student"
DEFAULT_TARGET = "onnxruntime-cpu"


@dataclass
class TrainOptions:
    data: str = "digits"
    arch: str = DEFAULT_TEACHER
    epochs: int = 20
    lr: float = 2e-3
    batch_size: int = 64
    seed: int = 0
    progress: bool = True
    device: str = "cpu"
    amp: bool = False


@dataclass
class DistillOptions:
    """Options of ``distill``. Method hyper-parameters default to their papers (see edgekd.losses)."""

    data: str = "digits"
    teacher: str | list[str] | None = None  # several: an ensemble (see teacher_weights, teacher_mix)
    student: str = DEFAULT_STUDENT
    weight_bits: int = 8
    act_bits: int = 8
    target: str = DEFAULT_TARGET
    method: str = "hinton"  # a name in losses.LOSSES; ignored when ``loss`` (a recipe) is given
    temperature: float = 4.0  # hinton only (other methods: params)
    alpha: float = 0.9  # hinton only
    epochs: int = 8  # QAT epochs
    float_epochs: int = 8  # float KD epochs first (order float-first): QAT then starts from a trained float student
    teacher_epochs: int = 20
    lr: float = 2e-3
    qat_lr: float | None = None  # None: lr / 4 after a float warm start, lr without one
    batch_size: int = 64
    first_last_bits: int | None = 8
    seed: int = 0
    progress: bool = True
    params: dict = field(default_factory=dict)  # the method's hyper-parameters, e.g. {"beta": 8.0} for dkd
    loss: list[dict] | None = None  # recipe terms [{"name": ..., "weight": ..., **params}]
    config: str | None = None  # recipe TOML (loss terms and options)
    order: str | None = None  # joint | float-first; None: float-first when float_epochs > 0, else joint
    scheme: str = "offline"  # offline | born-again | dml | assistant | progressive
    teacher_weights: list[float] | None = None
    teacher_mix: str = "probs"  # probs | logits
    generations: int = 2  # born-again
    peers: int = 1  # dml
    assistants: list[str] = field(default_factory=lambda: ["resnet-student"])  # assistant chain, in order
    assistant_epochs: int | None = None  # None: float_epochs + epochs
    bit_schedule: list[int] | None = None  # progressive; None: 8 -> 4 -> 2 down to the run's bits
    flip: bool | None = None  # random flips; None: the dataset's default (teacher cache needs them off)
    cache: bool = True  # cache teacher outputs when the input pipeline is deterministic
    train_limit: int | None = None  # train on the first N training samples only (quick experiments)
    device: str = "cpu"  # cpu, cuda or cuda:N
    amp: bool = False  # bfloat16 autocast for the float phases on CUDA (QAT stays float32)
