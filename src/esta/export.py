"""``esta export --format onnx``: a deployed stitch as an ONNX graph, checked against onnxruntime.

An image stitch's graph takes ``pixel_values``: float32 ``[batch, channels, height, width]`` in [0, 1] (the
stitch's own normalisation is inside the graph) with a dynamic batch, and returns ``logits`` ``[batch, classes]``.
A language stitch's graph is its no-cache forward: ``input_ids`` and ``attention_mask`` (int64 ``[batch, length]``,
both dynamic; left padding honoured) to ``logits`` ``[batch, length, vocab]``. After writing, the file is run by
onnxruntime on another batch (and length) than the one traced, and the largest difference from the torch model is
reported (over real tokens: a padded position's logits mean nothing); above ``tolerance`` the export is refused
(the file is removed). The KV-cache forward is not exported.
onnx, onnxscript and onnxruntime are an optional extra (``pip install 'esta[onnx]'``).
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .deploy import DeployedStitch
from .errors import EstaError
from .files import read_json

log = logging.getLogger("esta.export")


class _Graph(nn.Module):
    """The stitch with the inputs an ONNX runtime user feeds (named by the front anchor's family)."""

    def __init__(self, model: DeployedStitch, to_inputs) -> None:
        super().__init__()
        self.model, self.to_inputs = model, to_inputs

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.model(self.to_inputs(*tensors))


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs a line per operator library it cannot find (torchvision's, which esta never uses) and
    warns about its own internals: noise for an esta user, so silenced for the export only."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_onnx(model_dir: str | Path, out: str | Path | None = None, tolerance: float = 1e-4,
                opset: int = 18) -> dict:
    try:
        import onnxruntime  # noqa: F401 - checked first: without it the export cannot be verified
        import onnxscript  # noqa: F401 - the exporter torch uses
    except ImportError as e:
        raise EstaError(f"ONNX export needs the onnx extra ({e.name} is missing): pip install 'esta[onnx]'") from e
    model = DeployedStitch.from_pretrained(model_dir).float().eval()
    front = model.front
    out = Path(out) if out else Path(model_dir) / "model.onnx"
    io = front.onnx_io()
    wrapper, names, example, check, real = _Graph(model, io.to_inputs).eval(), io.names, io.example, io.check, io.real
    dynamic, shape = {"tensors": tuple(io.dynamic[n] for n in names)}, io.shape  # the wrapper's *tensors, in order
    try:
        with _quiet_exporter():
            program = torch.onnx.export(wrapper, example, dynamo=True, opset_version=opset, input_names=names,
                                        output_names=["logits"], dynamic_shapes=dynamic, verbose=False)
        program.save(str(out))
    except Exception as e:  # the exporter's own error types; a stitch it cannot trace is a limitation to report
        raise EstaError(f"ONNX export of {model_dir} failed: {' '.join(str(e).split())[:300]}") from e
    with torch.no_grad():
        expected = wrapper(*check).numpy()
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {n: x.numpy() for n, x in zip(names, check)})[0]
    if real is not None:
        got, expected = got[real], expected[real]
    diff = float(abs(got - expected).max())
    if not diff <= tolerance:
        out.unlink(missing_ok=True)
        raise EstaError(f"the ONNX graph of {model_dir} differs from the torch model by {diff:.2e} (> {tolerance:g});"
                        f" not written")
    log.info("wrote %s (max |onnxruntime - torch| = %.2e on another batch than traced)", out, diff)
    return {"path": str(out), "max_abs_diff": diff, "opset": opset, "inputs": names, "input": list(shape)}


def export_transformers(model_dir: str | Path) -> dict:
    """Give a folder deployed by an older esta (``esta_stitch.json`` + weights, no ``config.json``) the transformers
    config that deployments now carry, so the Auto classes and ``pipeline`` load it after ``import esta``. The
    weights are checked by loading them first and are not rewritten."""
    from .deploy import CONFIG_NAME, write_transformers_files

    folder = Path(model_dir)
    model = DeployedStitch.from_pretrained(folder)  # refuses a damaged or edited folder with one line
    cfg = read_json(folder / CONFIG_NAME, "deployment")
    if cfg.get("weights") == "transformers":
        return {"path": str(folder), "written": [], "note": "already a plain transformers model"}
    written = write_transformers_files(folder, cfg, model.front, model.meta.get("classes"))
    return {"path": str(folder), "written": written}
