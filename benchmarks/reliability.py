"""Reliability scenarios: load, faults and bad input against the real stack, with figures.

Each scenario runs the services (and, where it trains, the trainer) as their own
processes on loopback, as a user runs them, and checks one promise of the
reliability list (docs/benchmarks.md):

- load: twice the teacher's capacity (its queue, SAGE_TEACHER_MAX_QUEUE) in
  concurrent clients for a bounded time: excess requests get 503 with
  Retry-After, no admitted request fails, the queue stays bounded, memory flat.
- sessions: 1,000 env sessions: the cap answers 503 with Retry-After, idle
  sessions expire after the TTL, memory comes back down.
- teacher-restart / env-restart: the service is killed with SIGKILL mid-training
  and started again: the trainer waits, then goes on; no step lost or repeated.
- checkpoint-kill: the trainer is killed with SIGKILL while it writes a
  checkpoint, then run again: it resumes from the last complete checkpoint and
  its metrics rows equal an uninterrupted run's (timings aside).
- swap: the teacher's model is swapped back and forth while clients score:
  no request fails, every answer names a model that was loaded.
- fuzz: schemathesis with all its checks over each service's OpenAPI
  (benchmarks/schemathesis.toml says which statuses are documented answers).

Every loop is bounded in count and time. Prints one row per scenario and, last,
``scenarios held: K/N``; exits 1 unless every scenario held.

    python benchmarks/reliability.py [--only load,swap] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # also when imported by a test

from _models import scrape  # noqa: E402

from trainer.checkpoints import METRICS_FILE, read_metrics  # noqa: E402
from trainer.stack import free_port, stop_with_parent, wait_ready  # noqa: E402

MODELS = ROOT / "models" / "tiny"
BIN = Path(sys.executable).parent
QUIET = {
    "SAGE_ENV_LOG_LEVEL": "warning",
    "SAGE_TEACHER_LOG_LEVEL": "warning",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


@dataclass
class Outcome:
    """One scenario's verdict and the figures it is based on."""

    name: str
    held: bool
    figures: dict[str, object] = field(default_factory=dict)
    seconds: float = 0.0


# --------------------------------------------------------------------------- processes


class Service:
    """`python -m services.<kind>` on a fixed loopback port, which can be killed and
    started again on the same port."""

    def __init__(self, kind: str, env: dict[str, str], args: list[str] | None = None) -> None:
        self.kind = kind
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **QUIET, **env}
        self.args = args or []
        self.process: subprocess.Popen | None = None

    def start(self, ready_timeout_s: float = 120.0) -> float:
        """Start and wait until /readyz answers 200; returns the seconds that took."""
        began = time.monotonic()
        command = [sys.executable, "-m", f"services.{self.kind}", "--host", "127.0.0.1"]
        self.process = subprocess.Popen(
            [*command, "--port", str(self.port), *self.args],
            env=self.env,
            cwd=ROOT,
            preexec_fn=stop_with_parent,
        )
        wait_ready(self.url, self.process, ready_timeout_s)
        return time.monotonic() - began

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def rss_mb(self) -> float:
        assert self.process is not None
        return rss_mb(self.process.pid)


@contextmanager
def running(service: Service) -> Iterator[Service]:
    try:
        service.start()
        yield service
    finally:
        service.stop()


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def teacher_service(**settings: object) -> Service:
    env = {f"SAGE_TEACHER_{key.upper()}": str(value) for key, value in settings.items()}
    return Service("teacher", env, ["--model", str(MODELS / "teacher")])


def env_service(**settings: object) -> Service:
    return Service(
        "env", {f"SAGE_ENV_{key.upper()}": str(value) for key, value in settings.items()}
    )


def vocab_size() -> int:
    config = json.loads((MODELS / "teacher" / "config.json").read_text())
    return int(config["vocab_size"])


def percentile(values: list[float], share: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


# --------------------------------------------------------------------------- load


def score_body(rng: random.Random, vocab: int, length: int = 160, span: int = 32) -> bytes:
    ids = [rng.randrange(3, vocab) for _ in range(length)]
    body = {"sequences": [{"input_ids": ids, "spans": [{"start": length - span, "end": length}]}]}
    return json.dumps(body).encode()


@dataclass
class Tally:
    """What clients saw: latencies of answered requests, refusals, failures."""

    latencies: list[float] = field(default_factory=list)
    refused: int = 0  # 503 with Retry-After
    refused_bare: int = 0  # 503 without Retry-After
    failed: list[str] = field(default_factory=list)
    models: set[str] = field(default_factory=set)


async def hammer(
    url: str, clients: int, seconds: float, max_requests: int, vocab: int, tally: Tally
) -> float:
    """``clients`` concurrent loops POSTing /v1/score without retries until ``seconds``
    or ``max_requests`` in all; returns the wall time."""
    stop_at = time.monotonic() + seconds
    sent = 0

    async def client(index: int) -> None:
        nonlocal sent
        rng = random.Random(index)
        headers = {"Content-Type": "application/json", "X-Client-Id": f"load-{index}"}
        async with httpx.AsyncClient(base_url=url, timeout=60.0) as http:
            while time.monotonic() < stop_at and sent < max_requests:
                sent += 1
                began = time.monotonic()
                try:
                    response = await http.post(
                        "/v1/score", content=score_body(rng, vocab), headers=headers
                    )
                except httpx.HTTPError as exc:
                    tally.failed.append(type(exc).__name__)
                    continue
                if response.status_code == 200:
                    tally.latencies.append(time.monotonic() - began)
                    tally.models.add(response.json()["model"]["name"])
                elif response.status_code == 503 and response.headers.get("Retry-After"):
                    tally.refused += 1
                    await asyncio.sleep(0.05)  # a client that backs off a little
                elif response.status_code == 503:
                    tally.refused_bare += 1
                else:
                    tally.failed.append(str(response.status_code))

    began = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return time.monotonic() - began


def poll_peak(url: str, name: str, stop: threading.Event, peak: list[float]) -> None:
    """Keep the highest value of the metric ``name`` seen until ``stop`` is set."""
    while not stop.wait(0.05):
        try:
            peak[0] = max(peak[0], scrape(url).get(name, 0.0))
        except httpx.HTTPError:
            pass


def load(quick: bool) -> Outcome:
    """Capacity: the requests the teacher holds at once, its queue plus one batch in the
    model (SAGE_TEACHER_MAX_BATCH_TOKENS over the requests' tokens); twice that many
    clients send requests back to back, backing off briefly after a 503."""
    queue, batch, length = 16, 8, 160
    capacity = queue + batch
    seconds = 6.0 if quick else 20.0
    service = teacher_service(max_queue=queue, max_batch_tokens=batch * length)
    with running(service):
        vocab = vocab_size()
        asyncio.run(hammer(service.url, 4, 1.0, 50, vocab, Tally()))  # warm up
        rss_before = service.rss_mb()
        tally, stop, peak = Tally(), threading.Event(), [0.0]
        watcher = threading.Thread(
            target=poll_peak, args=(service.url, "sage_teacher_queue_depth", stop, peak)
        )
        watcher.start()
        try:
            wall = asyncio.run(hammer(service.url, 2 * capacity, seconds, 200_000, vocab, tally))
        finally:
            stop.set()
            watcher.join()
        rss_after = service.rss_mb()
    growth = rss_after - rss_before
    figures = {
        "clients": 2 * capacity,
        "capacity": f"{capacity} (queue {queue} + batch {batch})",
        "answered/s": round(len(tally.latencies) / wall, 1),
        "p50 ms": round(1000 * percentile(tally.latencies, 0.5), 1),
        "p99 ms": round(1000 * percentile(tally.latencies, 0.99), 1),
        "503+Retry-After": tally.refused,
        "503 bare": tally.refused_bare,
        "failed": len(tally.failed),
        "queue peak": int(peak[0]),
        "RSS MB": f"{rss_before:.0f}->{rss_after:.0f}",
    }
    held = (
        not tally.failed
        and tally.refused > 0
        and tally.refused_bare == 0
        and peak[0] <= queue
        and growth <= max(50.0, 0.2 * rss_before)
    )
    return Outcome("load", held, figures)


# --------------------------------------------------------------------------- sessions


def sessions(quick: bool) -> Outcome:
    cap, ttl = 1000, 4.0
    service = env_service(max_sessions=cap, session_ttl_s=ttl)
    with running(service), httpx.Client(base_url=service.url, timeout=60.0) as http:
        rss_before = service.rss_mb()
        created = 0
        for start in range(0, cap, 100):  # 10 bounded batches
            specs = [{"task_id": t % 50, "split": "train"} for t in range(start, start + 100)]
            answer = http.post("/v1/sessions/batch", json={"sessions": specs})
            answer.raise_for_status()
            created += sum(1 for item in answer.json()["results"] if item.get("result"))
        rss_full = service.rss_mb()
        over = http.post("/v1/sessions", json={"task_id": 0})
        refused = over.status_code == 503 and bool(over.headers.get("Retry-After"))
        time.sleep(ttl + 1.5)
        after = http.post("/v1/sessions", json={"task_id": 0})  # the expired are swept first
        live = scrape(service.url).get("sage_env_sessions", math.nan)
        rss_after = service.rss_mb()
    figures = {
        "created": created,
        "over the cap": f"{over.status_code} Retry-After={over.headers.get('Retry-After')}",
        "TTL s": ttl,
        "live after TTL": int(live),
        "create after TTL": after.status_code,
        "RSS MB": f"{rss_before:.0f}->{rss_full:.0f}->{rss_after:.0f}",
    }
    held = created == cap and refused and after.status_code == 201 and live == 1
    return Outcome("sessions", held, figures)


# --------------------------------------------------------------------------- the trainer


def write_config(folder: Path, env_url: str, teacher_url: str, **overrides: object) -> Path:
    """A short SAGE-OPD run on the shipped tiny models, checkpointing every step."""
    config = {
        "student": str(MODELS / "student-init"),
        "teacher_urls": [teacher_url],
        "env_url": env_url,
        "env": "household",
        "history": None,
        "show_admissible": False,
        "max_turns": 8,
        "max_new_tokens": 24,
        "temperature": 0.4,
        "episodes_per_step": 4,
        "steps": 6,
        "lr": 1e-4,
        "eval_every": 0,
        "eval_at_start": False,
        "eval_splits": ["valid_seen"],
        "eval_tasks": 4,
        "diagnose_decisions": 0,
        "checkpoint_every": 1,
        "keep_checkpoints": 2,
        "device": "cpu",
        "out_dir": str(folder / "run"),
        "loss": {"kind": "sage", "alpha": 0.5, "tokens": "action"},
        **overrides,
    }
    path = folder / "train.json"  # JSON is YAML
    path.write_text(json.dumps(config, indent=1))
    return path


def start_trainer(config: Path, log_path: Path) -> subprocess.Popen:
    log_file = log_path.open("ab")
    return subprocess.Popen(
        [str(BIN / "sage-opd"), "train", "--config", str(config), "--quiet"],
        cwd=ROOT,
        env={**os.environ, **QUIET},
        stdout=log_file,
        stderr=subprocess.STDOUT,
        preexec_fn=stop_with_parent,
    )


def metrics_rows(out_dir: Path) -> list[dict]:
    """The run's rows so far (a line being written is left out, as a resume does)."""
    path = out_dir / METRICS_FILE
    return read_metrics(path) if path.exists() else []


def wait_until(condition: Callable[[], bool], timeout_s: float, every_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every_s)
    return condition()


def finish(process: subprocess.Popen, timeout_s: float) -> int | None:
    """The trainer's exit status, or None when it did not end in time (then killed)."""
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return None


def tail(path: Path, lines: int = 5) -> str:
    return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])


def service_restart(kind: str, quick: bool) -> Outcome:
    """Kill the teacher or env service mid-training (the env while episodes of the third
    step have sessions open, the teacher half a second into it), start it again after a
    pause."""
    steps, down_s = (4, 3.0) if quick else (6, 5.0)
    with tempfile.TemporaryDirectory() as scratch, ExitStack() as stack:
        folder = Path(scratch)
        env = stack.enter_context(running(env_service()))
        teacher = stack.enter_context(running(teacher_service()))
        victim = teacher if kind == "teacher" else env
        out_dir = folder / "run"
        config = write_config(folder, env.url, teacher.url, steps=steps)
        trainer = start_trainer(config, folder / "trainer.log")
        if not wait_until(lambda: len(metrics_rows(out_dir)) >= 2, 300):
            trainer.kill()
            error = "no step 2: " + tail(folder / "trainer.log")
            return Outcome(f"{kind}-restart", False, {"error": error})
        if kind == "env":  # while the third step's episodes have sessions open
            wait_until(lambda: scrape(env.url).get("sage_env_sessions", 0) > 0, 30, 0.02)
        else:
            time.sleep(0.5)  # into the third step
        killed_at = time.monotonic()
        victim.kill()
        time.sleep(down_s)
        victim.start()
        outage = time.monotonic() - killed_at
        status = finish(trainer, 600)
        rows = metrics_rows(out_dir)
        log_tail = tail(folder / "trainer.log")
    numbers = [row["step"] for row in rows]
    collect = [row["time_collect_s"] for row in rows]
    spanning = max(rows[2:] or [{}], key=lambda row: row.get("time_collect_s", 0))
    usual = statistics.median(collect[:2]) if len(collect) >= 2 else math.nan
    dropped = sum(int(row.get("episodes_dropped", 0)) for row in rows)
    figures = {
        "exit": status,
        "steps": f"{len(numbers)}/{steps}",
        "lost": len(set(range(1, steps + 1)) - set(numbers)),
        "repeated": len(numbers) - len(set(numbers)),
        "outage s": round(outage, 1),
        "longest step after s": round(spanning.get("time_collect_s", math.nan), 1),
        "usual step s": round(usual, 1),
        "episodes dropped": dropped,
    }
    if status != 0:
        figures["log"] = log_tail
    held = status == 0 and numbers == list(range(1, steps + 1))
    return Outcome(f"{kind}-restart", held, figures)


def comparable(row: dict) -> dict:
    return {key: value for key, value in row.items() if not key.startswith("time_")}


def rows_equal(a: list[dict], b: list[dict], rel: float = 1e-5) -> tuple[bool, str]:
    """Rows equal but for timings; floats to ``rel``. Returns (equal, first difference)."""
    if len(a) != len(b):
        return False, f"{len(a)} rows vs {len(b)}"
    for left, right in zip(a, b, strict=True):
        left, right = comparable(left), comparable(right)
        if left.keys() != right.keys():
            return False, f"step {left.get('step')}: keys {sorted(left.keys() ^ right.keys())}"
        for key, value in left.items():
            other = right[key]
            if isinstance(value, float) and isinstance(other, float):
                if not math.isclose(value, other, rel_tol=rel, abs_tol=1e-9):
                    return False, f"step {left['step']}: {key} {value} vs {other}"
            elif value != other:
                return False, f"step {left['step']}: {key} {value!r} vs {other!r}"
    return True, ""


def checkpoint_kill(quick: bool) -> Outcome:
    """An uninterrupted run, then the same run killed while writing a checkpoint and resumed."""
    steps, kill_at = 4, 3
    with tempfile.TemporaryDirectory() as scratch, ExitStack() as stack:
        folder = Path(scratch)
        env = stack.enter_context(running(env_service()))
        teacher = stack.enter_context(running(teacher_service()))
        whole = folder / "whole"
        whole.mkdir()
        config = write_config(whole, env.url, teacher.url, steps=steps)
        status_whole = finish(start_trainer(config, whole / "trainer.log"), 600)
        expected = metrics_rows(whole / "run")

        cut = folder / "cut"
        cut.mkdir()
        config = write_config(cut, env.url, teacher.url, steps=steps)
        checkpoints = cut / "run" / "checkpoints"
        building = f".building-{kill_at:06d}"
        trainer = start_trainer(config, cut / "trainer.log")
        caught = False
        deadline = time.monotonic() + 600
        while trainer.poll() is None and time.monotonic() < deadline:
            if checkpoints.is_dir() and any(p.name == building for p in os.scandir(checkpoints)):
                trainer.send_signal(signal.SIGKILL)
                caught = True
                break
            time.sleep(0.0005)
        trainer.wait()
        complete = (
            sorted(p.name for p in checkpoints.glob("step-*")) if checkpoints.is_dir() else []
        )
        status_resumed = finish(start_trainer(config, cut / "trainer.log"), 600)
        log = (cut / "trainer.log").read_text(errors="replace")
        resumed_at = re.search(r"resuming from \S+ at step (\d+)", log)
        got = metrics_rows(cut / "run")
    equal, difference = rows_equal(expected, got)
    figures = {
        "killed while writing": f"step {kill_at}" if caught else "missed",
        "complete then": ",".join(name.split("-")[1].lstrip("0") for name in complete),
        "resumed at step": int(resumed_at.group(1)) if resumed_at else None,
        "exit": f"{status_whole}/{status_resumed}",
        "rows equal": f"{len(got)} of {len(expected)}" if equal else difference,
    }
    held = (
        caught
        and status_whole == 0
        and status_resumed == 0
        and resumed_at is not None
        and int(resumed_at.group(1)) == kill_at
        and equal
        and len(expected) == steps
    )
    return Outcome("checkpoint-kill", held, figures)


# --------------------------------------------------------------------------- swap


def swap(quick: bool) -> Outcome:
    """Clients score while an operator brings in new models: every other one loaded and
    activated in one call, the others loaded and then swapped to (the old one retires)."""
    seconds = 8.0 if quick else 20.0
    service = teacher_service(admin_token="reliability", allowed_roots=json.dumps([str(MODELS)]))
    admin = {"Authorization": "Bearer reliability"}
    with running(service), httpx.Client(base_url=service.url, timeout=120, headers=admin) as http:
        tally, stop, swaps, refused = Tally(), threading.Event(), ["teacher"], []

        def operator() -> None:
            while not stop.wait(1.0) and len(swaps) < 50:
                name = f"rev-{len(swaps)}"
                source = {"name": name, "source": str(MODELS / "teacher")}
                answer = http.post(
                    "/v1/models/load", json={**source, "activate": len(swaps) % 2 == 1}
                )
                if answer.status_code == 200 and len(swaps) % 2 == 0:
                    answer = http.post("/v1/models/swap", json={"name": name})
                if answer.status_code != 200:
                    refused.append(f"{answer.status_code} {answer.text[:160]}")
                    return
                swaps.append(name)

        thread = threading.Thread(target=operator)
        thread.start()
        try:
            asyncio.run(hammer(service.url, 16, seconds, 100_000, vocab_size(), tally))
        finally:
            stop.set()
            thread.join()
    figures = {
        "models brought in": len(swaps) - 1,
        "answered": len(tally.latencies),
        "failed": len(tally.failed) + tally.refused_bare,
        "503": tally.refused,
        "models named": f"{len(tally.models)} of {len(swaps)}",
    }
    if refused:
        figures["refused"] = refused[0]
    held = (
        not tally.failed
        and tally.refused_bare == 0
        and not refused
        and len(swaps) >= 3
        and tally.models <= set(swaps)
        and len(tally.models) >= 3
    )
    return Outcome("swap", held, figures)


# --------------------------------------------------------------------------- fuzz

FUZZ_CONFIG = Path(__file__).with_name("schemathesis.toml")


def schemathesis(url: str, examples: int, headers: dict[str, str] | None = None) -> dict:
    """Run `st run` with every check; returns cases generated, failures, and 500s seen."""
    command = [str(BIN / "st"), "--config-file", str(FUZZ_CONFIG), "run", f"{url}/openapi.json"]
    command += ["--checks", "all", "--max-examples", str(examples), "--seed", "1"]
    for key, value in (headers or {}).items():
        command += ["-H", f"{key}: {value}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
    out = done.stdout + done.stderr
    saved = Path(tempfile.gettempdir()) / f"reliability-fuzz-{urlsplit(url).port}.txt"
    saved.write_text(out)
    cases = re.search(r"(\d+) generated", out)
    failures = re.findall(r"❌ (ST\d+ [^:]+): (\d+)", out)
    return {
        "cases": int(cases.group(1)) if cases else 0,
        "failures": {name: int(count) for name, count in failures},
        "500s": out.count("[500]"),
        "exit": done.returncode,
        "output": saved,
    }


def fuzz(quick: bool) -> Outcome:
    """Examples per operation: enough for 1,000+ cases per service (the teacher has fewer
    operations, each with more to generate)."""
    env_examples, teacher_examples = (12, 8) if quick else (60, 40)
    figures: dict[str, object] = {}
    held = True
    with running(env_service()) as env:
        results = {"env": schemathesis(env.url, env_examples)}
    teacher = teacher_service(admin_token="fuzz", allowed_roots=json.dumps([str(MODELS)]))
    with running(teacher):
        auth = {"Authorization": "Bearer fuzz"}
        results["teacher"] = schemathesis(teacher.url, teacher_examples, auth)
    for name, result in results.items():
        failed = sum(result["failures"].values())
        figures[f"{name} cases"] = result["cases"]
        figures[f"{name} 500s"] = result["500s"]
        figures[f"{name} failures"] = (
            ",".join(f"{k}:{v}" for k, v in result["failures"].items()) or 0
        )
        if failed:
            figures[f"{name} output"] = str(result["output"])
        held &= result["500s"] == 0 and failed == 0 and result["exit"] == 0
        held &= quick or result["cases"] >= 1000
    return Outcome("fuzz", held, figures)


# --------------------------------------------------------------------------- main

SCENARIOS: dict[str, Callable[[bool], Outcome]] = {
    "load": load,
    "sessions": sessions,
    "teacher-restart": lambda quick: service_restart("teacher", quick),
    "env-restart": lambda quick: service_restart("env", quick),
    "checkpoint-kill": checkpoint_kill,
    "swap": swap,
    "fuzz": fuzz,
}


def run(names: list[str], quick: bool) -> list[Outcome]:
    outcomes = []
    for name in names:
        began = time.monotonic()
        try:
            outcome = SCENARIOS[name](quick)
        except Exception as exc:  # a scenario that breaks did not hold; the others still run
            outcome = Outcome(name, False, {"error": f"{type(exc).__name__}: {exc}"[:300]})
        outcome.seconds = time.monotonic() - began
        outcomes.append(outcome)
        print(format_row(outcome), flush=True)
    return outcomes


def format_row(outcome: Outcome) -> str:
    figures = "; ".join(f"{key} {value}" for key, value in outcome.figures.items())
    verdict = "held" if outcome.held else "FAILED"
    return f"{outcome.name:<16} {verdict:<7} {outcome.seconds:6.1f}s  {figures}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios")
    parser.add_argument("--quick", action="store_true", help="shorter loads, fewer cases")
    args = parser.parse_args()
    names = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}")
    print(f"reliability on {os.cpu_count()} cores, loopback only; models: {MODELS}")
    print(f"{'scenario':<16} {'verdict':<7} {'time':>7}  figures")
    outcomes = run(names, args.quick)
    held = sum(o.held for o in outcomes)
    print(f"scenarios held: {held}/{len(outcomes)}")
    return 0 if held == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
