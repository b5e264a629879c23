"""Micro-batching: teacher service tokens scored/s at 32 concurrent clients, batching on over off.

Two teacher services run side by side as their own processes, one with the
micro-batcher on (its default settings) and one with it off
(SAGE_TEACHER_BATCHING=false: one request per forward). They are measured one
after the other in alternating rounds with the same requests: 32 clients,
each sending its own fixed, seeded list of short score requests (one sequence
of 64-128 tokens, the last 24 scored) one after another. The teacher is the
tiny random Llama, where the cost per request matters most. Prints, last, the
on / off ratio of tokens scored per second (target >= 4 with the tiny teacher
on 2 cores). On a shared machine whose cores other processes hold, torch's
default of one thread per core can make every unbatched forward far slower (its
threads wait for each other), which inflates the ratio: compare with --threads 1.
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

import torch
from _models import QUIET_ENV, scrape, series, tiny_teacher

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


async def service_rate(
    url: str, requests: list[list[Request]], time_limit_s: float
) -> tuple[float, float, float]:
    """Tokens scored/s with one client per request list.

    Also the service's mean batch size and the share of the time it spent in forwards.
    """
    clients = [
        TeacherClient(url, client_id=f"client-{i}", max_connections=1) for i in range(len(requests))
    ]
    tokens = 0

    async def client_loop(client: TeacherClient, mine: list[Request]) -> None:
        nonlocal tokens
        for ids, spans in mine:
            if time.perf_counter() - start > time_limit_s:
                return
            await client.score([(ids, spans)])
            tokens += len(ids)

    try:
        # One small call per client first, so connections are open before the clock starts.
        await asyncio.gather(*(c.score([([5, 6, 7, 8], [(1, 4)])]) for c in clients))
        before = scrape(url)
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(c, r) for c, r in zip(clients, requests, strict=True)))
        elapsed = time.perf_counter() - start
        after = scrape(url)
    finally:
        for client in clients:
            await client.aclose()
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

    Each side stops after ``time_limit_s``; rates are over the sequences it got through.
    """
    items = [ScoreItem(ids, spans) for ids, spans in requests]
    backend.score(items[:1], 0)
    rates = []
    for size in (1, max(batch, 1)):
        done = 0
        start = time.perf_counter()
        while done < len(items) and time.perf_counter() - start < time_limit_s:
            chunk = sorted(items[done : done + size], key=lambda item: item.num_tokens)
            backend.score(chunk, 0)
            done += len(chunk)
        rates.append(done / (time.perf_counter() - start))
    return rates[1] / rates[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=25, help="per client and measurement")
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
        f"{total:,} tokens per measurement"
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
            asyncio.run(service_rate(url, warm_up, args.time_limit))
        # Alternate the two (and which goes first) so that both see the same machine noise.
        began = time.perf_counter()
        for round_ in range(args.rounds):
            if round_ >= 3 and time.perf_counter() - began > args.budget:
                print(f"stopping after {round_} rounds: the {args.budget:.0f} s budget is spent")
                break
            order = ("on", "off") if round_ % 2 == 0 else ("off", "on")
            for side in order:
                rate, size, busy = asyncio.run(service_rate(urls[side], requests, args.time_limit))
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
    print(
        f"backend alone in process (median): {statistics.median(gains):.2f}x sequences/s in "
        "batches of the service's mean batch size over one at a time "
        f"(up to {len(sample)} sequences)"
    )
    ratios = [a / b for a, b in zip(rates["on"], rates["off"], strict=True)]
    print(f"per-round ratios: {', '.join(f'{r:.2f}' for r in ratios)}")
    print(f"micro_batching (on / off at {args.clients} clients, target >= 4): {on / off:.2f}")


if __name__ == "__main__":
    main()
