"""Run the edgekd CLI in this process with a fault injected at a chosen moment (used by
test_resilience.py through ``python tests/faults.py FAULT N -- edgekd args...``).

FAULT is one of
- ``sigint`` / ``sigterm``: a real signal sent to this process right after optimizer step N;
- ``nan``: the loss of training step N (counted over the whole command) becomes NaN;
- ``kill-save``: SIGKILL in the middle of the N-th torch.save (half the bytes written);
- ``kill-onnx``: SIGKILL in the middle of the N-th ONNX file written by export.
Everything else is the real code path.
"""

from __future__ import annotations

import os
import signal
import sys


def die_halfway(path, data: bytes) -> None:
    """Write the first half of ``data`` to ``path`` (to disk), then SIGKILL this process."""
    with open(path, "wb") as out:
        out.write(data[: len(data) // 2])
        out.flush()
        os.fsync(out.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    fault, n = sys.argv[1], int(sys.argv[2])
    args = sys.argv[sys.argv.index("--") + 1:]
    count = [0]

    def hit() -> bool:
        count[0] += 1
        return count[0] == n

    import torch

    if fault in ("sigint", "sigterm"):
        sig = signal.SIGINT if fault == "sigint" else signal.SIGTERM
        step = torch.optim.AdamW.step

        def patched_step(self, *a, **k):
            out = step(self, *a, **k)
            if hit():
                os.kill(os.getpid(), sig)
            return out

        torch.optim.AdamW.step = patched_step
    elif fault == "nan":
        from edgekd.training import loop as train

        call = train.compute_loss

        def patched_loss(*a, **k):
            loss, parts = call(*a, **k)
            return (loss * float("nan"), parts) if hit() else (loss, parts)

        train.compute_loss = patched_loss
    elif fault == "kill-save":
        save = torch.save

        def patched_save(obj, f, *a, **k):
            if not hit():
                return save(obj, f, *a, **k)
            import io

            buf = io.BytesIO()
            save(obj, buf, *a, **k)
            die_halfway(f, buf.getvalue())

        torch.save = patched_save
    elif fault == "kill-onnx":
        import onnx

        save_model = onnx.save_model

        def patched_save_model(model, f, *a, **k):
            if not hit():
                return save_model(model, f, *a, **k)
            die_halfway(f, model.SerializeToString())

        onnx.save_model = onnx.save = patched_save_model
    else:
        raise SystemExit(f"unknown fault {fault}")
    from edgekd.cli import main as cli

    sys.argv = ["edgekd", *args]
    cli()


if __name__ == "__main__":
    main()
