"""``esta serve --palette DIR``: one HTTP server, one palette in memory, every request its own budget.

FastAPI on uvicorn (the ``serve`` extra). ``GET /health``; ``GET /stitches`` (the palette's table: cost and measured
accuracy of every stitch); ``POST /classify?budget=12ms`` (or ``budget=0.2GFLOPs``, ``budget=5M`` parameters; a
bare number, or ``budget_gflops=0.2``, is GFLOPs) with an image file as the body (PNG, JPEG, ...) answers with the
best stitch within the budget (the highest measured accuracy, else the costliest) and its prediction. Budgets in
milliseconds need a profiled palette (``esta profile``). Changing budget between requests is choosing another stitch of the loaded palette: nothing is reloaded.
Bad requests get a 4xx with a message: no stitch fits (422), not an image (400), a body over ``max_bytes`` (413).
"""

# no ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations at definition time, and
# its own types are imported inside create_app (the serve extra is optional)
import io
import threading
from pathlib import Path

import torch

from .budget import FLOPS, Budget, parse_any
from .errors import EstaError
from .serving import best_within, load_palette

MAX_BYTES = 10 * 2**20


def create_app(palette_dir: "str | Path", max_bytes: int = MAX_BYTES):
    try:
        from fastapi import FastAPI, HTTPException, Query, Request
    except ImportError as e:
        raise EstaError(f"esta serve needs the serve extra ({e.name} is missing): pip install 'esta[serve]'") from e
    from PIL import Image, UnidentifiedImageError

    palette, table = load_palette(palette_dir)
    front = palette.anchors[0]
    if front.family != "vision":
        raise EstaError(f"{palette_dir} is a {front.family} palette: esta serve classifies images for now")
    size, channels = front.image_size, front.num_channels
    classes = table.get("classes") or [str(i) for i in range(front.num_labels)]
    # The palette selects its stitch through shared state (which biases every layer reads), so two requests must
    # never run it at once; torch already spreads one forward over the cores.
    lock = threading.Lock()
    app = FastAPI(title="esta palette", description=f"{len(table['stitches'])} stitches of one palette")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "stitches": len(table["stitches"]), "task": table.get("task")}

    @app.get("/stitches")
    def stitches() -> dict:
        return {"task": table.get("task"), "classes": classes, "stitches": table["stitches"]}

    @app.post("/classify")
    async def classify(request: Request, budget: str | None = Query(None, max_length=32),
                       budget_gflops: float | None = Query(None, gt=0)) -> dict:
        body = await request.body()
        if len(body) > max_bytes:
            raise HTTPException(413, f"the image is {len(body)} bytes; at most {max_bytes} are accepted")
        if (budget is None) == (budget_gflops is None):
            raise HTTPException(422, "give one budget: budget=12ms, budget=0.2GFLOPs or budget_gflops=0.2")
        try:
            b = parse_any(budget, FLOPS) if budget is not None else Budget.parse(budget_gflops, FLOPS)
            if b.axis.key == "latency_ms" and "latency" not in table:
                raise EstaError("this palette has no measured latencies: run esta profile --palette on it first")
            row = best_within(table, b.value, key=b.axis.key)
        except EstaError as e:
            raise HTTPException(422, str(e)) from e
        try:
            image = Image.open(io.BytesIO(body))
            image = image.convert("L" if channels == 1 else "RGB").resize((size, size))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise HTTPException(400, f"the body is not an image PIL can read ({type(e).__name__})") from e
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        x = pixels.view(size, size, channels).permute(2, 0, 1).unsqueeze(0)
        with lock, torch.no_grad():
            probs = palette(x, stitch=row["id"]).softmax(-1)[0]
        k = int(probs.argmax())
        return {"stitch": row["name"], "stitch_id": row["id"], "flops": row["flops"],
                "latency_ms": row.get("latency_ms"),
                "expected_accuracy": row.get("accuracy"), "label": classes[k], "index": k,
                "probabilities": [round(float(p), 6) for p in probs]}

    return app


def serve(palette_dir: "str | Path", host: str = "127.0.0.1", port: int = 8000) -> None:
    app = create_app(palette_dir)
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")
