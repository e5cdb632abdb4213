"""A bounded load test on loopback: 64 chat requests over 8 adapters (ranks 2 to 16, two of them DoRA, one
rsLoRA, one on the attention's q/v projections only) from 32 client threads. Every request is answered, each
answer equals its in-process greedy answer (the adapter alone, transformers' ``generate``), the server's memory
stays flat from the first quarter of the answers to the last, and the latency percentiles are printed."""

from __future__ import annotations

import concurrent.futures
import statistics
import tempfile
import time
from pathlib import Path

import pytest

from serve_helpers import Reference, client, save_adapter, serving, tiny_setup

ADAPTERS = 8
REQUESTS = 64
CLIENTS = 32
TOKENS = 16


def rss_mib() -> float:
    """This process's resident memory (the server runs in it, on background threads)."""
    with open("/proc/self/status", encoding="ascii") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return kib / 1024


@pytest.mark.slow
def test_64_requests_over_8_adapters_from_32_clients():
    model_dir, _ = tiny_setup()
    root = Path(tempfile.mkdtemp(prefix="deltatune-load-"))
    options = {
        3: {"use_dora": True},
        6: {"use_dora": True},
        5: {"use_rslora": True},
        7: {"target_modules": ["q_proj", "v_proj"]},
    }
    adapters = {
        f"a{i}": save_adapter(model_dir, root / f"a{i}", seed=100 + i, r=[2, 4, 8, 16][i % 4], **options.get(i, {}))
        for i in range(ADAPTERS)
    }
    jobs = [
        (f"a{i % ADAPTERS}", [{"role": "user", "content": f"Request {i}: what do you know?"}]) for i in range(REQUESTS)
    ]
    reference = Reference(model_dir)
    expected = [reference.chat(adapters[name], messages, TOKENS) for name, messages in jobs]
    common = jobs[0][1]
    assert len({reference.chat(path, common, TOKENS) for path in adapters.values()}) == ADAPTERS  # a mix-up shows

    with serving(model_dir, adapters, max_concurrent=CLIENTS) as (url, service):
        api = client(url)

        def ask(job):
            name, messages = job
            start = time.perf_counter()
            reply = api.chat.completions.create(model=name, messages=messages, max_tokens=TOKENS, temperature=0)
            return reply.choices[0].message.content, time.perf_counter() - start, rss_mib()

        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(ask, jobs[:CLIENTS]))  # warm-up: the allocator's first growth is not a leak
            start = time.perf_counter()
            results = list(pool.map(ask, jobs))
            wall = time.perf_counter() - start
        assert service.scheduler.rows_in_flight == 0

    answers = [answer for answer, _, _ in results]
    assert answers == expected
    latencies = sorted(seconds for _, seconds, _ in results)
    by_completion = [rss for _, _, rss in sorted(results, key=lambda r: r[1])]
    quarter = REQUESTS // 4
    first, last = statistics.mean(by_completion[:quarter]), statistics.mean(by_completion[-quarter:])
    p50, p99 = latencies[len(latencies) // 2], latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print(
        f"\n{REQUESTS} requests, {ADAPTERS} adapters, {CLIENTS} clients: {wall:.2f} s, "
        f"{REQUESTS * TOKENS / wall:.0f} tokens/s, latency p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
        f"RSS {first:.0f} -> {last:.0f} MiB"
    )
    assert last - first < max(16.0, 0.03 * first), f"RSS grew from {first:.0f} to {last:.0f} MiB"
