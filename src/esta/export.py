"""``esta export --format onnx``: a deployed image stitch as an ONNX graph, checked against onnxruntime.

The graph takes ``pixel_values``: float32 ``[batch, channels, height, width]`` in [0, 1] (the stitch's own
normalisation is inside the graph) with a dynamic batch, and returns ``logits`` ``[batch, classes]``. After
writing, the file is run by onnxruntime on a batch of another size than the one traced, and the largest
difference from the torch model is reported; above ``tolerance`` the export is refused (the file is removed).
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

log = logging.getLogger("esta.export")


class _Pixels(nn.Module):
    """The stitch with a float [0, 1] input: what an ONNX runtime user feeds."""

    def __init__(self, model: DeployedStitch) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values)


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
    if front.family != "vision":
        raise EstaError(f"{model_dir} is a {front.family} stitch: ONNX export covers image stitches for now")
    out = Path(out) if out else Path(model_dir) / "model.onnx"
    shape = (front.num_channels, front.image_size, front.image_size)
    wrapper = _Pixels(model).eval()
    example = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with _quiet_exporter():
            program = torch.onnx.export(wrapper, (example,), dynamo=True, opset_version=opset,
                                        input_names=["pixel_values"], output_names=["logits"],
                                        dynamic_shapes={"pixel_values": {0: batch}}, verbose=False)
        program.save(str(out))
    except Exception as e:  # the exporter's own error types; a stitch it cannot trace is a limitation to report
        raise EstaError(f"ONNX export of {model_dir} failed: {' '.join(str(e).split())[:300]}") from e
    check = torch.rand(5, *shape, generator=torch.Generator().manual_seed(1))  # another batch size than traced
    with torch.no_grad():
        expected = wrapper(check).numpy()
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"pixel_values": check.numpy()})[0]
    diff = float(abs(got - expected).max())
    if not diff <= tolerance:
        out.unlink(missing_ok=True)
        raise EstaError(f"the ONNX graph of {model_dir} differs from the torch model by {diff:.2e} (> {tolerance:g});"
                        f" not written")
    log.info("wrote %s (max |onnxruntime - torch| = %.2e on a batch of 5)", out, diff)
    return {"path": str(out), "max_abs_diff": diff, "opset": opset, "input": ["batch", *shape]}
