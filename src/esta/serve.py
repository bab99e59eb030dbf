"""``esta serve --palette DIR``: one HTTP server, one palette in memory, every request its own budget.

FastAPI on uvicorn (the ``serve`` extra). Every palette: ``GET /health``; ``GET /stitches`` (the palette's table:
cost and measured accuracy or perplexity of every stitch). A request's budget picks the best stitch within it
(the highest measured accuracy, or the lowest perplexity; else the costliest); changing budget between requests is
choosing another stitch of the loaded palette: nothing is reloaded.

- An image palette: ``POST /classify?budget=12ms`` (or ``budget=0.2GFLOPs``, ``budget=5M`` parameters; a bare
  number, or ``budget_gflops=0.2``, is GFLOPs) with an image file as the body (PNG, JPEG, ...) answers with the
  stitch and its prediction. Budgets in milliseconds need a profiled palette (``esta profile``). Requests for the
  same stitch that arrive together run as one batch (dynamic batching; ``/health`` counts requests and forwards).
- A language palette: ``POST /generate?budget=1.2B`` (or ``budget=300M``; a bare number, or ``budget_mparams=300``,
  is millions of parameters; ``budget=20ms`` is per generated token, after ``esta profile``) with a JSON body
  ``{"prompt": ..., "max_new_tokens": 64, "temperature": 0, "top_p": 1, "seed": null, "chat": true,
  "stream": false}``. ``chat`` wraps the prompt in the tokenizer's chat template (the Alpaca template where it has
  none); ``stream`` answers with server-sent events, one ``data: {"text": ...}`` per piece of text, then
  ``data: {"done": true, ...}``.

Bad requests get a 4xx with a message: no stitch fits or a malformed request (422), not an image (400), a body
over ``max_bytes`` (413).
"""

# no ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations at definition time, and
# its own types are imported inside create_app (the serve extra is optional)
import io
import json
import threading
from pathlib import Path

import torch

from .budget import FLOPS, PARAMS, Budget, CostAxis, parse_any
from .errors import EstaError
from .selection import best_within
from .serving import load_palette

MAX_BYTES = 10 * 2**20
MAX_NEW_TOKENS = 1024


def create_app(palette_dir: "str | Path", max_bytes: int = MAX_BYTES):
    try:
        from fastapi import FastAPI
    except ImportError as e:
        raise EstaError(f"esta serve needs the serve extra ({e.name} is missing): pip install 'esta[serve]'") from e

    palette, table = load_palette(palette_dir)
    family, modality = palette.anchors[0].family, palette.anchors[0].modality
    routes = {"image": _image_routes, "text": _text_routes}  # by what a forward takes, whatever the family
    if modality not in routes:
        raise EstaError(f"{palette_dir} is a {family} palette of {modality or 'unknown'} inputs: esta serve "
                        f"classifies images and generates text")
    # Each forward selects its own stitch (per thread), so concurrent forwards would be correct; the lock only keeps
    # them one at a time, because torch already spreads one forward over the cores and two at once thrash them.
    lock = threading.Lock()
    app = FastAPI(title="esta palette", description=f"{len(table['stitches'])} stitches of one {family} palette")

    @app.get("/health")
    def health() -> dict:
        batcher = getattr(app.state, "batcher", None)
        batched = {"requests": batcher.requests, "forwards": batcher.forwards} if batcher else None
        return {"status": "ok", "family": family, "stitches": len(table["stitches"]), "task": table.get("task"),
                "batched": batched}

    @app.get("/stitches")
    def stitches() -> dict:
        return {"task": table.get("task"), "family": family, "score": table.get("score", "accuracy"),
                "classes": table.get("classes"), "stitches": table["stitches"]}

    routes[modality](app, palette, table, lock, max_bytes, Path(palette_dir))
    return app


def _pick(table: dict, budget: "str | None", number: "float | None", axis: CostAxis, name: str) -> dict:
    """The row for a request's budget (exactly one of ``budget`` with its unit, or a bare ``number`` on ``axis``);
    HTTP 422 with the reason when it is missing, unreadable or fits no stitch."""
    from fastapi import HTTPException

    if (budget is None) == (number is None):
        example = "budget=12ms, budget=0.2GFLOPs" if axis is FLOPS else "budget=1.2B, budget=20ms"
        raise HTTPException(422, f"give one budget: {example} or {name}=...")
    try:
        b = parse_any(budget, axis) if budget is not None else Budget.parse(number, axis)
        if b.axis.key == "latency_ms" and "latency" not in table:
            raise EstaError("this palette has no measured latencies: run esta profile --palette on it first")
        return best_within(table, b.value, key=b.axis.key)
    except EstaError as e:
        raise HTTPException(422, str(e)) from e


def _image_routes(app, palette, table: dict, lock: threading.Lock, max_bytes: int, folder: Path) -> None:
    from fastapi import HTTPException, Query, Request
    from fastapi.responses import JSONResponse
    from PIL import Image, UnidentifiedImageError

    front = palette.anchors[0]
    size, channels = front.image_size, front.num_channels
    classes = table.get("classes") or [str(i) for i in range(front.num_labels)]

    batcher = app.state.batcher = _Batcher(lambda stitch, x: palette(x, stitch=stitch).softmax(-1), lock)

    def decode(body: bytes) -> torch.Tensor:
        try:
            image = Image.open(io.BytesIO(body))
            image = image.convert("L" if channels == 1 else "RGB").resize((size, size))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise HTTPException(400, f"the body is not an image PIL can read ({type(e).__name__})") from e
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        return pixels.view(size, size, channels).permute(2, 0, 1).unsqueeze(0)

    # the answer is plain JSON already: returned as a JSONResponse, FastAPI skips its generic encoder
    @app.post("/classify", response_class=JSONResponse)
    async def classify(request: Request, budget: str | None = Query(None, max_length=32),
                       budget_gflops: float | None = Query(None, gt=0)):
        body = await request.body()
        if len(body) > max_bytes:
            raise HTTPException(413, f"the image is {len(body)} bytes; at most {max_bytes} are accepted")
        row = _pick(table, budget, budget_gflops, FLOPS, "budget_gflops")
        probs = await batcher.submit(row["id"], decode(body))
        k = int(probs.argmax())
        return JSONResponse({
            "stitch": row["name"], "stitch_id": row["id"], "flops": row["flops"], "latency_ms": row.get("latency_ms"),
            "expected_accuracy": row.get("accuracy"), "label": classes[k], "index": k,
            "probabilities": [round(p, 6) for p in probs.tolist()]})


class _Batcher:
    """Requests for the same stitch that are waiting together run as one batch (dynamic batching, as model servers
    do). Nothing waits on a timer: a request's forward is scheduled for the event loop's next turn, and whatever
    other requests were read in that same turn join it. On these small networks one forward of 8 images costs
    little more than one of 1 (the time is per-call overhead), so concurrent clients share it.

    Runs on the event loop's own thread: handing forwards to worker threads measured slower here (147 against 208
    requests/s under 8 concurrent clients)."""

    def __init__(self, run, lock: threading.Lock, max_batch: int = 32) -> None:
        self.run, self.lock, self.max_batch = run, lock, max_batch
        self.waiting: dict[int, list] = {}
        self.requests = self.forwards = 0  # how much batching happened (GET /health)

    async def submit(self, stitch: int, x: torch.Tensor) -> torch.Tensor:
        import asyncio

        loop = asyncio.get_running_loop()
        if not self.waiting:
            loop.call_soon(self._flush)
        future = loop.create_future()
        self.waiting.setdefault(stitch, []).append((x, future))
        return await future

    def _flush(self) -> None:
        waiting, self.waiting = self.waiting, {}
        for stitch, items in waiting.items():
            for i in range(0, len(items), self.max_batch):
                chunk = items[i:i + self.max_batch]
                self.requests, self.forwards = self.requests + len(chunk), self.forwards + 1
                try:
                    with self.lock, torch.inference_mode():
                        out = self.run(stitch, torch.cat([x for x, _ in chunk]))
                except Exception as e:  # every waiting request hears of it
                    for _, f in chunk:
                        if not f.done():
                            f.set_exception(e)
                    continue
                for row, (_, f) in zip(out, chunk):
                    if not f.done():  # a client that went away
                        f.set_result(row)


def _text_routes(app, palette, table: dict, lock: threading.Lock, max_bytes: int, folder: Path) -> None:
    from fastapi import HTTPException, Query, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
    from transformers import AutoTokenizer

    from .generate import chat_prompt_ids, context_length, stream_text

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")  # a misspelt option is an error, not a silent default
        prompt: str = Field(min_length=1)
        max_new_tokens: int = Field(64, ge=1, le=MAX_NEW_TOKENS)
        temperature: float = Field(0.0, ge=0.0, le=10.0)  # 0: greedy
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        seed: int | None = None  # sampling seed (None: a fresh one per request)
        chat: bool = True
        stream: bool = False

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise EstaError(f"{folder} is a language palette without a readable tokenizer beside it ({e})") from e
    context = context_length(palette.anchors)

    def request_of(body: bytes) -> GenerateRequest:
        try:
            return GenerateRequest.model_validate_json(body)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "body"
            raise HTTPException(422, f"bad request body: {where}: {first['msg']}") from e

    @app.post("/generate")
    async def generate(request: Request, budget: str | None = Query(None, max_length=32),
                       budget_mparams: float | None = Query(None, gt=0)):
        body = await request.body()
        if len(body) > max_bytes:
            raise HTTPException(413, f"the body is {len(body)} bytes; at most {max_bytes} are accepted")
        req = request_of(body)
        row = _pick(table, budget, budget_mparams, PARAMS, "budget_mparams")
        messages = [{"role": "user", "content": req.prompt}]
        ids = chat_prompt_ids(tokenizer, messages) if req.chat else \
            torch.tensor([tokenizer(req.prompt)["input_ids"]])
        if ids.shape[1] + req.max_new_tokens > context:
            raise HTTPException(422, f"the prompt is {ids.shape[1]} tokens; with max_new_tokens="
                                f"{req.max_new_tokens} it exceeds the palette's context of {context} tokens")

        def model(inputs: dict) -> torch.Tensor:
            with lock:  # one forward at a time; streams of other budgets interleave between tokens
                return palette(inputs, stitch=row["id"])

        generator = torch.Generator().manual_seed(req.seed) if req.seed is not None else None
        stats: dict = {}
        pieces = stream_text(model, tokenizer, ids, req.max_new_tokens, stats=stats, temperature=req.temperature,
                             top_p=req.top_p, generator=generator)
        head = {"stitch": row["name"], "stitch_id": row["id"], "params": row["params"],
                "expected_perplexity": row.get("perplexity"), "prompt_tokens": int(ids.shape[1])}
        if not req.stream:
            text = await run_in_threadpool(lambda: "".join(pieces))
            return {**head, "text": text, "tokens": stats["tokens"], "finish_reason": stats["finish_reason"]}

        def events():  # a plain generator: Starlette runs it in a worker thread, piece by piece
            for piece in pieces:
                yield f"data: {json.dumps({'text': piece})}\n\n"
            done = {"done": True, **head, "tokens": stats["tokens"], "finish_reason": stats["finish_reason"]}
            yield f"data: {json.dumps(done)}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


def serve(palette_dir: "str | Path", host: str = "127.0.0.1", port: int = 8000) -> None:
    app = create_app(palette_dir)
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")
