"""The operations behind the CLI as plain functions: train, distill, export.

They return values and raise edgekd.errors types; they never print or exit. ``log`` callbacks
receive one human-readable line at a time (the CLI sends them to stderr).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

from . import __version__
from .errors import EdgekdError, MissingFileError
from .fsutil import BUNDLES_DIR, RUNS_DIR, atomic_dir, latest, write_json, write_text
from .options import DEFAULT_TEACHER, DistillOptions, TrainOptions

Log = Callable[[str], None]
# Bumped whenever a built-in architecture changes in a way its weights' shapes do not show
# (e.g. a stride), so that an old cached teacher is never reused with the wrong semantics.
TEACHER_CACHE_VERSION = "v2"


def _quiet(_: str) -> None:
    pass


def _slug(*parts) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(str(p) for p in parts)).strip("-").lower()


def _dataset_name(spec: str) -> str:
    return spec.split(":", 1)[0] if not spec.startswith("npz:") else Path(spec[4:]).stem


# ---- teacher -------------------------------------------------------------------------------------

def _check_device(device: str) -> None:
    import torch

    if device == "cpu":
        return
    if not device.startswith("cuda"):
        raise EdgekdError(f"unknown device {device!r}", "use --device cpu or --device cuda[:N]")
    if not torch.cuda.is_available():
        raise EdgekdError(f"--device {device}: this PyTorch sees no CUDA GPU", "use --device cpu")


def _join_group(opts) -> tuple[bool, bool]:
    """Check the device and join torchrun's process group, if launched so. Returns (joined it now:
    the caller shuts it down, this process is rank 0: it logs)."""
    from . import distributed as dd

    _check_device(opts.device)
    joined = dd.init_from_env(opts.device)
    return joined, dd.is_main()


def _options(opts) -> dict:
    """The options that define a run's result (a resumed run must have the same)."""
    return {k: v for k, v in asdict(opts).items() if k != "progress"}


def train(opts: TrainOptions, out: Path | None = None, log: Log = _quiet, resume: bool | str = False) -> dict:
    """Train a float model (a teacher) and save it as an edgekd checkpoint; returns its metrics.

    ``resume``: True continues an interrupted run (checkpoint.py), "auto" does so when its
    checkpoints match these options. Under torchrun every rank trains (DDP), rank 0 writes."""
    from . import distributed as dd, models, train as tr
    from .checkpoint import RunCheckpoints, partial_dir
    from .data import load_dataset

    joined, loud = _join_group(opts)
    log = log if loud else _quiet
    try:
        tr.set_threads()
        data = load_dataset(opts.data, seed=opts.seed)
        model = models.build_model(opts.arch, data.num_classes, data.input_shape)
        out = Path(out) if out else teacher_dir(opts.data, opts.arch, opts.seed, opts.epochs)
        ckpts = RunCheckpoints(partial_dir(out), _options(opts), resume, log)
        log(f"training {opts.arch} ({models.count_params(model):,} parameters) on {opts.data} for {opts.epochs} epochs"
            + (f" on {dd.world()} processes" if dd.world() > 1 else ""))
        cfg = tr.FitConfig(epochs=opts.epochs, lr=opts.lr, batch_size=opts.batch_size, seed=opts.seed,
                           flip=data.flip_augment, progress=opts.progress, desc="teacher", device=opts.device, amp=opts.amp)
        from .losses import make_loss

        result = tr.fit(model, data, cfg, make_loss("none"), on_epoch=lambda r: log(_epoch_line("teacher", r)),
                        checkpoint=ckpts.phase("teacher"))
        metrics = {"accuracy": tr.accuracy(model, data.test, sharded=True), "val_accuracy": result.best_val_accuracy,
                   "best_epoch": result.best_epoch, "seconds": result.seconds, "history": result.history,
                   "params": models.count_params(model), "processes": dd.world(), **_options(opts)}
        meta = _model_meta(opts.arch, data, opts.data, opts.seed) | {"accuracy": metrics["accuracy"]}
        if dd.is_main():
            with atomic_dir(out) as tmp:
                models.save_checkpoint(tmp / "model.pt", model.state_dict(), meta)
                write_json(tmp / "metrics.json", metrics)
        ckpts.finish()
        log(f"teacher test accuracy {metrics['accuracy']:.4f}; saved {out / 'model.pt'}")
        return metrics | {"path": str(out / "model.pt")}
    finally:
        if joined:
            dd.shutdown()




def teacher_dir(data: str, arch: str, seed: int, epochs: int) -> Path:
    """Where ``train`` keeps a teacher by default, and where ``distill`` looks for one to reuse."""
    return RUNS_DIR / "teachers" / _slug(TEACHER_CACHE_VERSION, _dataset_name(data), arch, f"s{seed}", f"e{epochs}")


def _model_meta(arch: str, data, data_spec: str, seed: int) -> dict:
    return {"arch": arch, "num_classes": data.num_classes, "input_shape": list(data.input_shape),
            "dataset": data_spec, "seed": seed, "classes": data.classes,
            "normalization": {"mean": data.mean, "std": data.std}, "edgekd_version": __version__}


def _epoch_line(what: str, r: dict) -> str:
    star = " *" if r.get("best") else ""
    return (f"{what} epoch {r['epoch']}: loss {r['loss']:.4f}, train acc {r['train_accuracy']:.4f}, "
            f"val acc {r['val_accuracy']:.4f} ({r['seconds']:.0f}s){star}")


def resolve_teacher(spec: str | None, data, opts: "DistillOptions", log: Log):
    """A teacher model: a checkpoint file, or an architecture trained once and cached."""
    from . import models

    if spec and Path(spec).is_file():
        model, meta = models.load_model(spec, expect_classes=data.num_classes)
        _check_same_input(meta, data, spec)
        return model, meta.get("accuracy"), spec
    if spec and (spec.endswith((".pt", ".pth", ".safetensors")) or "/" in spec):
        raise MissingFileError(f"teacher checkpoint not found: {spec}", "check the path, or train one with 'edgekd train'")
    arch = spec or DEFAULT_TEACHER
    topts = TrainOptions(data=opts.data, arch=arch, epochs=opts.teacher_epochs, seed=opts.seed, progress=opts.progress,
                         device=opts.device, amp=opts.amp)
    path = teacher_dir(opts.data, arch, opts.seed, opts.teacher_epochs) / "model.pt"
    if path.is_file():
        log(f"reusing teacher {path}")
    else:
        # a teacher's options define it fully: an interrupted teacher run with the same options continues
        path = Path(train(topts, out=path.parent, log=log, resume="auto")["path"])
    model, meta = models.load_model(path, expect_classes=data.num_classes)
    return model, meta.get("accuracy"), str(path)


def resolve_teachers(opts: "DistillOptions", data, log: Log):
    """One teacher, or several averaged into a schemes.Ensemble (``teacher_weights``, ``teacher_mix``)."""
    from . import train as tr
    from .schemes import Ensemble

    specs = _teacher_specs(opts.teacher)
    found = [resolve_teacher(spec, data, opts, log) for spec in specs]
    for model, acc, src in found:
        log(f"teacher {src}: test accuracy {acc if acc is not None else tr.accuracy(model, data.test):.4f}")
    if len(found) == 1 and not opts.teacher_weights:
        model, acc, src = found[0]
        return model, acc if acc is not None else tr.accuracy(model, data.test), src
    model = Ensemble([m for m, _, _ in found], opts.teacher_weights, opts.teacher_mix).eval()
    acc = tr.accuracy(model, data.test)
    log(f"teacher ensemble of {len(found)} ({opts.teacher_mix} averaged): test accuracy {acc:.4f}")
    return model, acc, "+".join(src for _, _, src in found)


def _teacher_specs(teacher) -> list[str | None]:
    if teacher is None or isinstance(teacher, str):
        return [teacher]
    return list(teacher) or [None]


def _check_same_input(meta: dict, data, source: str) -> None:
    from .errors import IncompatibleError

    if tuple(meta["input_shape"]) != tuple(data.input_shape):
        raise IncompatibleError(f"teacher {source} takes inputs of shape {tuple(meta['input_shape'])} but the dataset's "
                                f"are {tuple(data.input_shape)}", "use a teacher trained on the same dataset")


# ---- distill -------------------------------------------------------------------------------------

def _with_recipe(opts: DistillOptions) -> DistillOptions:
    """Options completed from ``opts.config``: the file fills what the caller left at its default."""
    from dataclasses import fields as dc_fields

    from . import recipe

    if not opts.config:
        return opts
    options, terms = recipe.load(opts.config)
    defaults = DistillOptions()
    explicit = {f.name for f in dc_fields(opts) if getattr(opts, f.name) != getattr(defaults, f.name)}
    opts = recipe.apply(opts, options, explicit)
    return replace(opts, loss=terms) if opts.loss is None and terms else opts


def _limit(data, n: int | None):
    """The dataset with only its first ``n`` training samples (the split is already shuffled)."""
    if n:
        from .data import Split

        data.train = Split(data.train.x[:n], data.train.y[:n])
    return data


def objective_factory(opts: DistillOptions):
    """A function building a fresh losses.Objective (every student gets its own adapters)."""
    from .losses import Objective

    if opts.loss:
        factory = lambda: Objective.from_specs(opts.loss)  # noqa: E731
    else:
        params = dict(opts.params)
        if opts.method == "hinton":
            params = {"temperature": opts.temperature, "alpha": opts.alpha} | params
        factory = lambda: Objective.single(opts.method, **params)  # noqa: E731
    factory()  # fail early on a bad method or parameter
    return factory


def _spec(opts: DistillOptions, log: Log):
    from . import catalog, quant

    target = catalog.load_target(opts.target)
    spec = quant.spec_for_target(target, opts.weight_bits, opts.act_bits, opts.first_last_bits)
    if spec.weight_bits != opts.weight_bits or spec.first_last_bits != opts.first_last_bits:
        log(f"warning: target {target.name} uses reduce_range: weights are trained with at most 7 bits "
            f"(W{spec.weight_bits}, first/last layers {spec.first_last_bits or spec.weight_bits}) because ONNX "
            "Runtime's x86 int8 kernels saturate with 8-bit weights on CPUs without VNNI; on ARM use --target rpi")
    findings = _preflight(target, spec)
    for finding in findings:
        if finding["level"] != "error":
            log(f"{finding['level']}: {finding['message']}")
    errors = [f for f in findings if f["level"] == "error"]
    if errors:  # the exported model would not run on the target: stop before any training
        from .errors import IncompatibleError

        raise IncompatibleError(f"{spec.label} cannot be deployed to {target.name}: "
                                + "; ".join(f["message"] for f in errors),
                                "; ".join(f["suggestion"] for f in errors if f["suggestion"]) or None)
    return target, spec


def distill(opts: DistillOptions, out: Path | None = None, log: Log = _quiet, resume: bool = False) -> dict:
    """Quantized distillation: KD from the teacher while training the student with Brevitas QAT.

    The scheme (edgekd.schemes) decides who teaches whom; the objective (edgekd.losses, from
    ``method`` or a recipe) what is matched; ``order`` whether float KD precedes QAT. Training
    state is checkpointed in ``OUT.partial`` after every epoch and on SIGINT/SIGTERM; ``resume``
    continues from it. Under torchrun every rank trains (DDP) and rank 0 writes.
    """
    joined, loud = _join_group(opts)
    try:
        return _distill(opts, out, log if loud else _quiet, resume)
    finally:
        if joined:
            from . import distributed as dd

            dd.shutdown()


def _distill(opts: DistillOptions, out: Path | None, log: Log, resume: bool) -> dict:
    from . import distributed as dd, models, quant, schemes, train as tr
    from .checkpoint import RunCheckpoints, partial_dir
    from .data import load_dataset

    tr.set_threads()
    opts = _with_recipe(opts)
    order = schemes.resolve_order(opts.order, opts.float_epochs)
    scheme = schemes.SCHEMES.get(opts.scheme)
    target, spec = _spec(opts, log)
    new_objective = objective_factory(opts)
    objective = new_objective()
    data = _limit(load_dataset(opts.data, seed=opts.seed), opts.train_limit)
    if opts.flip is not None:
        data.flip_augment = opts.flip
    # Check the student before any teacher training: a typo or an untraceable model fails in seconds.
    float_model = models.build_model(opts.student, data.num_classes, data.input_shape)
    quant.trace(float_model)
    method = opts.method if not opts.loss else objective.name
    name = _slug(_dataset_name(opts.data), opts.student, spec.label.lower(), method,
                 *([opts.scheme] if opts.scheme != "offline" else []))
    out = Path(out) if out else RUNS_DIR / name
    ckpt_opts = _options(replace(opts, order=order))
    RunCheckpoints.resumable(partial_dir(out), ckpt_opts, resume)  # a --resume that cannot continue fails now
    teacher, teacher_acc, teacher_src = None, None, None
    if (objective.needs_teacher and opts.scheme != "dml") or opts.scheme == "assistant":
        teacher, teacher_acc, teacher_src = resolve_teachers(opts, data, log)
    lines = []
    logf = lambda s: (lines.append(s), log(s))  # noqa: E731
    checkpoints = RunCheckpoints(partial_dir(out), ckpt_opts, resume, logf)
    logf(f"method {method} ({', '.join(f'{w:g} x {n}' for n, w, _ in objective.terms)}), scheme {opts.scheme}, "
         f"order {order}" + (f", {dd.world()} processes (global batch {opts.batch_size})" if dd.world() > 1 else ""))
    run = schemes.Run(opts=replace(opts, order=order), data=data, spec=spec, new_objective=new_objective,
                      teacher=teacher, log=logf, checkpoints=checkpoints)
    result = scheme(run)
    qmodel = result.student
    student_acc = tr.accuracy(qmodel, data.test, sharded=True)
    logf(f"{spec.label} student test accuracy (fake-quant, PyTorch) {student_acc:.4f}")
    metrics = {"teacher_accuracy": teacher_acc, "student_accuracy": student_acc,
               "student_float_accuracy": result.float_accuracy, "val_accuracy": result.val_accuracy,
               "weight_bits": spec.weight_bits, "act_bits": spec.act_bits, "method": method,
               "epochs": opts.epochs, "float_epochs": result.float_epochs, "dataset": opts.data,
               "student": opts.student, "student_params": models.count_params(float_model), "target": target.name,
               "scheme": opts.scheme, "order": order, "loss": (run.objectives or [objective])[-1].describe(), "teacher": teacher_src,
               "teacher_cache": bool(run.cache_used) and all(run.cache_used), "processes": dd.world(),
               "seconds": result.seconds, "history": run.history}
    meta = _model_meta(opts.student, data, opts.data, opts.seed) | {"quant": spec.to_dict(), "target": target.name}
    recipe = asdict(opts) | {"float_epochs": result.float_epochs, "qat_lr": result.qat_lr, "target": target.name,
                             "order": order, "loss": metrics["loss"]}
    recipe.pop("progress")
    if dd.is_main():
        with atomic_dir(out) as tmp:
            models.save_checkpoint(tmp / "student.pt", qmodel.state_dict(), meta)
            write_json(tmp / "recipe.json", recipe)
            write_json(tmp / "metrics.json", metrics)
            write_text(tmp / "log.txt", "\n".join(lines) + "\n")
    checkpoints.finish()
    return metrics | {"run_dir": str(out)}


def list_layers(opts: DistillOptions) -> dict:
    """The layer names feature terms can use: the student's (those that run both in float and
    quantized at the run's bits) and the teacher's (its first ``--teacher``)."""
    import torch

    from . import models, quant
    from .data import load_dataset
    from .features import layer_table

    opts = _with_recipe(opts)
    data = load_dataset(opts.data, seed=opts.seed)
    _, spec = _spec(opts, _quiet)
    x = torch.from_numpy(data.train.x[:2])
    student = models.build_model(opts.student, data.num_classes, data.input_shape)
    qnames = {r["name"] for r in layer_table(quant.quantize(student, spec), x)}
    rows = [r for r in layer_table(student, x) if r["name"] in qnames]
    first = _teacher_specs(opts.teacher)[0]
    if first and Path(first).is_file():
        teacher = models.load_model(first, expect_classes=data.num_classes)[0]
    else:  # an architecture: an untrained copy has the same layers
        teacher = models.build_model(first or DEFAULT_TEACHER, data.num_classes, data.input_shape)
    return {"student": rows, "teacher": layer_table(teacher, x)}


def _preflight(target, spec) -> list[dict]:
    from . import catalog

    check = getattr(catalog, "preflight", None)
    return check(target, spec.weight_bits, spec.act_bits) if check else []


def load_student(run_dir: Path):
    """Rebuild the quantized student of a run directory, with its trained weights and scales."""
    from . import models, quant

    ckpt_path = Path(run_dir) / "student.pt"
    ckpt = models.load_checkpoint(ckpt_path)
    meta = ckpt["meta"]
    if "quant" not in meta:
        raise EdgekdError(f"{ckpt_path} is not a distilled student (no quantization spec)",
                          "pass a run directory written by 'edgekd distill'")
    float_model = models.build_model(meta["arch"], meta["num_classes"], tuple(meta["input_shape"]))
    qmodel = quant.quantize(float_model, quant.QuantSpec(**meta["quant"]))
    quant.materialize(qmodel, meta["input_shape"])
    models.load_weights(qmodel, ckpt["state_dict"], str(ckpt_path))
    qmodel.eval()
    return qmodel, meta


def find_run(run_dir: str | Path | None) -> Path:
    if run_dir is None:
        run_dir = latest(RUNS_DIR, "student.pt")
        if run_dir is None:
            raise MissingFileError("no distilled run found under runs/", "run 'edgekd distill' first, or pass RUN_DIR")
    run_dir = Path(run_dir)
    missing = [name for name in ("student.pt", "metrics.json") if not (run_dir / name).is_file()]
    if missing:
        raise MissingFileError(f"{run_dir} is not a run directory (no {' or '.join(missing)})",
                               "pass a directory written by 'edgekd distill'")
    return run_dir


# ---- export --------------------------------------------------------------------------------------

def export(run_dir: str | Path | None, target_name: str, out: Path | None = None, log: Log = _quiet) -> dict:
    """Export, compile and validate a distilled student for a target; returns the manifest."""
    import numpy as np
    import torch

    from . import catalog
    from . import export as ex
    from .data import load_dataset

    run_dir = find_run(run_dir)
    target = catalog.load_target(target_name)
    qmodel, meta = load_student(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if target.backend == "tensorrt":
        # Engines are built where they run: here the bundle gets the Q/DQ ONNX graph, validated
        # with ONNX Runtime (the reference runtime for the same graph), and the command to build
        # the engine on the device (manifest: compiled false, compile_command).
        log(f"target {target.name}: the TensorRT engine is built on the device, not here; "
            "the ONNX graph is validated with ONNX Runtime as the reference runtime")
    data = load_dataset(meta["dataset"], seed=meta["seed"])
    if [data.mean, data.std] != [meta["normalization"]["mean"], meta["normalization"]["std"]]:
        raise EdgekdError(f"the dataset {meta['dataset']} no longer matches the run's normalization",
                          "export on the machine and data the student was distilled with")
    x, y = data.test.x, data.test.y
    with torch.no_grad():
        reference = torch.cat([qmodel(torch.from_numpy(x[i: i + 512])) for i in range(0, len(x), 512)]).numpy()
    name = f"{run_dir.name}-{target.name}"
    out = Path(out) if out else BUNDLES_DIR / name
    with atomic_dir(out) as tmp:
        started = time.perf_counter()
        ex.export_onnx(qmodel, target.flavour, torch.from_numpy(x[:1]), tmp / "model.onnx", target.opset)
        artifact, fusion = _compile(target, tmp, log)
        log(f"exported {target.flavour} ONNX and compiled for {target.backend} in {time.perf_counter() - started:.1f}s")
        runtime = ex.run_artifact(target.backend, artifact, x)
        report = ex.parity(reference, runtime, y)
        log(f"parity on {report['n']} test samples: top-1 agreement {report['top1_agreement']:.4f}, "
            f"max abs diff {report['max_abs_diff']:.3g}")
        ex.check_parity(report, target.tolerance, f"the {target.name} artifact")
        np.savez_compressed(tmp / "eval.npz", x=x, y=y)
        extras = _backend_extras(target, tmp, reference, log)
        manifest = ex.manifest_base(target, meta, metrics) | extras | {
            "name": out.name, "model_file": artifact.name, "run_dir": str(run_dir),
            "torch_accuracy": report["torch_accuracy"], "runtime_accuracy": report["runtime_accuracy"],
            "parity": {k: report[k] for k in ("n", "top1_agreement", "max_abs_diff", "mean_abs_diff", "disagreements")},
            "fusion": fusion, "files": ex.file_hashes(tmp)}
        write_json(tmp / "manifest.json", manifest)
    return manifest | {"bundle_dir": str(out)}


def _compile(target, bundle: Path, log: Log):
    """The target's compile step on this machine; returns (artifact to validate, fusion report or None).

    - onnxruntime: ORT's optimized graph at the target's level (model.opt.onnx), with the
      session config the target asks for stored in it (``x64_exact_int8``), and, with option
      ``ort_format``, the ORT format file for the device (model.ort, the artifact then).
    - tensorrt: nothing here; the engine is built on the device (``edgekd compile``).
    - qonnx: the QONNX file itself, checked against the toolflow's input rules (errors raise).
    """
    if target.backend == "qonnx":
        return _check_qonnx(target, bundle / "model.onnx"), None
    if target.backend != "onnxruntime":
        return bundle / "model.onnx", None
    from .backends import onnxruntime as ortb

    level = target.options.get("graph_optimization_level", "basic")
    artifact = ortb.optimize(bundle / "model.onnx", bundle / "model.opt.onnx", level=level)
    if target.options.get("x64_exact_int8"):
        ortb.with_session_config(artifact, ortb.X64_EXACT_INT8)
        log("session config stored in the model: session.x64quantprecision=1 (exact int8 accumulation on "
            "x86 CPUs without VNNI, as ARM's dot-product kernels compute; no effect on ARM)")
    fusion = ortb.fusion_report(artifact)
    if target.options.get("ort_format"):
        platform = target.options.get("ort_platform", "arm64")
        artifact = ortb.to_ort_format(artifact, bundle / "model.ort", platform=platform, level=level)
        log(f"converted to ORT format for {platform}: {artifact.name}")
    return Path(artifact), fusion


def _check_qonnx(target, path: Path) -> Path:
    """Check the QONNX file against the target's toolflow rules; raise one error listing all."""
    from .backends import qonnx as qb

    findings = qb.check_rules(path, target.options.get("toolflow", "finn"))
    errors = [f["message"] for f in findings if f["level"] == "error"]
    if errors:
        raise EdgekdError(f"the QONNX export does not meet {target.options.get('toolflow', 'finn')}'s input rules: "
                          + "; ".join(errors[:6]) + (f" (and {len(errors) - 6} more)" if len(errors) > 6 else ""),
                          "distill with the same --target so that training uses its conventions")
    return path


def compile_command(bundle_name: str, profile: str | None = None) -> str:
    return f"edgekd compile {bundle_name}" + (f" --profile {profile}" if profile else "")


def _bundle_name(tmp: Path) -> str:
    """The final folder name of the bundle being written in ``tmp`` (fsutil.atomic_dir names it
    ".NAME.XXXX.tmp")."""
    found = re.fullmatch(r"\.(.+)\.[^.]+\.tmp", tmp.name)
    return found.group(1) if found else "BUNDLE"


def _backend_extras(target, bundle: Path, reference, log: Log) -> dict:
    """Manifest fields that depend on the backend (written next to the common ones)."""
    import numpy as np

    extras: dict = {"backend_options": dict(target.options),
                    "tolerance": {"min_top1_agreement": target.tolerance.min_top1_agreement,
                                  "max_abs_diff": target.tolerance.max_abs_diff}}
    if target.backend == "onnxruntime":
        from .backends import onnxruntime as ortb

        extras["session_config"] = ortb.session_config(bundle / "model.opt.onnx")
    elif target.backend == "tensorrt":
        np.save(bundle / "reference_logits.npy", reference.astype(np.float32))
        command = compile_command(_bundle_name(bundle))
        extras |= {"compiled": False, "compile_command": command, "parity_runtime": "onnxruntime (level basic: "
                   "Q/DQ graph without fusions, the reference for the graph TensorRT parses)",
                   "reference_file": "reference_logits.npy"}
        log(f"warning: not compiled: the TensorRT engine is built on the device; copy the bundle to the Jetson "
            f"and run `{command}` there (TensorRT comes with JetPack)")
    elif target.backend == "qonnx":
        extras |= _fpga_extras(target, bundle / "model.onnx", log)
    return extras


def _fpga_extras(target, path: Path, log: Log) -> dict:
    """QONNX rule findings, the inference cost and, for every FPGA profile that lists this
    target, a resource estimate (labelled estimated)."""
    from . import catalog
    from .backends import qonnx as qb

    cost = qb.inference_cost(path)
    estimates = {}
    for profile in catalog.list_profiles():
        fpga = profile.hardware.get("fpga")
        if fpga and target.name in profile.targets:
            estimates[profile.name] = qb.estimate(cost, fpga, *_bits_of(path))
    for name, est in estimates.items():
        log(f"estimated on {name}: {est['bram_36k']} BRAM36 for {est['weight_kib']:.1f} KiB of weights, "
            f"{est['mac_lanes']} {est['mac_lane'].upper()} MAC lanes, ~{est['latency_ms'] or 0:.4f} ms/image "
            "(a heuristic, not a synthesis report)")
    return {"toolflow": target.options.get("toolflow", "finn"), "source": "estimated",
            "rule_findings": qb.check_rules(path, target.options.get("toolflow", "finn")),
            "inference_cost": {k: v for k, v in cost.items() if k != "by_op"}, "fpga_estimates": estimates}


def _bits_of(path: Path) -> tuple[int, int]:
    """(weight bits, activation bits) of the widest-used inner layers: the most common widths among
    the Quant nodes on weights and on activations."""
    from collections import Counter

    from qonnx.core.modelwrapper import ModelWrapper

    model = ModelWrapper(str(path))
    counts = {True: Counter(), False: Counter()}
    for node in model.get_nodes_by_op_type("Quant"):
        bits = model.get_initializer(node.input[3])
        if bits is not None and bits.size == 1 and int(bits) <= 8:  # > 8: an int32 bias
            counts[model.get_initializer(node.input[0]) is not None][int(bits)] += 1
    w = counts[True].most_common(1)[0][0] if counts[True] else 8
    a = counts[False].most_common(1)[0][0] if counts[False] else 8
    return w, a


# ---- compile (on the device) ---------------------------------------------------------------------

def compile_bundle(bundle_dir: str | Path | None, profile: str | None = None, log: Log = _quiet) -> dict:
    """Build the TensorRT engine of a bundle on this device, check it against the PyTorch logits
    saved at export, and update the manifest (compiled: true, model_file: model.engine).
    Needs tensorrt and cuda-python, never torch."""
    import numpy as np

    from . import bench
    from .backends import tensorrt as trtb
    from .fsutil import sha256_file

    path = bench.resolve_bundles([bundle_dir] if bundle_dir else [])[0]
    manifest = bench.read_manifest(path)
    if manifest["backend"] != "tensorrt":
        raise EdgekdError(f"{path} is a {manifest['backend']} bundle; only TensorRT bundles are compiled on the device",
                          "bench it directly with `edgekd bench`")
    manifest["model_file"] = "model.onnx"  # build from the ONNX graph even if an engine exists
    bench.verify_files(path, manifest)
    trtb.import_tensorrt()
    dla_cores, batch_sizes = None, (1, 64)
    if profile:
        from .catalog import load_profile

        prof = load_profile(profile)
        dla_cores = (prof.hardware.get("accelerator") or {}).get("dla_cores", 0)
        batch_sizes = tuple(sorted(set(prof.bench.batch_sizes) | {64}))
    build = trtb.build_engine(path / "model.onnx", path, manifest.get("backend_options", {}), dla_cores,
                              batch_sizes, log)
    x, y = bench.load_eval(path, manifest)
    runner = trtb.RUNNER
    handle = runner.load(path / trtb.ENGINE_FILE)
    logits = np.concatenate([runner.run(handle, x[i: i + 64]) for i in range(0, len(x), 64)])
    report = _engine_parity(np.load(path / manifest.get("reference_file", "reference_logits.npy")), logits, y)
    log(f"engine parity on {report['n']} samples: top-1 agreement {report['top1_agreement']:.4f}, "
        f"max abs diff {report['max_abs_diff']:.3g}")
    minimum = (manifest.get("tolerance") or {}).get("min_top1_agreement", 0.99)
    if report["top1_agreement"] < minimum:
        from .errors import ParityError

        raise ParityError(f"the TensorRT engine agrees with PyTorch on {report['top1_agreement']:.4f} of "
                          f"{report['n']} samples, below {minimum}", "inspect engine_layers.json for layers not in int8")
    manifest |= {"model_file": trtb.ENGINE_FILE, "compiled": True, "engine": build, "engine_parity": report,
                 "runtime_accuracy": report["runtime_accuracy"],
                 "files": {p.name: sha256_file(p) for p in sorted(path.iterdir())
                           if p.is_file() and p.name != "manifest.json"}}
    write_json(path / "manifest.json", manifest)
    return manifest | {"bundle_dir": str(path)}


def _engine_parity(reference, runtime, labels) -> dict:
    agree = reference.argmax(1) == runtime.argmax(1)
    return {"n": int(len(labels)), "top1_agreement": float(agree.mean()),
            "max_abs_diff": float(abs(reference - runtime).max()), "disagreements": int((~agree).sum()),
            "runtime_accuracy": float((runtime.argmax(1) == labels).mean())}
