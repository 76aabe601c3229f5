"""``vllm-medusa bench``: plain decoding vs speculative decoding at several concurrencies.

The same prompts go through each configuration through vLLM's OpenAI-compatible server on
127.0.0.1 with a bounded load generator (``--mode server``, default: at most ``c`` requests in
flight, streamed) or through offline ``vllm.LLM`` (``--mode offline``: ``max_num_seqs = c``,
all prompts submitted at once, or one at a time for ``c = 1``). Every engine runs in its own
process.

Server mode measures each configuration *paired* with plain decoding: both servers run side
by side (one loaded at a time) and, at every concurrency, the two take turns in ABBA order
(``--repeats`` rounds), so that a machine that speeds up or slows down over minutes moves
both sides of a ratio alike. A configuration's speedup is its tokens/s over its own plain
runs'; the ``plain`` row pools all plain runs.

Configurations (``plain`` always runs: it is the reference):

- ``plain``: no speculation;
- ``ngram``: vLLM's n-gram (prompt lookup) speculation;
- ``vllm-chain``: vLLM 0.32's own top-1 chain Medusa (plugin disabled), on the Medusa-1 heads
  (``--chain-heads``, exported to vLLM's layout: the only kind vLLM loads);
- ``tree-full`` / ``tree-auto``: tree Medusa (``--heads``) drafting the whole tree every step,
  or with the cost-aware draft budget (the default);
- any of them with ``+preload``: ``LD_PRELOAD`` of tcmalloc and Intel OpenMP
  (:func:`preload_libraries`), which vLLM's CPU docs recommend.

Per configuration and concurrency: output tokens/s, speedup over plain at the same
concurrency, tau (mean tokens per verification step) and accepted tokens by depth (vLLM's
spec-decode counters), time per output token p50/p99 and time to first token p50 (server),
and whether every output equals plain decoding's. Writes ``bench.json``, ``speedup.png``
(speedup vs concurrency) and ``tau_by_depth.png`` to ``--output``.

Machines are noisy: compare ratios within one run, never absolute numbers across runs, and
run nothing heavy beside a benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from vllm_medusa.preload import preload_libraries
from vllm_medusa.ray_serve import free_loopback_port  # no Ray import: the plain-HTTP half

CONFIGS = ("plain", "ngram", "vllm-chain", "tree-full", "tree-auto")
PRELOAD_SUFFIX = "+preload"
NGRAM_CONFIG = {
    "method": "ngram",
    "num_speculative_tokens": 4,
    "prompt_lookup_max": 4,
    "prompt_lookup_min": 2,
}


def preload_env() -> dict[str, str]:
    libs = preload_libraries()
    if len(libs) < 2:
        raise SystemExit(
            "+preload needs tcmalloc (apt-get install libtcmalloc-minimal4) and libiomp5.so "
            f"(pip install intel-openmp); found only {libs}"
        )
    return {"LD_PRELOAD": ":".join(libs)}


ACCEPTANCE_MODES = ("greedy", "typical", "exact")


def parse_config(config: str) -> tuple[str, str | None, bool]:
    """``tree-auto/typical+preload`` -> (``tree-auto``, ``typical``, True); the acceptance
    part only for tree configurations."""
    preload = config.endswith(PRELOAD_SUFFIX)
    name = config.removesuffix(PRELOAD_SUFFIX)
    base, _, acceptance = name.partition("/")
    if base not in CONFIGS:
        raise SystemExit(f"unknown configuration {config!r}; known: {', '.join(CONFIGS)}")
    if acceptance and (not base.startswith("tree") or acceptance not in ACCEPTANCE_MODES):
        raise SystemExit(
            f"{config!r}: an acceptance suffix (/{'|/'.join(ACCEPTANCE_MODES)}) applies to "
            "tree-full and tree-auto only"
        )
    return base, acceptance or None, preload


@dataclass
class Setup:
    """What every configuration shares."""

    model: Path
    heads: Path
    chain_heads: Path
    tree: object
    eager: bool
    max_num_seqs: int
    workdir: Path
    temperature: float = 0.0
    _vllm_heads: Path | None = None

    def vllm_chain_heads(self) -> tuple[Path, int]:
        """The Medusa-1 heads exported to vLLM's layout (once per run)."""
        from vllm_medusa.core.checkpoint import export_vllm, load_heads

        heads = load_heads(self.chain_heads)
        if self._vllm_heads is None:
            from safetensors.torch import load_file

            state = load_file(self.model / "model.safetensors")
            base = state.get("lm_head.weight", state.get("model.embed_tokens.weight"))
            self._vllm_heads = export_vllm(
                heads, self.workdir / "vllm-heads", base_lm_head_weight=base
            )
        return self._vllm_heads, heads.num_heads

    def engine(self, config: str) -> tuple[dict, dict]:
        """(engine kwargs beyond the model, extra environment) of one configuration."""
        base, acceptance, preload = parse_config(config)
        # Without +preload, nothing preloaded (not even what the bench's own caller had).
        env = preload_env() if preload else {"LD_PRELOAD": ""}
        kwargs: dict = {}
        if base == "ngram":
            kwargs["speculative_config"] = dict(NGRAM_CONFIG)
        elif base == "vllm-chain":
            heads, num_heads = self.vllm_chain_heads()
            kwargs["speculative_config"] = {
                "method": "medusa",
                "model": str(heads),
                "num_speculative_tokens": num_heads,
            }
            env["VLLM_PLUGINS"] = "none"
        elif base in ("tree-full", "tree-auto"):
            from vllm_medusa.engine_args import medusa_engine_kwargs

            options = {"draft_budget": "full" if base == "tree-full" else "auto"}
            if acceptance:
                options["acceptance"] = acceptance
            kwargs.update(medusa_engine_kwargs(self.heads, self.tree, **options))
        return kwargs, env


@dataclass
class Result:
    config: str
    concurrency: int
    requests: int
    output_tokens: int
    seconds: float
    tau: float
    accepted_per_depth: list[float] = field(default_factory=list)
    ttft_ms_p50: float | None = None
    tpot_ms_p50: float | None = None
    tpot_ms_p99: float | None = None
    outputs: list = field(default_factory=list, repr=False)
    speedup: float | None = None
    identical_to_plain: bool | None = None
    # Paired runs (server mode): plain decoding's tokens/s and outputs in the same turns.
    reference_tokens_per_s: float | None = None
    reference_outputs: list | None = field(default=None, repr=False)
    runs: int = 1

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


# ---- server mode ------------------------------------------------------------------------


def _server_command(setup: Setup, kwargs: dict, port: int) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(setup.model),
        "--served-model-name",
        "model",
        "--dtype",
        "float32",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-num-seqs",
        str(setup.max_num_seqs),
        "--max-model-len",
        "2048",
        "--seed",
        "0",
        "--no-enable-prefix-caching",  # every concurrency level pays its own prefills
    ]
    if setup.eager:
        command.append("--enforce-eager")
    if "speculative_config" in kwargs:
        command += ["--speculative-config", json.dumps(kwargs["speculative_config"])]
    if "additional_config" in kwargs:
        command += ["--additional-config", json.dumps(kwargs["additional_config"])]
    return command


class Server:
    """One OpenAI server in a subprocess (log in the run's work folder)."""

    def __init__(self, setup: Setup, config: str, start_timeout_s: float = 600):
        kwargs, env = setup.engine(config)
        self.port = free_loopback_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = setup.workdir / f"server-{config.replace('/', '-')}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            _server_command(setup, kwargs, self.port),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
        self._wait_ready(start_timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        import requests

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}:\n{self.log_path.read_text()[-4000:]}"
                )
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"server did not start in {timeout_s} s (log: {self.log_path})")

    def metrics(self):
        import requests

        from vllm_medusa.metrics import summarize_prometheus

        return summarize_prometheus(requests.get(self.url + "/metrics", timeout=30).text)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


async def _stream_one(
    session, url: str, prompt: str, max_tokens: int, temperature: float, seed: int
) -> dict:
    """One streamed chat completion: text, output tokens, time to first token, per-token time."""
    body = {
        "model": "model",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = last = None
    text, tokens = [], 0
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    text.append(piece)
    end = time.perf_counter()
    first, last = first or end, last or end
    return {
        "text": "".join(text),
        "tokens": tokens,
        "ttft": first - start,
        "tpot": (last - first) / (tokens - 1) if tokens > 1 else None,
    }


async def _load(
    url: str, prompts: list[str], concurrency: int, max_tokens: int, bar, temperature: float = 0.0
) -> list:
    """All prompts, at most ``concurrency`` in flight; results in prompt order."""
    import aiohttp

    gate = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one(seed, prompt):
            async with gate:
                out = await _stream_one(session, url, prompt, max_tokens, temperature, seed)
                bar.update(1)
                return out

        return await asyncio.gather(*(one(k, p) for k, p in enumerate(prompts)))


def _measure_level(server: Server, setup: Setup, config: str, concurrency, prompts, max_tokens):
    """One pass of all prompts at one concurrency: (Result, spec counters before, after)."""
    before = server.metrics()
    with tqdm(total=len(prompts), desc=f"{config} c={concurrency}", leave=False) as bar:
        start = time.perf_counter()
        outs = asyncio.run(
            _load(server.url, prompts, concurrency, max_tokens, bar, setup.temperature)
        )
        seconds = time.perf_counter() - start
    after = server.metrics()
    tpots = [o["tpot"] for o in outs if o["tpot"] is not None]
    result = Result(
        config=config,
        concurrency=concurrency,
        requests=len(prompts),
        output_tokens=sum(o["tokens"] for o in outs),
        seconds=seconds,
        tau=1.0,
        ttft_ms_p50=1e3 * _percentile([o["ttft"] for o in outs], 50),
        tpot_ms_p50=None if not tpots else 1e3 * _percentile(tpots, 50),
        tpot_ms_p99=None if not tpots else 1e3 * _percentile(tpots, 99),
        outputs=[o["text"] for o in outs],
    )
    return result, before, after


def pool_runs(runs: list[Result], spec: dict | None = None) -> Result:
    """Repeated passes of one configuration at one concurrency as one result: tokens and
    seconds summed, latency percentiles the median of the passes', the first pass's outputs
    (``outputs`` is None when the passes' outputs differ, which greedy decoding must not)."""
    first = runs[0]

    def median(values):
        values = [v for v in values if v is not None]
        return None if not values else _percentile(values, 50)

    same = all(r.outputs == first.outputs for r in runs)
    return Result(
        config=first.config,
        concurrency=first.concurrency,
        requests=sum(r.requests for r in runs),
        output_tokens=sum(r.output_tokens for r in runs),
        seconds=sum(r.seconds for r in runs),
        tau=(spec or {}).get("tau", first.tau),
        accepted_per_depth=(spec or {}).get("accepted_per_depth", first.accepted_per_depth),
        ttft_ms_p50=median([r.ttft_ms_p50 for r in runs]),
        tpot_ms_p50=median([r.tpot_ms_p50 for r in runs]),
        tpot_ms_p99=median([r.tpot_ms_p99 for r in runs]),
        outputs=first.outputs if same else None,
        runs=len(runs),
    )


def abba_order(repeats: int) -> list[int]:
    """Turns of (0 = plain, 1 = the configuration) for ``repeats`` rounds: 0 1 1 0 0 1 ..."""
    return [side if r % 2 == 0 else 1 - side for r in range(repeats) for side in (0, 1)]


def run_server_pair(setup, config, prompts_by_level, max_tokens, repeats=2):
    """``config`` and plain decoding on two live servers taking turns (ABBA) at every
    concurrency: (plain results, config results), the config's paired with plain's."""
    names = ("plain", config)
    servers = []
    try:
        for name in names:
            servers.append(Server(setup, name))
        for server in servers:  # warm-up
            asyncio.run(_load(server.url, prompts_by_level[0][1][:1], 1, 8, _NoBar()))
        plain_results, config_results = [], []
        for concurrency, prompts in prompts_by_level:
            runs: tuple[list, list] = ([], [])
            first_before, last_after = None, None
            for side in abba_order(repeats):
                result, before, after = _measure_level(
                    servers[side], setup, names[side], concurrency, prompts, max_tokens
                )
                runs[side].append(result)
                if side == 1:
                    first_before = first_before or before
                    last_after = after
            plain = pool_runs(runs[0])
            mine = pool_runs(runs[1], _spec_delta(first_before, last_after))
            mine.reference_tokens_per_s = plain.tokens_per_s
            mine.reference_outputs = plain.outputs
            plain_results.append(plain)
            config_results.append(mine)
    finally:
        for server in servers:
            server.stop()
    return plain_results, config_results


def run_server_configs(setup, configs, prompts_by_level, max_tokens, repeats) -> list[Result]:
    """Every configuration paired with plain decoding; the plain row pools all plain runs."""
    others = [c for c in configs if c != "plain"]
    plain_by_level: dict[int, list[Result]] = {}
    results: list[Result] = []
    if not others:
        server = Server(setup, "plain")
        try:
            for concurrency, prompts in prompts_by_level:
                runs = [
                    _measure_level(server, setup, "plain", concurrency, prompts, max_tokens)[0]
                    for _ in range(repeats)
                ]
                plain_by_level[concurrency] = runs
        finally:
            server.stop()
    for config in tqdm(others, desc="bench (server, paired with plain)", unit="config"):
        plains, mine = run_server_pair(setup, config, prompts_by_level, max_tokens, repeats)
        for p in plains:
            plain_by_level.setdefault(p.concurrency, []).append(p)
        results += mine
    for runs in plain_by_level.values():
        pooled = pool_runs(runs)
        pooled.runs = sum(r.runs for r in runs)
        results.insert(0, pooled)
    return results


class _NoBar:
    def update(self, n):
        pass


def _spec_delta(before, after) -> dict:
    drafts = after.num_drafts - before.num_drafts
    if drafts <= 0:
        return {"tau": 1.0, "accepted_per_depth": []}
    accepted = after.num_accepted_tokens - before.num_accepted_tokens
    per_pos = [
        (a - (before.accepted_per_position[i] if i < len(before.accepted_per_position) else 0))
        / drafts
        for i, a in enumerate(after.accepted_per_position)
    ]
    return {"tau": 1.0 + accepted / drafts, "accepted_per_depth": per_pos}


# ---- offline mode -----------------------------------------------------------------------


def run_offline_config(setup, config, prompts_by_level, max_tokens) -> list[Result]:
    kwargs, env = setup.engine(config)
    results = []
    for concurrency, prompts in prompts_by_level:
        job = {
            "model": str(setup.model),
            "engine": {
                "max_model_len": 2048,
                "max_num_seqs": concurrency,
                "enforce_eager": setup.eager,
                "enable_prefix_caching": False,
                **{k: v for k, v in kwargs.items()},
            },
            "prompts": prompts,
            "sampling_per_prompt": [
                {"temperature": setup.temperature, "max_tokens": max_tokens, "seed": k}
                for k in range(len(prompts))
            ],
            "one_at_a_time": concurrency == 1,
            "kv_cache_gib": 2,
        }
        out = _run_engine_job(job, setup.workdir, f"{config.replace('/', '-')}-c{concurrency}", env)
        spec = out["spec"] or {}
        drafts = spec.get("num_drafts", 0)
        results.append(
            Result(
                config=config,
                concurrency=concurrency,
                requests=len(prompts),
                output_tokens=sum(len(t) for t in out["token_ids"]),
                seconds=out["seconds"],
                tau=spec.get("tau", 1.0),
                accepted_per_depth=[a / drafts for a in spec.get("accepted_per_position", [])]
                if drafts
                else [],
                outputs=out["token_ids"],
            )
        )
    return results


def _run_engine_job(job: dict, workdir: Path, name: str, env: dict) -> dict:
    from vllm_medusa.engine_job import run_in_subprocess

    proc, out_file = run_in_subprocess(job, workdir, name, env)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(out_file.read_text())


# ---- report -----------------------------------------------------------------------------


def compare_to_plain(results: list[Result], sampled: bool = False) -> None:
    """Speedups against plain decoding at the same concurrency; identity only for greedy
    runs (sampled outputs differ from plain decoding's by chance)."""
    for r in results:
        if r.reference_tokens_per_s is not None:  # paired with its own plain runs
            r.speedup = r.tokens_per_s / r.reference_tokens_per_s
            r.identical_to_plain = None if sampled else _same(r.outputs, r.reference_outputs)
            continue
        plain = next(p for p in results if p.config == "plain" and p.concurrency == r.concurrency)
        r.speedup = r.tokens_per_s / plain.tokens_per_s
        r.identical_to_plain = None if sampled else _same(r.outputs, plain.outputs)


def _same(outputs: list | None, reference: list | None) -> bool:
    """Outputs equal to the reference's (None: a configuration's passes disagreed)."""
    return outputs is not None and reference is not None and outputs == reference


def format_table(results: list[Result]) -> str:
    def ms(x):
        return "-" if x is None else f"{x:.0f}"

    same = {True: "yes", False: "NO", None: "n/a"}

    lines = [
        "| config | conc | tok/s | speedup | tau | TPOT p50/p99 ms | TTFT p50 ms | = plain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r.concurrency, CONFIGS_ORDER(r.config))):
        lines.append(
            f"| {r.config} | {r.concurrency} | {r.tokens_per_s:.1f} | {r.speedup:.2f}x | "
            f"{r.tau:.2f} | {ms(r.tpot_ms_p50)}/{ms(r.tpot_ms_p99)} | {ms(r.ttft_ms_p50)} | "
            f"{same[r.identical_to_plain]} |"
        )
    return "\n".join(lines)


def CONFIGS_ORDER(config: str) -> tuple[int, str]:  # noqa: N802 - a sort key
    return (CONFIGS.index(parse_config(config)[0]), config)


def plot(results: list[Result], out_dir: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted({r.config for r in results}, key=CONFIGS_ORDER)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for config in configs:
        rows = sorted((r for r in results if r.config == config), key=lambda r: r.concurrency)
        ax.plot([r.concurrency for r in rows], [r.speedup for r in rows], marker="o", label=config)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    levels = sorted({r.concurrency for r in results})
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens/s vs plain decoding")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    speedup_png = out_dir / "speedup.png"
    fig.savefig(speedup_png, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    spec = [r for r in results if r.accepted_per_depth]
    for r in spec:
        depths = range(1, len(r.accepted_per_depth) + 1)
        ax.plot(
            list(depths), r.accepted_per_depth, marker="o", label=f"{r.config} c={r.concurrency}"
        )
    ax.set_xlabel("depth")
    ax.set_ylabel("accepted tokens per verification step")
    ax.set_title("acceptance by depth (" + title + ")", fontsize=9)
    if spec:
        ax.legend(fontsize=7)
    fig.tight_layout()
    tau_png = out_dir / "tau_by_depth.png"
    fig.savefig(tau_png, dpi=120)
    plt.close(fig)
    return [speedup_png, tau_png]


# ---- command ----------------------------------------------------------------------------


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=("server", "offline"), default="server")
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["ngram", "vllm-chain", "tree-full", "tree-auto"],
        help=f"besides plain decoding: {', '.join(CONFIGS)}; tree ones optionally with an "
        f"acceptance suffix (/greedy, /typical, /exact); any with '{PRELOAD_SUFFIX}'",
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--prompts", choices=("mt-bench", "sharegpt"), default="mt-bench")
    parser.add_argument(
        "--prompts-file", default=None, help="JSONL prompts instead of --prompts (see data.py)"
    )
    parser.add_argument(
        "--num-prompts",
        type=int,
        default=16,
        help="requests per concurrency level (at least the concurrency itself)",
    )
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="of every request (seeded per prompt); > 0 with e.g. tree-auto/typical",
    )
    parser.add_argument("--heads", default=None, help="tree Medusa heads (default: shipped)")
    parser.add_argument("--chain-heads", default=None, help="Medusa-1 heads for vllm-chain")
    parser.add_argument("--tree", default=None, help="tree for tree Medusa (default: heads')")
    parser.add_argument(
        "--compiled", action="store_true", help="torch.compile engines (default: eager)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="server mode: ABBA rounds of (plain, config) per concurrency (2 = 2 runs each)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a small run (CI): 4 x 32, c=1,4, 1 round"
    )
    parser.add_argument("--output", type=Path, default=Path("runs/bench"))


def _prompts(kind: str, count: int, path: str | None = None) -> list[str]:
    from vllm_medusa.data import load_prompts_file, mt_bench_first_turns, sharegpt_split

    if path is not None:
        pool = load_prompts_file(path)
    elif kind == "mt-bench":
        pool = mt_bench_first_turns()
    else:
        pool = [p for _, p, _ in sharegpt_split("heldout")]
    return [pool[i % len(pool)] for i in range(count)]


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm_medusa.models import default_model_path
    from vllm_medusa.paths import SHIPPED_MEDUSA1_HEADS, shipped_heads_dir
    from vllm_medusa.serve import parse_tree_option

    if args.quick:
        args.num_prompts, args.max_tokens, args.repeats = 4, 32, 1
        args.concurrency = [c for c in args.concurrency if c <= 4] or [1, 4]
    configs = ["plain", *[c for c in args.configs if c != "plain"]]
    for c in configs:
        parse_config(c)  # unknown names fail before any engine starts
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be at least 1, got {args.repeats}")
    levels = sorted(set(args.concurrency))
    prompts_by_level = [
        (c, _prompts(args.prompts, max(args.num_prompts, c), args.prompts_file)) for c in levels
    ]
    args.output.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="vllm-medusa-bench-"))
    setup = Setup(
        model=default_model_path(),
        heads=Path(args.heads) if args.heads else shipped_heads_dir(),
        chain_heads=Path(args.chain_heads)
        if args.chain_heads
        else shipped_heads_dir(SHIPPED_MEDUSA1_HEADS),
        tree=parse_tree_option(args.tree),
        eager=not args.compiled,
        max_num_seqs=max(levels),
        workdir=workdir,
        temperature=args.temperature,
    )
    results: list[Result] = []
    if args.mode == "server":
        results = run_server_configs(
            setup, configs, prompts_by_level, args.max_tokens, args.repeats
        )
    else:
        for config in tqdm(configs, desc=f"bench ({args.mode})", unit="config"):
            results += run_offline_config(setup, config, prompts_by_level, args.max_tokens)
    compare_to_plain(results, sampled=args.temperature > 0)

    title = (
        f"{args.mode}, {Path(args.prompts_file).name if args.prompts_file else args.prompts} "
        f"x {args.max_tokens} tokens, T={args.temperature:g}, "
        f"{'eager' if setup.eager else 'compiled'}"
    )
    print(f"\n{title}; heads {setup.heads.name}; logs in {workdir}")
    print(format_table(results))
    report = {
        "mode": args.mode,
        "prompts": args.prompts,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "heads": setup.heads.name,
        "chain_heads": setup.chain_heads.name,
        "eager": setup.eager,
        # Library names only: reports carry no paths of the machine that measured them.
        "preload": [Path(lib).name for lib in preload_libraries()],
        "results": [
            {k: v for k, v in r.__dict__.items() if k != "outputs"}
            | {"tokens_per_s": r.tokens_per_s}
            for r in results
        ],
    }
    (args.output / "bench.json").write_text(json.dumps(report, indent=1) + "\n")
    try:
        pngs = plot(results, args.output, title)
    except ImportError:  # matplotlib is the `plot` extra
        pngs = []
    print(f"results: {args.output / 'bench.json'} {' '.join(str(p) for p in pngs)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
