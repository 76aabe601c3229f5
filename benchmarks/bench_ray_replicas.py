"""Throughput of 1 vs 2 (vs N) Ray Serve replicas of tree Medusa on the same load, in one run.

One local Ray cluster; for each replica count the deployment (``vllm_medusa.ray_deployment``,
one core per replica on CPU) is deployed afresh, warmed up, and sent the same load: the
MT-Bench first turns as greedy chat requests, ``--concurrency`` at a time, through the one
endpoint. Prints output tokens/s, the fleet's tau (from the endpoint's summed ``/metrics``),
the speedup over the first replica count, and whether every answer is identical across
replica counts.

    python benchmarks/bench_ray_replicas.py [--replicas 1 2] [--num-prompts 16]
        [--max-tokens 64] [--concurrency 8] [--heads DIR] [--tree TREE]

Machines are noisy: compare ratios within one run, and only on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor


def _chat(url: str, prompt: str, max_tokens: int) -> tuple[str, int]:
    import requests

    resp = requests.post(
        f"{url}/v1/chat/completions",
        json={
            "model": "served",
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": max_tokens,
        },
        timeout=1800,
    )
    resp.raise_for_status()
    body = resp.json()
    return body["choices"][0]["message"]["content"], body["usage"]["completion_tokens"]


def _spec(url: str):
    import requests

    from vllm_medusa.metrics import summarize_prometheus

    return summarize_prometheus(requests.get(f"{url}/metrics", timeout=60).text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cpus-per-replica", type=int, default=1)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--heads", default=None, help="heads folder (default: shipped heads)")
    parser.add_argument("--tree", default=None, help="tree (default: the heads' tree.json)")
    parser.add_argument("--kv-cache-gib", default="1")
    args = parser.parse_args()

    import ray
    from ray import serve

    from vllm_medusa import ray_deployment
    from vllm_medusa.data import mt_bench_first_turns
    from vllm_medusa.engine_args import medusa_server_args
    from vllm_medusa.models import default_model_path
    from vllm_medusa.paths import assets_dir
    from vllm_medusa.ray_serve import free_loopback_port

    heads = args.heads or str(assets_dir() / "heads" / "smollm2-135m-instruct")
    prompts = mt_bench_first_turns()[: args.num_prompts]
    flags = [
        "--model",
        str(default_model_path()),
        "--dtype",
        "float32",
        *medusa_server_args(heads, args.tree),
        "--max-model-len",
        "2048",
        "--served-model-name",
        "served",
    ]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", args.kv_cache_gib)
    ray.init(
        num_cpus=max(args.replicas) * args.cpus_per_replica,
        include_dashboard=False,
        log_to_driver=False,
    )
    port = free_loopback_port()
    rows, answers = [], {}
    try:
        for n in args.replicas:
            app = ray_deployment.build_app(
                flags,
                num_replicas=n,
                cpus_per_replica=args.cpus_per_replica,
                env={"VLLM_CPU_KVCACHE_SPACE": os.environ["VLLM_CPU_KVCACHE_SPACE"]},
                log_dir=tempfile.mkdtemp(prefix="bench-ray-"),
                health_check_period_s=2,
            )
            t0 = time.perf_counter()
            url = ray_deployment.deploy(app, port=port)
            deploy_s = time.perf_counter() - t0
            with ThreadPoolExecutor(args.concurrency) as pool:
                # Warm-up: a short request per replica slot (first-request costs).
                list(pool.map(functools.partial(_chat, url, max_tokens=8), prompts[: 2 * n]))
                before = _spec(url)
                t0 = time.perf_counter()
                chat = functools.partial(_chat, url, max_tokens=args.max_tokens)
                results = list(pool.map(chat, prompts))
                wall = time.perf_counter() - t0
            time.sleep(5)  # per-replica counters arrive with the health checks
            after = _spec(url)
            drafts = after.num_drafts - before.num_drafts
            accepted = after.num_accepted_tokens - before.num_accepted_tokens
            tokens = sum(t for _, t in results)
            answers[n] = [text for text, _ in results]
            rows.append((n, deploy_s, wall, tokens, 1 + accepted / drafts if drafts else 1.0))
            serve.delete(ray_deployment.APP_NAME)
            ray_deployment.shutdown_registry()
    finally:
        serve.shutdown()
        ray_deployment.shutdown_registry()
        ray.shutdown()

    base = rows[0][3] / rows[0][2]
    first = answers[args.replicas[0]]
    print(
        f"\n{len(prompts)} MT-Bench prompts, max_tokens {args.max_tokens}, concurrency "
        f"{args.concurrency}, {args.cpus_per_replica} CPU(s) per replica"
    )
    print("replicas  deploy_s  wall_s  tokens  tok/s   speedup  tau    identical")
    for n, deploy_s, wall, tokens, tau in rows:
        same = answers[n] == first
        print(
            f"{n:>8}  {deploy_s:>8.1f}  {wall:>6.1f}  {tokens:>6}  {tokens / wall:>6.1f}  "
            f"{tokens / wall / base:>6.2f}x  {tau:.3f}  {same}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
