"""Micro-batching: how much of the backend's own batching gain the teacher service keeps.

Two teacher services run side by side as their own processes, one with the
micro-batcher on (its default settings) and one with it off
(SAGE_TEACHER_BATCHING=false: one request per forward). They are measured one
after the other in alternating rounds with the same requests: 32 clients,
each sending its own fixed, seeded list of short score requests (one sequence
of 64-128 tokens, the last 24 scored) one after another. The teacher is the
tiny random Llama, where the cost per request matters most.

Batching cannot make the service gain more than the backend itself gains from
batched forwards (on 2 cores, the tiny backend gains only about 2x), so each
round also measures that gain in this process: sequences/s in batches of the
service's mean batch size over one at a time. Prints the backend's gain, the
service's on / off gain, and last ``kept share of batching gain: X``, their
ratio (target >= 0.8): the rest went to work outside the forwards.

The clients run in this process, on the same cores as the services, so they
must cost little: by default each keeps one HTTP/1.1 connection and sends
requests encoded beforehand (checking every answer as a ScoreResponse).
``--client teacher`` uses TeacherClient instead, whose CPU per request (httpx,
retries) exceeds the service's own and, on 2 cores, bounds the rate with
batching on. On a shared machine whose cores other processes hold, torch's
default of one thread per core can make every unbatched forward far slower (its
threads wait for each other), which inflates both gains: compare with --threads 1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlsplit

import torch
from _models import QUIET_ENV, scrape, series, tiny_teacher

from client.protocol import (
    API_PREFIX,
    CLIENT_ID_HEADER,
    ScoredSequence,
    ScoreRequest,
    ScoreResponse,
    Span,
)
from client.teacher import TeacherClient
from services.teacher.backends.base import ScoreItem
from services.teacher.backends.hf import TransformersBackend
from trainer.stack import local_service

Request = tuple[list[int], list[tuple[int, int]]]
NAME = "tiny"


def make_requests(
    clients: int, per_client: int, shortest: int, longest: int, span: int, seed: int = 0
) -> list[list[Request]]:
    """Per client, its fixed list of one-sequence score requests."""
    rng = random.Random(seed)
    out = []
    for _ in range(clients):
        requests = []
        for _ in range(per_client):
            length = rng.randint(shortest, longest)
            ids = [rng.randrange(3, 700) for _ in range(length)]
            requests.append((ids, [(length - span, length)]))
        out.append(requests)
    return out


class RawClient:
    """One client of /v1/score on one keep-alive HTTP/1.1 connection: its requests are
    encoded before the clock starts, and each answer is checked and parsed as a
    ScoreResponse. A far lighter load than TeacherClient (httpx, retries), whose ~1 ms
    of CPU per request, on the same 2 cores, would bound what is measured with
    batching on rather than the service.
    """

    def __init__(self, url: str, client_id: str) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.client_id = parts.hostname, parts.port, client_id
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    def encode(self, ids: list[int], spans: list[tuple[int, int]]) -> bytes:
        body = ScoreRequest(
            sequences=[
                ScoredSequence(input_ids=ids, spans=[Span(start=s, end=e) for s, e in spans])
            ]
        ).model_dump_json(exclude_defaults=True)
        head = (
            f"POST {API_PREFIX}/score HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\n{CLIENT_ID_HEADER}: {self.client_id}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body.encode()

    async def send(self, request: bytes) -> ScoreResponse:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = head.split(b" ", 2)[1]
        fields = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:] if b":" in line)
        body = await self.reader.readexactly(int(fields[b"content-length"]))
        if status != b"200":
            raise RuntimeError(f"{status.decode()} from the teacher: {body[:300]!r}")
        return ScoreResponse.model_validate_json(body)

    async def aclose(self) -> None:
        if self.writer is not None:
            self.writer.close()


class TeacherLoad:
    """The same calls through the project's own client, TeacherClient (--client teacher)."""

    def __init__(self, url: str, client_id: str) -> None:
        self.client = TeacherClient(url, client_id=client_id, max_connections=1)

    def encode(self, ids: list[int], spans: list[tuple[int, int]]) -> Request:
        return ids, spans

    async def send(self, request: Request) -> ScoreResponse:
        return await self.client.score([request])

    async def aclose(self) -> None:
        await self.client.aclose()


CLIENTS = {"raw": RawClient, "teacher": TeacherLoad}


async def service_rate(
    url: str, requests: list[list[Request]], time_limit_s: float, client: str = "raw"
) -> tuple[float, float, float]:
    """Tokens scored/s with one client (of kind ``client``) per request list.

    Also the service's mean batch size and the share of the time it spent in forwards.
    """
    clients = [CLIENTS[client](url, f"client-{i}") for i in range(len(requests))]
    encoded = [[c.encode(*r) for r in mine] for c, mine in zip(clients, requests, strict=True)]
    tokens = 0

    async def client_loop(client: RawClient | TeacherLoad, mine: list, sent: list) -> None:
        nonlocal tokens
        for request, (ids, _) in zip(mine, sent, strict=True):
            if time.perf_counter() - start > time_limit_s:
                return
            await client.send(request)
            tokens += len(ids)

    try:
        # One call per client first, so connections are open before the clock starts.
        await asyncio.gather(*(c.send(mine[0]) for c, mine in zip(clients, encoded, strict=True)))
        before = scrape(url)
        start = time.perf_counter()
        await asyncio.gather(
            *(client_loop(*z) for z in zip(clients, encoded, requests, strict=True))
        )
        elapsed = time.perf_counter() - start
        after = scrape(url)
    finally:
        for c in clients:
            await c.aclose()
    forwards, items, seconds = (
        series(after, f"sage_teacher_{name}", model=NAME)
        - series(before, f"sage_teacher_{name}", model=NAME)
        for name in ("batch_items_count", "batch_items_sum", "forward_seconds_sum")
    )
    return tokens / elapsed, items / max(forwards, 1), seconds / elapsed


def backend_gain(
    backend: TransformersBackend, requests: list[Request], batch: int, time_limit_s: float
) -> float:
    """The backend alone, in this process: sequences/s in batches of ``batch``, over one by one.

    The two alternate, batch by batch (a batch of sequences, then the same sequences one
    at a time), so that both see the same machine noise; stops after ``time_limit_s``.
    """
    items = [ScoreItem(ids, spans) for ids, spans in requests]
    batch = min(max(batch, 1), len(items))
    backend.score(items[:batch], 0)
    batched = single = 0.0
    start = time.perf_counter()
    for first in range(0, len(items) - batch + 1, batch):
        if time.perf_counter() - start > time_limit_s:
            break
        chunk = sorted(items[first : first + batch], key=lambda item: item.num_tokens)
        began = time.perf_counter()
        backend.score(chunk, 0)
        middle = time.perf_counter()
        for item in chunk:
            backend.score([item], 0)
        single += time.perf_counter() - middle
        batched += middle - began
    return single / batched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=100, help="per client and measurement")
    parser.add_argument("--rounds", type=int, default=5, help="alternating measurements each")
    parser.add_argument("--shortest", type=int, default=64)
    parser.add_argument("--longest", type=int, default=128)
    parser.add_argument("--span", type=int, default=24, help="scored tokens at each sequence's end")
    parser.add_argument("--models", type=Path, default=None, help="model cache folder")
    parser.add_argument("--time-limit", type=float, default=8.0, help="seconds per measurement")
    parser.add_argument(
        "--budget", type=float, default=120.0, help="no new round after this (3 rounds at least)"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads on both sides (0: torch's default)"
    )
    parser.add_argument(
        "--client",
        choices=sorted(CLIENTS),
        default="raw",
        help="raw: pre-encoded HTTP/1.1 (default); teacher: the project's TeacherClient",
    )
    args = parser.parse_args()
    threads_env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    if args.threads:
        torch.set_num_threads(args.threads)

    path = tiny_teacher(args.models, "tiny")
    requests = make_requests(args.clients, args.requests, args.shortest, args.longest, args.span)
    total = sum(len(ids) for mine in requests for ids, _ in mine)
    print(
        f"cores: {os.cpu_count()}; torch threads: {torch.get_num_threads()}; "
        "teacher: tiny random Llama (hidden 64, 2 layers)"
    )
    print(
        f"requests: {args.clients} concurrent clients x {args.requests} score requests each, "
        f"one sequence of {args.shortest}-{args.longest} tokens (last {args.span} scored), "
        f"{total:,} tokens per measurement; clients: {args.client}"
    )
    print(
        "services: two processes on loopback, batching on (defaults: max_wait 5 ms, "
        "max_batch_tokens 8192) and off (SAGE_TEACHER_BATCHING=false), measured in turn"
    )
    command = ["--model", str(path), "--model-name", NAME]
    env = {**QUIET_ENV, **threads_env, "SAGE_TEACHER_DEVICE": "cpu"}
    rates: dict[str, list[float]] = {"on": [], "off": []}
    sizes: dict[str, list[float]] = {"on": [], "off": []}
    in_forwards: dict[str, list[float]] = {"on": [], "off": []}
    gains: list[float] = []
    backend = TransformersBackend(str(path), device="cpu")
    sample = [request for mine in requests for request in mine[:8]]
    with ExitStack() as stack:
        urls = {
            "on": stack.enter_context(
                local_service("on", "services.teacher", command, env=env)
            ).url,
            "off": stack.enter_context(
                local_service(
                    "off",
                    "services.teacher",
                    command,
                    env={**env, "SAGE_TEACHER_BATCHING": "false"},
                )
            ).url,
        }
        warm_up = [mine[:1] for mine in requests]
        for url in urls.values():
            asyncio.run(service_rate(url, warm_up, args.time_limit, args.client))
        # Alternate the two (and which goes first) so that both see the same machine noise.
        began = time.perf_counter()
        for round_ in range(args.rounds):
            if round_ >= 3 and time.perf_counter() - began > args.budget:
                print(f"stopping after {round_} rounds: the {args.budget:.0f} s budget is spent")
                break
            order = ("on", "off") if round_ % 2 == 0 else ("off", "on")
            for side in order:
                rate, size, busy = asyncio.run(
                    service_rate(urls[side], requests, args.time_limit, args.client)
                )
                rates[side].append(rate)
                sizes[side].append(size)
                in_forwards[side].append(busy)
            batch = round(sizes["on"][-1])
            gains.append(backend_gain(backend, sample, batch, args.time_limit / 3))
            print(
                f"round {round_ + 1}: batching on {rates['on'][-1]:,.0f} tokens/s "
                f"(mean batch {sizes['on'][-1]:.1f}), off {rates['off'][-1]:,.0f} tokens/s "
                f"(mean batch {sizes['off'][-1]:.1f}); backend alone {gains[-1]:.2f}x"
            )
    on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
    per_request = total / (args.clients * args.requests)
    print(f"batching on (median): {on:,.0f} tokens/s, {on / per_request:,.0f} requests/s")
    print(f"batching off (median): {off:,.0f} tokens/s, {off / per_request:,.0f} requests/s")
    print(
        "share of service wall time inside forwards (median): "
        f"on {statistics.median(in_forwards['on']):.0%}, "
        f"off {statistics.median(in_forwards['off']):.0%}"
    )
    # Each round's on / off ratio: its two measurements ran back to back, under the same noise.
    ratios = [a / b for a, b in zip(rates["on"], rates["off"], strict=True)]
    print(f"per-round ratios: {', '.join(f'{r:.2f}' for r in ratios)}")
    backend, service = statistics.median(gains), statistics.median(ratios)
    print(
        f"backend gain (median): {backend:.2f}x sequences/s in batches of the service's mean "
        f"batch size over one at a time (up to {len(sample)} sequences, in process)"
    )
    print(f"service gain (median): {service:.2f}x tokens/s on / off at {args.clients} clients")
    print(f"kept share of batching gain: {service / backend:.2f}")


if __name__ == "__main__":
    main()
