"""Teacher service overhead: tokens scored/s through the service, over the backend in process.

16 concurrent clients each send one score request (one sequence of 300-600
tokens, the response span its last 60) per group and wait for all 16 answers
before the next group; the service runs in its own process, with its
micro-batcher configured so each group of 16 lands in one forward. The same
TransformersBackend, loaded in this process, scores the same groups as batches
of 16 directly. Both sides use the ~5M-parameter random "teacher" Llama, so the
forwards dominate. The service's batch sizes come from its /metrics
(``sage_teacher_batch_items``). Prints, last, the service / in-process ratio of
tokens scored per second (target >= 0.9).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
from pathlib import Path

import torch
from _models import QUIET_ENV, scrape, series, tiny_teacher

from client.teacher import TeacherClient
from services.teacher.backends.base import ScoreItem
from services.teacher.backends.hf import TransformersBackend
from trainer.stack import local_service

Group = list[ScoreItem]
NAME = "teacher"


def make_groups(
    groups: int, clients: int, shortest: int, longest: int, span: int, vocab: int, seed: int = 0
) -> list[Group]:
    """A fixed, seeded set of score requests: per group, one sequence per client."""
    rng = random.Random(seed)
    out = []
    for _ in range(groups):
        group = []
        for _ in range(clients):
            length = rng.randint(shortest, longest)
            ids = [rng.randrange(3, vocab) for _ in range(length)]
            group.append(ScoreItem(ids, [(length - span, length)]))
        out.append(group)
    return out


def tokens_of(groups: list[Group]) -> int:
    return sum(item.num_tokens for group in groups for item in group)


def in_process_rate(
    backend: TransformersBackend, groups: list[Group], top_k: int, time_limit_s: float
) -> float:
    """Tokens scored/s by the backend called directly, one batch per group."""
    tokens = 0
    start = time.perf_counter()
    for group in groups:
        backend.score(group, top_k)
        tokens += sum(item.num_tokens for item in group)
        if time.perf_counter() - start > time_limit_s:
            break
    return tokens / (time.perf_counter() - start)


async def service_rate(
    url: str, groups: list[Group], top_k: int, time_limit_s: float
) -> tuple[float, dict[str, float]]:
    """Tokens scored/s through the service (each group sent by as many concurrent clients).

    Also returns what the service's metrics say about the timed part: forwards,
    sequences and seconds inside forwards.
    """
    clients = [
        TeacherClient(url, client_id=f"client-{i}", max_connections=1)
        for i in range(len(groups[0]))
    ]
    try:
        # One small call per client first, so connections are open before the clock starts.
        await asyncio.gather(*(c.score([([5, 6, 7, 8], [(1, 4)])]) for c in clients))
        tokens = 0
        before = scrape(url)
        start = time.perf_counter()
        for group in groups:
            await asyncio.gather(
                *(
                    client.score([(item.input_ids, item.spans)], top_k)
                    for client, item in zip(clients, group, strict=True)
                )
            )
            tokens += sum(item.num_tokens for item in group)
            if time.perf_counter() - start > time_limit_s:
                break
        rate = tokens / (time.perf_counter() - start)
        after = scrape(url)
    finally:
        for client in clients:
            await client.aclose()
    delta = {
        what: series(after, f"sage_teacher_{name}", model=NAME, kind="score")
        - series(before, f"sage_teacher_{name}", model=NAME, kind="score")
        for what, name in [
            ("forwards", "batch_items_count"),
            ("sequences", "batch_items_sum"),
            ("seconds", "forward_seconds_sum"),
        ]
    }
    return rate, delta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (batch size)")
    parser.add_argument("--groups", type=int, default=2, help="batches of requests per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="alternating measurements each")
    parser.add_argument("--shortest", type=int, default=300)
    parser.add_argument("--longest", type=int, default=600)
    parser.add_argument("--span", type=int, default=60, help="scored tokens at each sequence's end")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--max-wait-ms", type=float, default=20.0, help="the batcher's gathering")
    parser.add_argument("--models", type=Path, default=None, help="model cache folder")
    parser.add_argument(
        "--time-limit", type=float, default=15.0, help="seconds per measurement, each side"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads on both sides (0: torch's default)"
    )
    args = parser.parse_args()
    threads_env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    if args.threads:
        torch.set_num_threads(args.threads)

    path = tiny_teacher(args.models, "teacher")
    backend = TransformersBackend(str(path), device="cpu")
    params = sum(p.numel() for p in backend.model.parameters())
    groups = make_groups(
        args.groups, args.clients, args.shortest, args.longest, args.span, backend.vocab_size
    )
    print(f"cores: {os.cpu_count()}; torch threads: {torch.get_num_threads()}")
    print(
        f"teacher: random Llama, {params / 1e6:.1f}M parameters, vocab {backend.vocab_size}; "
        f"top_k {args.top_k}"
    )
    print(
        f"requests: {args.groups} groups x {args.clients} sequences of {args.shortest}-"
        f"{args.longest} tokens (last {args.span} scored), {tokens_of(groups):,} tokens "
        "per measurement"
    )
    print(
        f"service: own process on loopback, {args.clients} concurrent clients, one sequence "
        f"per request; batcher max_wait {args.max_wait_ms} ms, "
        f"max_batch_tokens {args.clients * args.longest}"
    )
    print(f"in process: TransformersBackend.score on each group of {args.clients}")
    env = {
        **QUIET_ENV,
        **threads_env,
        "SAGE_TEACHER_MAX_BATCH_TOKENS": str(args.clients * args.longest),
        "SAGE_TEACHER_MAX_WAIT_MS": str(args.max_wait_ms),
        "SAGE_TEACHER_DEVICE": "cpu",
    }
    command = ["--model", str(path), "--model-name", NAME]
    local_rates, remote_rates = [], []
    batches = {"forwards": 0.0, "sequences": 0.0, "seconds": 0.0}
    with local_service("teacher", "services.teacher", command, env=env) as teacher:
        in_process_rate(backend, groups[:1], args.top_k, args.time_limit)  # warm up both sides
        asyncio.run(service_rate(teacher.url, groups[:1], args.top_k, args.time_limit))
        # Alternate the two so that both see the same machine noise.
        for round_ in range(args.rounds):
            local_rates.append(in_process_rate(backend, groups, args.top_k, args.time_limit))
            rate, delta = asyncio.run(
                service_rate(teacher.url, groups, args.top_k, args.time_limit)
            )
            remote_rates.append(rate)
            for what, value in delta.items():
                batches[what] += value
            print(
                f"round {round_ + 1}: in process {local_rates[-1]:,.0f} tokens/s, "
                f"service {remote_rates[-1]:,.0f} tokens/s"
            )
    forwards = batches["forwards"]
    print(
        f"service batches (timed part): {forwards:.0f} forwards, mean "
        f"{batches['sequences'] / max(forwards, 1):.1f} sequences per forward "
        f"(in process: {args.clients}); {batches['seconds']:.1f} s inside forwards"
    )
    local, remote = statistics.median(local_rates), statistics.median(remote_rates)
    print(f"in process (median): {local:,.0f} tokens/s")
    print(f"service (median): {remote:,.0f} tokens/s")
    ratios = [r / p for r, p in zip(remote_rates, local_rates, strict=True)]
    print(f"per-round ratios: {', '.join(f'{r:.2f}' for r in ratios)}")
    print(f"teacher_overhead (service / in process, target >= 0.9): {remote / local:.2f}")


if __name__ == "__main__":
    main()
