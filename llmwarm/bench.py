"""`llmwarm bench`: the cold-start penalty of any OpenAI-compatible server, as a client sees it.

For each request kind of a probe profile (bucket x endpoint x streaming x feature, and each
prompt form asked for crossed with every bucket): send it once (its first time), then `repeats`
more times; first against the median of the repeats. Before it measures, the client warms
itself on a throw-away server on loopback: its own first request's costs (lazy imports, codecs,
the connector) would otherwise count as the server's.
The repeats send the first batch's prompts again, so they do the same work: a kind whose output
ends on its content (stop, choice, regex, JSON) is as long every time, where new prompts made it
3 tokens one time and 6 the next. Each batch carries its own `cache_salt` (vLLM's, on every
endpoint), so a repeat is not served from the first's prefix-cache blocks.
A kind the server refuses is reported, not fatal. No vLLM import: it speaks HTTP only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time
from collections.abc import Sequence

import aiohttp
import httpx
from pydantic import BaseModel, Field, computed_field
from rich.table import Table

from llmwarm.errors import Unreachable, UsageError, WarmupError
from llmwarm.model import corpus, endpoints
from llmwarm.model.features import Feature
from llmwarm.model.kinds import Kind
from llmwarm.model.profile import Bucket, Profile
from llmwarm.warmup import measure


class KindResult(BaseModel):
    bucket: str
    kind: str
    first_s: float | None = Field(description="Median end-to-end latency of the first batch.")
    steady_s: float | None = Field(description="Median over the repeated batches.")
    error: str | None = Field(default=None, description="Why the server refused this kind.")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ratio(self) -> float | None:
        if self.first_s is None or not self.steady_s:
            return None
        return self.first_s / self.steady_s


class ClientWarm(BaseModel):
    """The client's own warm-up, on a throw-away server: what its first request cost it."""

    requests: int
    first_ms: float
    last_ms: float


class BenchReport(BaseModel):
    url: str
    model: str
    repeats: int
    client_warm: ClientWarm | None = Field(
        default=None, description="The client's own warm-up on a throw-away local server."
    )
    exact_lengths: bool = Field(
        description="Prompt lengths from the server's tokenizer (else approximate: words)."
    )
    kinds: list[KindResult]

    def _ratios(self) -> list[float]:
        return [k.ratio for k in self.kinds if k.ratio is not None]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def worst_ratio(self) -> float | None:
        ratios = self._ratios()
        return max(ratios) if ratios else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def geomean_ratio(self) -> float | None:
        ratios = self._ratios()
        return statistics.geometric_mean(ratios) if ratios else None


class ServerTokenizer:
    """The server's own tokenizer, over vLLM's `/tokenize` and `/detokenize`: exact prompt
    lengths. Tokenizing runs in the server's frontend, never in its engine."""

    def __init__(self, url: str, model: str, headers: dict[str, str]) -> None:
        self.model = model
        self.client = httpx.Client(base_url=url, headers=headers, timeout=60)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        body = {"model": self.model, "prompt": text, "add_special_tokens": add_special_tokens}
        resp = self.client.post("/tokenize", json=body)
        resp.raise_for_status()
        return list(resp.json()["tokens"])

    def decode(self, ids: Sequence[int]) -> str:
        resp = self.client.post("/detokenize", json={"model": self.model, "tokens": list(ids)})
        resp.raise_for_status()
        return str(resp.json()["prompt"])


def tokenizer_for(url: str, model: str, headers: dict[str, str]) -> corpus.Tokenizer:
    """The server's tokenizer where it offers one; else a word count (approximate lengths)."""
    remote = ServerTokenizer(url, model, headers)
    try:
        remote.encode("llmwarm")
    except (httpx.HTTPError, KeyError, ValueError):
        remote.client.close()
        return corpus.WordTokenizer()
    return remote


async def served_model(client: httpx.AsyncClient) -> str | None:
    """The first model the server lists, or None if it lists none; `Unreachable` when nothing
    answers at all."""
    try:
        resp = await client.get("/v1/models")
    except httpx.TransportError as exc:
        raise Unreachable(
            f"cannot reach {client.base_url}", problems=[("URL", f"{type(exc).__name__}: {exc}")]
        ) from None
    try:
        resp.raise_for_status()
        return str(resp.json()["data"][0]["id"])
    except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError):
        return None


CLIENT_WARM_REQUESTS = 6
FORMS = ("token_ids", "prompt_batch")  # the prompt forms besides text


def prompt_forms(text: str) -> list[Feature]:
    """`--forms`: comma-separated prompt forms, or `none`; `UsageError` naming the flag."""
    names = [] if text.strip() == "none" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in FORMS]
    if unknown or not (names or text.strip() == "none"):
        why = f"{text!r}: a comma-separated list of {', '.join(FORMS)}, or none"
        raise UsageError("bad --forms", problems=[("--forms", why)])
    return [Feature(n) for n in dict.fromkeys(names)]


async def warm_client(requests: int = CLIENT_WARM_REQUESTS) -> ClientWarm:
    """Send `requests` streamed completions, each timed, to a throw-away server on loopback
    that answers at once: the client's first-request costs are paid there."""
    from aiohttp import web

    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for text in ("warm", " client", ""):
            await response.write(b'data: {"choices": [{"text": "%s"}]}\n\n' % text.encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_post("/v1/completions", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        body = {"model": "m", "prompt": "warm " * 64, "max_tokens": 3, "stream": True}
        times = []
        async with measure.session(f"http://127.0.0.1:{port}") as session:
            for _ in range(requests):
                start = time.perf_counter()
                async with session.post("/v1/completions", json=body) as resp:
                    async for _line in resp.content:
                        pass
                times.append((time.perf_counter() - start) * 1000)
    finally:
        await runner.cleanup()
    return ClientWarm(requests=requests, first_ms=times[0], last_ms=times[-1])


def _kinds(profile: Profile, bucket: Bucket, forms: Sequence[Feature]) -> list[Kind]:
    """The bucket's kinds, then each prompt form's on every endpoint that takes it."""
    kinds = corpus.kinds(profile, bucket)
    if forms:
        with_forms = profile.features.model_copy(update={"use": [f.name for f in forms]})
        crossed = profile.model_copy(
            update={"features": with_forms.model_copy(update={"buckets": [bucket.name]})}
        )
        kinds += [k for k in corpus.kinds(crossed, bucket) if k not in kinds]
    return kinds


async def run(
    session: aiohttp.ClientSession,
    profile: Profile,
    model: str,
    repeats: int,
    url: str,
    tokenizer: corpus.Tokenizer | None = None,
    forms: Sequence[Feature] = (),
) -> BenchReport:
    tokenizer = tokenizer or corpus.WordTokenizer()
    results = []
    for bucket in profile.buckets:
        for kind in _kinds(profile, bucket, forms):
            medians: list[float] = []
            error = None
            # in a thread: the server's tokenizer is asked over a synchronous client
            first = await asyncio.to_thread(
                corpus.Corpus(profile, tokenizer, model).batch, bucket, kind, 1
            )
            for round_ in range(1, repeats + 2):
                salted = [
                    dataclasses.replace(
                        r, round=round_, body={**r.body, "cache_salt": f"llmwarm-bench-{round_}"}
                    )
                    for r in first.requests
                ]
                try:
                    samples = await measure.measure_all(session, salted)
                except WarmupError as exc:
                    error = exc.problems[0][1] if exc.problems else exc.message
                    break
                medians.append(statistics.median(s.e2e_s for s in samples))
            results.append(
                KindResult(
                    bucket=bucket.name,
                    kind=str(kind),
                    first_s=medians[0] if medians and error is None else None,
                    steady_s=statistics.median(medians[1:])
                    if error is None and medians[1:]
                    else None,
                    error=error,
                )
            )
    exact = not isinstance(tokenizer, corpus.WordTokenizer)
    return BenchReport(url=url, model=model, repeats=repeats, exact_lengths=exact, kinds=results)


async def probe(
    url: str,
    *,
    profile: Profile,
    repeats: int,
    model: str | None = None,
    api_key: str | None = None,
    forms: Sequence[Feature] = (),
) -> BenchReport:
    """Bench the server at `url`: its model (default: the first listed), its tokenizer where it
    offers one, every request kind of the probe profile, and each prompt form in `forms` at
    every bucket; the client warmed first."""
    url = url.rstrip("/")
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    async with (
        httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client,
        measure.session(url, headers) as session,
    ):
        listed = await served_model(client)  # also: is anything there at all?
        name = model or listed
        if name is None:
            raise Unreachable(
                "cannot tell the model name",
                problems=[("--model", "GET /v1/models lists none; is the server ready?")],
            )
        if profile.endpoints is None:
            profile = profile.model_copy(update={"endpoints": await served_endpoints(client)})
        tokenizer = tokenizer_for(url, name, headers)
        warm = await warm_client()
        try:
            report = await run(session, profile, name, repeats, url, tokenizer, forms)
        finally:
            if isinstance(tokenizer, ServerTokenizer):
                tokenizer.client.close()
    return report.model_copy(update={"client_warm": warm})


async def served_endpoints(client: httpx.AsyncClient) -> list[str]:
    """The endpoints the server lists in its OpenAPI document (vLLM's FastAPI app has one, with
    exactly the routes its model's tasks registered); the generate ones if it has none."""
    try:
        resp = await client.get("/openapi.json")
        resp.raise_for_status()
        paths = set(resp.json()["paths"])
    except (httpx.HTTPError, KeyError, TypeError, ValueError):
        return list(endpoints.GENERATE)
    served = [name for name, spec in endpoints.SPECS.items() if spec.path in paths]
    return served or list(endpoints.GENERATE)


def table(report: BenchReport) -> Table:
    t = Table(
        title=f"llmwarm bench {report.url} ({report.model}): first request vs the median of "
        f"{report.repeats} repeats, end to end",
        title_justify="left",
    )
    for column in ("bucket", "kind", "first ms", "steady ms", "first/steady"):
        t.add_column(column, justify="left" if column in ("bucket", "kind") else "right")
    for k in report.kinds:
        if k.error is not None:
            t.add_row(k.bucket, k.kind, "refused", "", k.error[:60])
            continue
        t.add_row(
            k.bucket, k.kind, f"{(k.first_s or 0) * 1000:.1f}", f"{(k.steady_s or 0) * 1000:.1f}",
            f"{k.ratio:.2f}x" if k.ratio is not None else "-",
        )  # fmt: skip
    t.caption = (
        f"worst {report.worst_ratio or 0:.2f}x, geometric mean {report.geomean_ratio or 0:.2f}x "
        f"over {len(report._ratios())} kinds"
    )
    if warm := report.client_warm:
        t.caption += (
            f"; the client warmed first on a throw-away local server ({warm.requests} requests: "
            f"first {warm.first_ms:.1f} ms, last {warm.last_ms:.1f} ms)"
        )
    return t
