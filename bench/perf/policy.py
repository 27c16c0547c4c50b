"""Policy-serving benchmark: four figures from one run against one vLLM server it starts itself.

    .venv/bin/python -m bench.perf.policy [--dtype bfloat16] [--prompts 32] [--n 8] \
        [--max-tokens 64] [--out bench-results/policy.json]

1. generated tokens/s through our client (VLLMPolicy.sample: version read, POST, version read)
   vs raw POSTs of the very same body to /v1/chat/completions, same prompts and parameters,
   sequential, the two variants alternated prompt by prompt; plus the client's overhead;
2. n samples in one request vs n separate n=1 requests (sequential, and concurrent) for the
   same ~300-token prompt: what sharing the prompt in one request is worth;
3. VLLMDiskPublisher.publish of the model's full state_dict vs writing the same weights with
   safetensors to local disk, with the server's version checked after every publish;
4. the same tokens/s with InProcessPolicy on the same model and prompts (after the server
   stopped, so it has the machine alone, as it would as the single-machine engine).
5. the peak memory of one n-sample request to InProcessPolicy, free-form and in choice mode, on
   the preset's body with tied embeddings and Qwen2.5's 151,936-token vocabulary: the engine now
   (per-step log-probs, allowed-token choice logits) and as it was (generate's score history, a
   [choices, width, vocab] choice tensor; kept here only). RSS on CPU, max_memory_allocated with
   --memory-device cuda. `--memory-only` runs this figure alone (no vLLM).
6. publishing to 2 vLLM servers (a second one started beside the first): time per publish
   (all paused, reloaded, relabelled, resumed together), and after each publish both servers'
   versions and served-weight checksums (POST /weight_checker) equal. `--two-servers-only` runs
   this figure alone (`--no-two-servers`: skip it).

The model is a fresh `small` preset (spo3.app.model_init) in a temporary directory; the server
binds to loopback only and is stopped in a finally. Prints a table and writes JSON.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

import httpx
import typer

from bench.perf.harness import (
    Row,
    cpu_seconds,
    machine_busy_seconds,
    percentile,
    print_table,
    progress,
    write_json,
)
from spo3.app.model_init import PRESETS, init_model
from spo3.policy.publish import VLLMDiskPublisher
from spo3.policy.vllm_client import VLLMPolicy, chat_body
from spo3.policy.vllm_server import VLLMServer
from spo3.transport.contracts import ChatMessage, SamplingParams

CLIENT_TARGET_RATIO = 0.9
CHAT = "/v1/chat/completions"

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


# --- helpers -----------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ms(seconds: float) -> str:
    return f"{1e3 * seconds:,.1f} ms"


def process_tree(session: int) -> list[int]:
    """Pids of a process group started with start_new_session (vLLM's API server + engine)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[3]) == session:
                    pids.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return pids


def tree_cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of these processes (all threads); processes gone since count 0."""
    return sum(cpu_seconds(pid) for pid in pids)


# --- prompts -----------------------------------------------------------------------------

_PLACES = [
    "kitchen",
    "bedroom",
    "bathroom",
    "corridor",
    "pantry",
    "garden",
    "living room",
    "attic",
    "cellar",
    "study",
    "street",
    "backyard",
    "shed",
    "office",
]
_OBJECTS = [
    "apple",
    "key",
    "door",
    "fridge",
    "table",
    "counter",
    "box",
    "chest",
    "knife",
    "coin",
    "lettuce",
    "carrot",
    "potato",
    "oven",
    "stove",
    "drawer",
    "cabinet",
    "shelf",
    "sofa",
    "bed",
    "mug",
    "plate",
    "bowl",
    "book",
    "lamp",
    "towel",
    "sink",
    "garbage can",
    "safe",
]
_VERBS = [
    "take",
    "drop",
    "open",
    "close",
    "examine",
    "eat",
    "cook",
    "slice",
    "heat",
    "cool",
    "clean",
]
_DIRS = ["north", "south", "east", "west", "up", "down"]
SYSTEM = (
    "You are an agent in a text world. Think briefly inside <think></think>, then answer with "
    "exactly one admissible action inside <action></action>."
)


def _sentence(rng: random.Random) -> str:
    v, o, p, d = rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_PLACES), rng.choice(_DIRS)
    return rng.choice(
        [
            f"You are in the {p}. You see a {o} and a {rng.choice(_OBJECTS)}. Exits: {d}.",
            f"Admissible actions: {v} {o}, go {d}, look, inventory, examine {rng.choice(_OBJECTS)}.",
            f"Your task is to put a {o} in the {rng.choice(_OBJECTS)}. Step {rng.randint(1, 50)}.",
            f"Nothing happens. You are carrying: a {o}. Score: {rng.randint(0, 10)}/10.",
            f"You {v} the {o}. The {rng.choice(_OBJECTS)} is {rng.choice(['open', 'closed', 'empty'])}.",
        ]
    )


def make_prompts(
    tokenizer, count: int, target_tokens: int, seed: int, own_system: bool = False
) -> tuple[list[list[ChatMessage]], list[int]]:
    """`count` distinct chat prompts of about `target_tokens` tokens after the chat template.
    By default they share one system message (as an agent's prompts do); own_system gives each
    a long system message of its own, so that half of the prompt is system text."""
    rng = random.Random(seed)
    prompts, lengths = [], []

    def n_tokens(messages: list[ChatMessage]) -> int:
        ids = tokenizer.apply_chat_template(
            [m.model_dump() for m in messages], add_generation_prompt=True, tokenize=True
        )
        return len(ids["input_ids"] if hasattr(ids, "keys") else ids)

    for _ in range(count):
        system, user = SYSTEM, []
        if own_system:
            while n_tokens([ChatMessage(role="system", content=system)]) < target_tokens // 2:
                system += " " + _sentence(rng)
        while True:
            messages = [
                ChatMessage(role="system", content=system),
                ChatMessage(role="user", content=" ".join(user) or "Begin."),
            ]
            if (length := n_tokens(messages)) >= target_tokens:
                break
            user.append(_sentence(rng))
        prompts.append(messages)
        lengths.append(length)
    return prompts, lengths


def recorded_requests(policy: VLLMPolicy, messages, params) -> list[tuple[str, str, bytes]]:
    """(method, path, body) of every request one policy.sample sends."""
    seen: list[tuple[str, str, bytes]] = []
    client = policy.http._client
    client.event_hooks = {
        "request": [lambda r: seen.append((r.method, r.url.path, r.content))],
        "response": [],
    }
    try:
        policy.sample(messages, params)
    finally:
        client.event_hooks = {"request": [], "response": []}
    return seen


def raw_sample(http: httpx.Client, body: dict) -> int:
    """One raw POST; returns the number of generated tokens."""
    r = http.post(CHAT, json=body)
    r.raise_for_status()
    return sum(len(c["token_ids"]) for c in r.json()["choices"])


# --- figure 1: client vs raw -------------------------------------------------------------


def bench_client(
    url: str, server_pids: list[int], prompts, params: SamplingParams, *, rounds: int
) -> tuple[dict, list[Row]]:
    policy = VLLMPolicy(url)
    http = httpx.Client(base_url=url, timeout=120.0)
    try:
        # Same body (posted to render, or to CHAT by the three-call fallback), and the requests
        # the client makes per sample (POST render, POST generate; or GET, POST, GET).
        policy.refresh(force=True)  # the health check now, not inside the recorded sample
        seen = recorded_requests(policy, prompts[0], params)
        posts = [json.loads(b) for m, p, b in seen if m == "POST" and p in (CHAT, CHAT + "/render")]
        expect = chat_body(policy.model, prompts[0], params)
        if posts != [expect]:
            raise AssertionError(
                f"VLLMPolicy posts another body than this benchmark's raw variant: "
                f"{posts} != {expect}"
            )
        pattern = [f"{m} {p}" for m, p, _ in seen]
        # Warm-up: every prompt's prefix in the cache for both variants alike, connections open.
        warm = params.model_copy(update={"max_tokens": 1, "n": 1})
        for messages in prompts:
            raw_sample(http, chat_body(policy.model, messages, warm))
        policy.sample(prompts[0], warm)

        def ours(messages) -> int:
            return sum(len(c.token_ids) for c in policy.sample(messages, params))

        def raw(messages) -> int:
            return raw_sample(http, chat_body(policy.model, messages, params))

        variants = {"client": ours, "raw": raw}
        lat: dict[str, list[float]] = {k: [] for k in variants}
        paired: list[float] = []  # client minus raw on the same prompt, run back to back
        tokens = {k: 0 for k in variants}
        cpu_client = {k: 0.0 for k in variants}
        cpu_server = {k: 0.0 for k in variants}
        with progress(
            rounds * len(prompts) * 2,
            f"{len(prompts)} prompts x n={params.n} x {params.max_tokens} tokens, client and raw",
        ) as advance:
            for r in range(rounds):
                for i, messages in enumerate(prompts):
                    order = ("client", "raw") if (r + i) % 2 == 0 else ("raw", "client")
                    for name in order:
                        s0, c0 = tree_cpu_seconds(server_pids), time.process_time()
                        t0 = time.perf_counter()
                        tokens[name] += variants[name](messages)
                        lat[name].append(time.perf_counter() - t0)
                        cpu_client[name] += time.process_time() - c0
                        cpu_server[name] += tree_cpu_seconds(server_pids) - s0
                    paired.append(lat["client"][-1] - lat["raw"][-1])
                    advance(2)

        # Where the client's time goes, each part on its own, on an idle server.
        version_s = []
        for _ in range(50):
            t0 = time.perf_counter()
            policy.version()
            version_s.append(time.perf_counter() - t0)
        response = policy.http.request(
            "POST", CHAT, json=chat_body(policy.model, prompts[0], params)
        )
        parse_s, json_s = [], []
        for _ in range(20):
            t0 = time.perf_counter()
            policy._parse(response, 0, url)
            parse_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            sum(len(c["token_ids"]) for c in json.loads(response.content)["choices"])
            json_s.append(time.perf_counter() - t0)
        # Version reads while the engine is generating (another actor's request in flight).
        busy_version_s: list[float] = []
        long = params.model_copy(update={"max_tokens": max(params.max_tokens, 64)})

        def background() -> None:
            with httpx.Client(base_url=url, timeout=120.0) as other:
                raw_sample(other, chat_body(policy.model, prompts[1 % len(prompts)], long))

        worker = threading.Thread(target=background)
        worker.start()
        time.sleep(0.05)
        while worker.is_alive() and len(busy_version_s) < 20:
            t0 = time.perf_counter()
            policy.version()
            busy_version_s.append(time.perf_counter() - t0)
        worker.join()
    finally:
        policy.close()
        http.close()

    elapsed = {k: sum(v) for k, v in lat.items()}
    rate = {k: tokens[k] / elapsed[k] for k in variants}
    ratio = rate["client"] / rate["raw"]
    n_req = {k: len(v) for k, v in lat.items()}
    # The median of back-to-back pairs resists the drift and noise of a shared machine; the
    # difference of means is kept in the JSON.
    overhead_s = median(paired)
    mean_overhead_s = elapsed["client"] / n_req["client"] - elapsed["raw"] / n_req["raw"]
    client_cpu_ms = {k: 1e3 * cpu_client[k] / n_req[k] for k in variants}
    result = {
        "prompts": len(prompts),
        "rounds": rounds,
        "params": params.model_dump(),
        "requests": n_req,
        "generated_tokens": tokens,
        "seconds": elapsed,
        "tokens_per_s": rate,
        "ratio_client_to_raw": ratio,
        "target_ratio": CLIENT_TARGET_RATIO,
        "pass": ratio >= CLIENT_TARGET_RATIO,
        "request_latency_p50_ms": {k: 1e3 * percentile(sorted(v), 0.5) for k, v in lat.items()},
        "client_overhead_ms_per_request_paired_median": 1e3 * overhead_s,
        "client_overhead_ms_per_request_mean": 1e3 * mean_overhead_s,
        "client_cpu_ms_per_request": client_cpu_ms,
        "server_cpu_cores": {k: cpu_server[k] / elapsed[k] for k in variants},
        "requests_per_sample": pattern,
        "weight_info_ms_idle": {"p50": 1e3 * median(version_s), "max": 1e3 * max(version_s)},
        "weight_info_ms_while_generating": {
            "p50": 1e3 * median(busy_version_s),
            "max": 1e3 * max(busy_version_s, default=float("nan")),
            "samples": len(busy_version_s),
        },
        "parse_ms": 1e3 * median(parse_s),
        "raw_json_ms": 1e3 * median(json_s),
    }
    v_idle, v_busy = (
        result["weight_info_ms_idle"]["p50"],
        result["weight_info_ms_while_generating"]["p50"],
    )
    rows = [
        Row(f"1 raw POST {CHAT}", f"{rate['raw']:,.0f} tok/s", "-", "baseline"),
        Row(
            f"1 VLLMPolicy.sample, {len(prompts)} prompts x n={params.n} x {params.max_tokens}",
            f"{rate['client']:,.0f} tok/s",
            f">= {CLIENT_TARGET_RATIO} x raw",
            f"{ratio:.3f} {'PASS' if result['pass'] else 'FAIL'}",
        ),
        Row(
            "1   client overhead per request (paired median)",
            f"{1e3 * overhead_s:+.1f} ms",
            "-",
            f"of {1e3 * median(lat['raw']):,.0f} ms/request",
        ),
        Row(
            "1   (diag) client CPU per request: ours / raw",
            f"{client_cpu_ms['client']:.1f} / {client_cpu_ms['raw']:.1f} ms",
        ),
        Row(f"1   (diag) {len(pattern)} calls/sample", " + ".join(pattern)),
        Row(
            "1   (diag) GET /weight_info (health checks; the three-call fallback)",
            f"{v_idle:.1f} ms idle, {v_busy:.1f} ms while generating",
        ),
        Row(
            "1   (diag) parse response: pydantic / json only",
            f"{result['parse_ms']:.2f} / {result['raw_json_ms']:.2f} ms",
        ),
    ]
    return result, rows


# --- figure 2: n in one request vs n requests --------------------------------------------


def bench_n(url: str, prompts, params: SamplingParams) -> tuple[dict, list[Row]]:
    """Each variant starts from an empty prefix cache (reset before it), on the same prompt."""
    policy = VLLMPolicy(url)
    http = httpx.Client(base_url=url, timeout=60.0)
    one = params.model_copy(update={"n": 1})
    pool = ThreadPoolExecutor(params.n)

    def reset() -> None:
        for _ in range(50):  # refused while blocks are held: nothing runs here, so at most briefly
            if http.post("/reset_prefix_cache").json().get("success"):
                return
            time.sleep(0.05)
        raise RuntimeError("the server did not reset its prefix cache")

    variants: dict[str, Callable] = {
        "n_in_one_request": lambda m: policy.sample(m, params),
        "n1_sequential": lambda m: [c for _ in range(params.n) for c in policy.sample(m, one)],
        "n1_concurrent": lambda m: [
            c
            for f in [pool.submit(policy.sample, m, one) for _ in range(params.n)]
            for c in f.result()
        ],
    }
    elapsed = {k: 0.0 for k in variants}
    tokens = {k: 0 for k in variants}
    try:
        policy.sample(prompts[0], one.model_copy(update={"max_tokens": 1}))
        names = list(variants)
        with progress(
            len(prompts) * len(names), f"{len(prompts)} prompts, n={params.n} vs {params.n} x n=1"
        ) as advance:
            for i, messages in enumerate(prompts):
                for name in names[i % len(names) :] + names[: i % len(names)]:  # rotate the order
                    reset()
                    t0 = time.perf_counter()
                    out = variants[name](messages)
                    elapsed[name] += time.perf_counter() - t0
                    tokens[name] += sum(len(c.token_ids) for c in out)
                    advance(1)
    finally:
        pool.shutdown()
        policy.close()
        http.close()
    rate = {k: tokens[k] / elapsed[k] for k in variants}
    wall = {k: elapsed[k] / len(prompts) for k in variants}
    speedup = {k: rate["n_in_one_request"] / rate[k] for k in variants}
    result = {
        "prompts": len(prompts),
        "params": params.model_dump(),
        "generated_tokens": tokens,
        "seconds": elapsed,
        "tokens_per_s": rate,
        "seconds_per_prompt": wall,
        "speedup_of_n_in_one_request": speedup,
        "pass": all(v >= 1.0 for k, v in speedup.items() if k != "n_in_one_request"),
    }
    n = params.n
    rows = [
        Row(
            f"2 n={n} in one request",
            f"{rate['n_in_one_request']:,.0f} tok/s, {wall['n_in_one_request']:.2f} s/prompt",
            "-",
            "baseline",
        )
    ]
    for key, label in (
        ("n1_sequential", f"{n} x n=1 requests, sequential"),
        ("n1_concurrent", f"{n} x n=1 requests, concurrent"),
    ):
        rows.append(
            Row(
                f"2 {label}",
                f"{rate[key]:,.0f} tok/s, {wall[key]:.2f} s/prompt",
                f"n={n} faster",
                f"{speedup[key]:.2f} x {'PASS' if speedup[key] >= 1 else 'FAIL'}",
            )
        )
    return result, rows


# --- figure 3: publish -------------------------------------------------------------------


def bench_publish(url: str, model_dir: Path, work: Path, *, reps: int) -> tuple[dict, list[Row]]:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    weights = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    size_mb = sum(t.numel() * t.element_size() for t in weights.values()) / 1e6
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in weights.values()})
    publisher = VLLMDiskPublisher([url], model_dir, work / "staging")
    policy = VLLMPolicy(url)
    # Per-route times of the swap, from the publisher's own HTTP client.
    calls: list[tuple[str, float]] = []
    started: dict[int, float] = {}

    def on_request(r: httpx.Request) -> None:
        started[id(r)] = time.perf_counter()

    def on_response(r: httpx.Response) -> None:
        r.read()
        calls.append((r.request.url.path, time.perf_counter() - started.pop(id(r.request))))

    publisher.servers[0]._client.event_hooks = {"request": [on_request], "response": [on_response]}
    save_s, publish_s, swap_s, verified = [], [], [], []
    parts: dict[str, list[float]] = {}
    try:
        start_version = policy.version()
        for rep in range(reps):
            target = work / f"save-{rep}.safetensors"
            t0 = time.perf_counter()
            save_file(
                {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}, str(target)
            )
            save_s.append(time.perf_counter() - t0)
            target.unlink()

            version = start_version + rep + 1
            calls.clear()
            t0 = time.perf_counter()
            publisher.publish(version, weights)
            publish_s.append(time.perf_counter() - t0)
            swap_s.append(sum(d for _, d in calls))
            for path, d in calls:
                parts.setdefault(path, []).append(d)
            verified.append(policy.version() == version)
        # Still serving, on the new version.
        after = policy.sample(
            [ChatMessage(role="user", content="look")], SamplingParams(max_tokens=4)
        )
    finally:
        policy.close()
        publisher.close()
    save_med, pub_med = median(save_s), median(publish_s)
    part_ms = {k: 1e3 * median(v) for k, v in parts.items()}
    result = {
        "reps": reps,
        "size_mb": size_mb,
        "dtypes": dtypes,
        "tensors": len(weights),
        "save_file_s": save_s,
        "publish_s": publish_s,
        "swap_http_s": swap_s,
        "save_file_median_s": save_med,
        "publish_median_s": pub_med,
        "ratio_publish_to_save": pub_med / save_med,
        "publish_write_and_check_median_s": median([p - s for p, s in zip(publish_s, swap_s)]),
        "swap_route_median_ms": part_ms,
        "versions_verified": sum(verified),
        "sample_version_after": after[0].policy_version,
        "pass": all(verified) and after[0].policy_version == start_version + reps,
    }
    rows = [
        Row(
            f"3 safetensors save_file, {size_mb:.1f} MB {'/'.join(dtypes)}",
            f"{ms(save_med)} median",
            "-",
            "baseline",
        ),
        Row(
            f"3 VLLMDiskPublisher.publish, {reps} reps",
            f"{ms(pub_med)} median",
            "-",
            f"{pub_med / save_med:.1f} x save",
        ),
        Row(
            "3   of which: write+check / swap HTTP",
            f"{ms(result['publish_write_and_check_median_s'])} / {ms(median(swap_s))}",
        ),
        Row(
            "3   swap: " + " / ".join(p.strip("/") for p in part_ms),
            " / ".join(f"{v:.0f}" for v in part_ms.values()) + " ms",
        ),
        Row(
            "3 server version after each publish",
            f"{sum(verified)}/{reps} right",
            "all",
            "PASS" if result["pass"] else "FAIL",
        ),
    ]
    return result, rows


# --- figure 4: in-process engine ---------------------------------------------------------


def bench_inprocess(
    model_dir: Path,
    prompts,
    params: SamplingParams,
    *,
    dtype: str,
    vllm_rate: float,
    seconds: float,
) -> tuple[dict, list[Row]]:
    """Tokens/s of InProcessPolicy on one torch thread (what the launcher uses) and on all cores
    (the default of InProcessPolicy(model) without `threads`). Each is capped at `seconds`: with
    other load on the cores, multi-threaded torch on tiny ops can be many times slower."""
    import torch

    from spo3.policy.inprocess import InProcessPolicy

    t0 = time.perf_counter()
    policy = InProcessPolicy(model_dir, dtype=dtype, threads=1)
    load_s = time.perf_counter() - t0
    policy.sample(prompts[0], params.model_copy(update={"max_tokens": 4}))
    result: dict = {"dtype": dtype, "prompts": len(prompts), "load_s": load_s, "by_threads": {}}
    rows = []
    for threads in dict.fromkeys([1, os.cpu_count() or 1]):
        torch.set_num_threads(threads)
        tokens, lat = 0, []
        deadline = time.perf_counter() + seconds
        with progress(
            len(prompts), f"InProcessPolicy ({dtype}, {threads} threads), {len(prompts)} prompts"
        ) as advance:
            for messages in prompts:
                t0 = time.perf_counter()
                tokens += sum(len(c.token_ids) for c in policy.sample(messages, params))
                lat.append(time.perf_counter() - t0)
                advance(1)
                if time.perf_counter() > deadline:
                    break
        rate = tokens / sum(lat)
        result["by_threads"][threads] = {
            "prompts": len(lat),
            "generated_tokens": tokens,
            "seconds": sum(lat),
            "tokens_per_s": rate,
            "request_latency_p50_ms": 1e3 * median(lat),
            "ratio_to_vllm_client": rate / vllm_rate,
        }
        done = (
            f"same {len(lat)} prompts"
            if len(lat) == len(prompts)
            else f"{len(lat)}/{len(prompts)} prompts (cap)"
        )
        rows.append(
            Row(
                f"4 InProcessPolicy {dtype}, {threads} thread{'s' * (threads > 1)}, {done}",
                f"{rate:,.0f} tok/s",
                "-",
                f"{rate / vllm_rate:.2f} x VLLMPolicy",
            )
        )
    best = max(result["by_threads"].values(), key=lambda r: r["tokens_per_s"])
    result["tokens_per_s"], result["ratio_to_vllm_client"] = (
        best["tokens_per_s"],
        best["ratio_to_vllm_client"],
    )
    return result, rows


# --- figure 5: the in-process engine's peak memory for one request -------------------------


def _score_history_policy_class():
    """InProcessPolicy as it was before per-step log-probs (bench only, for the before/after
    figure): free-form keeps generate's `output_scores` (a [rows, vocab] float32 tensor per step,
    all of them until the request ends); choice mode builds a [choices, width, vocab] float32
    tensor of full-vocabulary logits."""
    import torch

    from spo3.policy.inprocess import InProcessPolicy

    class ScoreHistoryPolicy(InProcessPolicy):
        def _decode(self, input_ids, attention, p):
            sampling = p.temperature > 0
            out = self.model.generate(
                input_ids,
                attention_mask=attention,
                max_new_tokens=p.max_tokens,
                do_sample=sampling,
                temperature=p.temperature if sampling else None,
                top_p=p.top_p if sampling else None,
                top_k=0 if sampling else None,
                eos_token_id=self.eos_id,
                pad_token_id=self.pad_id,
                return_dict_in_generate=True,
                output_scores=True,
            )
            gen = out.sequences[:, input_ids.shape[1] :]
            chosen = torch.stack(
                [
                    step.float().log_softmax(-1).gather(-1, gen[:, t : t + 1]).squeeze(-1)
                    for t, step in enumerate(out.scores)
                ],
                dim=1,
            )
            return gen.cpu(), chosen.cpu()

        def _choice_logits(self, prompt, choice_ids, allowed):
            n, width, p = len(choice_ids), max(map(len, choice_ids)), len(prompt)
            head = self.model(input_ids=torch.tensor([prompt], device=self.device), use_cache=True)
            flat = [t for ids in choice_ids for t in ids]
            owner = torch.tensor(
                [i for i, ids in enumerate(choice_ids) for _ in ids], device=self.device
            )
            step = torch.tensor(
                [j for ids in choice_ids for j in range(len(ids))], device=self.device
            )
            own = (owner[:, None] == owner[None, :]) & (step[None, :] <= step[:, None])
            mask = torch.cat(
                [torch.ones(len(flat), p, dtype=torch.bool, device=self.device), own], dim=1
            )
            tail = (
                self.model(
                    input_ids=torch.tensor([flat], device=self.device),
                    position_ids=(step + p)[None],
                    attention_mask=mask[None, None],
                    past_key_values=head.past_key_values,
                    use_cache=True,
                )
                .logits[0]
                .float()
            )
            out = torch.zeros(n, width, tail.shape[-1], device=self.device)
            out[:, 0] = head.logits[0, -1].float()
            later = step > 0
            out[owner[later], step[later]] = tail[:-1][later[1:]]
            return [
                [out[i, j, allowed[tuple(ids[:j])]].cpu() for j in range(len(ids))]
                for i, ids in enumerate(choice_ids)
            ]

    return ScoreHistoryPolicy


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _peak_memory_child(
    model_dir: str, variant: str, mode: str, device: str, dtype: str, messages, params, queue
) -> None:
    """In a fresh process: load the engine, warm it up (the same request), then one request; the
    peak memory of the request (CPU: VmHWM, reset before it through /proc/self/clear_refs; CUDA: max_memory_allocated)
    and the memory held before it."""
    import torch

    from spo3.policy.inprocess import InProcessPolicy

    try:
        cls = _score_history_policy_class() if variant == "before" else InProcessPolicy
        policy = cls(model_dir, dtype=dtype, device=device, threads=1)
        # Warm-up with the very request: the first one at a batch size grows the allocator's
        # arenas (glibc: +170 MiB on the engine thread here, whatever the path), which is not
        # what the request needs. Then the memory freed since goes back to the OS (malloc_trim),
        # so the RSS before the request is what is live and its peak is what the request adds.
        policy.sample(messages, params)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
            before = _status_kib("VmRSS") * 1024
        t0 = time.perf_counter()
        outs = policy.sample(messages, params)
        seconds = time.perf_counter() - t0
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _status_kib("VmHWM") * 1024
        queue.put(
            {
                "before_bytes": before,
                "peak_bytes": peak,
                "request_bytes": peak - before,
                "seconds": seconds,
                "samples": len(outs),
                "tokens": sum(len(c.token_ids) for c in outs),
            }
        )
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        queue.put({"error": f"{type(e).__name__}: {e}"})


MEMORY_CHOICES = [f"{v} {o}" for v in ("take", "examine", "open") for o in _OBJECTS[:10]]


def bench_memory(
    model_dir: Path,
    messages,
    *,
    n: int,
    max_tokens: int,
    device: str,
    dtype: str,
    variants: Sequence[str],
) -> tuple[dict, list[Row]]:
    """Peak memory of one n-sample request to InProcessPolicy (`after`: per-step log-probs, choice
    logits of allowed tokens only) and to the engine as it was (`before`), free-form and in choice
    mode (30 choices), each in a process of its own. Measured: RSS on CPU (the whole process, so
    the request's share is peak - RSS before it), torch.cuda.max_memory_allocated on CUDA."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    meta = json.loads((model_dir / "spo3_model.json").read_text())
    requests = {
        "free": SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, seed=0),
        "choice": SamplingParams(n=n, temperature=1.0, choices=MEMORY_CHOICES, seed=0),
    }
    result: dict = {
        "device": device,
        "dtype": dtype,
        "vocab_size": meta["vocab_size"],
        "parameters": meta["parameters"],
        "n": n,
        "max_tokens": max_tokens,
        "choices": len(MEMORY_CHOICES),
        "measure": "torch.cuda.max_memory_allocated" if device.startswith("cuda") else "RSS",
        "runs": {},
    }
    rows = []
    for mode, params in requests.items():
        for variant in variants:
            queue = ctx.Queue()
            proc = ctx.Process(
                target=_peak_memory_child,
                args=(str(model_dir), variant, mode, device, dtype, messages, params, queue),
            )
            proc.start()
            r = queue.get(timeout=600)
            proc.join(timeout=60)
            result["runs"][f"{mode}/{variant}"] = r
            label = f"5 peak memory, one n={n} request, {mode}" + (
                f" ({max_tokens} tok)" if mode == "free" else f" ({len(MEMORY_CHOICES)} choices)"
            )
            what = (
                "score history / full-vocab choice logits"
                if variant == "before"
                else "per-step log-probs / allowed-token logits"
            )
            if "error" in r:
                rows.append(Row(f"{label}, {variant}", r["error"][:60], "-", "FAIL"))
                continue
            base = result["runs"].get(f"{mode}/before")
            vs = (
                f"{r['request_bytes'] / max(base['request_bytes'], 1):.2f} x before"
                if variant == "after" and base and "error" not in base
                else what
            )
            rows.append(
                Row(
                    f"{label}, {variant}",
                    f"+{r['request_bytes'] / 2**20:,.0f} MiB over {r['before_bytes'] / 2**20:,.0f} "
                    f"(peak {r['peak_bytes'] / 2**20:,.0f} MiB {result['measure']})",
                    "-",
                    vs,
                )
            )
    return result, rows


# --- driver ------------------------------------------------------------------------------


def bench_two_servers(
    first: VLLMServer, model_dir: Path, work: Path, *, reps: int, dtype: str, log_path: Path
) -> tuple[dict, list[Row]]:
    """Figure 6: publish `reps` versions to `first` and a second server; time per publish, and
    versions and served-weight checksums equal on both after each."""
    import torch
    from transformers import AutoModelForCausalLM

    second = VLLMServer(model_dir, dtype=dtype, log_path=log_path.with_name("vllm-2.log"))
    t0 = time.perf_counter()
    second.start()
    start_s = time.perf_counter() - t0
    publisher = VLLMDiskPublisher(
        [first.url, second.url], model_dir, work / "staging-2", verify=True
    )
    policy = VLLMPolicy([first.url, second.url], health_every_s=0.0)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        publish_s, checks = [], []
        for v in range(1, reps + 1):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 1e-3)
            weights = model.state_dict()
            t = time.perf_counter()
            publisher.publish(v, weights)
            publish_s.append(time.perf_counter() - t)
            policy.refresh(force=True)
            versions = sorted({s.version for s in policy.servers.values()})
            sums = set(publisher.served_checksums.values())
            checks.append(
                {
                    "version": v,
                    "versions": versions,
                    "checksums_equal": len(sums) == 1 and len(publisher.served_checksums) == 2,
                    "behind": list(publisher.behind),
                }
            )
        ok = all(c["versions"] == [c["version"]] and c["checksums_equal"] for c in checks)
        result = {
            "second_server_start_s": start_s,
            "publish_s": publish_s,
            "publish_s_median": median(publish_s),
            "checks": checks,
            "all_equal": ok,
        }
        row = Row(
            f"6 publish to 2 vLLM servers (with checksum pass), {reps} reps",
            f"{ms(median(publish_s))} median, {ms(max(publish_s))} max",
            "versions and checksums equal after each",
            "ok" if ok else "MISMATCH",
        )
        return result, [row]
    finally:
        policy.close()
        publisher.close()
        second.stop()


@app.command()
def main(
    dtype: Annotated[str, typer.Option(help="vLLM --dtype.")] = "bfloat16",
    preset: Annotated[str, typer.Option(help=f"Model preset: {', '.join(PRESETS)}.")] = "small",
    prompts: Annotated[int, typer.Option(help="Prompts for figures 1 and 4.", min=2)] = 32,
    n: Annotated[int, typer.Option(help="Samples per prompt.", min=1, max=64)] = 8,
    max_tokens: Annotated[int, typer.Option(help="Tokens per sample.", min=1)] = 64,
    prompt_tokens: Annotated[
        int, typer.Option(help="Prompt length in figures 1 and 4.", min=8)
    ] = 120,
    rounds: Annotated[int, typer.Option(help="Passes over the prompts in figure 1.", min=1)] = 2,
    long_prompts: Annotated[int, typer.Option(help="Prompts in figure 2.", min=1)] = 4,
    long_prompt_tokens: Annotated[
        int, typer.Option(help="Prompt length in figure 2.", min=8)
    ] = 300,
    publish_reps: Annotated[int, typer.Option(help="Publishes timed in figure 3.", min=1)] = 5,
    inprocess_prompts: Annotated[
        int, typer.Option(help="Prompts for figure 4 (0: skip).", min=0)
    ] = 32,
    inprocess_dtype: Annotated[str, typer.Option(help="InProcessPolicy dtype.")] = "float32",
    inprocess_seconds: Annotated[
        float, typer.Option(help="Time cap per thread setting in figure 4.", min=1)
    ] = 30.0,
    memory_vocab: Annotated[
        int,
        typer.Option(
            help="Figure 5: vocabulary of its model (the preset's body, tied, padded to this; "
            "Qwen2.5's 151,936 by default; 0: skip the figure).",
            min=0,
        ),
    ] = 151936,
    memory_device: Annotated[
        str, typer.Option(help="Figure 5: engine device (cpu: RSS; cuda: max_memory_allocated).")
    ] = "cpu",
    memory_dtype: Annotated[str, typer.Option(help="Figure 5: engine dtype.")] = "float32",
    memory_variants: Annotated[
        str,
        typer.Option(
            help="Figure 5: before (the engine with generate's score history and full-vocabulary "
            "choice logits, kept in this module) and/or after (the engine now)."
        ),
    ] = "before,after",
    memory_only: Annotated[
        bool, typer.Option(help="Only figure 5 (no vLLM server, figures 1-4 skipped).")
    ] = False,
    two_servers: Annotated[
        bool, typer.Option(help="Figure 6: publishing to 2 vLLM servers (starts a second one).")
    ] = True,
    two_servers_only: Annotated[
        bool, typer.Option(help="Only figure 6 (figures 1-5 skipped).")
    ] = False,
    out: Annotated[Path, typer.Option(help="Where to write the numbers as JSON.")] = Path(
        "policy_bench.json"
    ),
) -> None:
    """Benchmark the vLLM policy client, publisher and the in-process engine on one model."""
    from transformers import AutoTokenizer

    t_start = time.perf_counter()
    params = SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens)
    results: dict = {
        "args": {
            "dtype": dtype,
            "preset": preset,
            "prompts": prompts,
            "n": n,
            "max_tokens": max_tokens,
            "prompt_tokens": prompt_tokens,
            "rounds": rounds,
            "long_prompts": long_prompts,
            "long_prompt_tokens": long_prompt_tokens,
            "publish_reps": publish_reps,
            "inprocess_prompts": inprocess_prompts,
            "inprocess_dtype": inprocess_dtype,
            "inprocess_seconds": inprocess_seconds,
            "memory_vocab": memory_vocab,
            "memory_device": memory_device,
            "memory_dtype": memory_dtype,
            "memory_variants": memory_variants,
            "memory_only": memory_only,
            "two_servers": two_servers,
            "two_servers_only": two_servers_only,
        },
        "cpus": os.cpu_count(),
    }
    rows: dict[str, list[Row]] = {}
    phase_s: dict[str, float] = {}

    other_cores: dict[str, float] = {}
    server_pids: list[int] = []

    def phase(key: str, label: str, fn: Callable[[], tuple[dict, list[Row]]]) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f} s] {label} ...", flush=True)
        cpu0 = (sum(os.times()[:2]), tree_cpu_seconds(server_pids), machine_busy_seconds())
        t0 = time.perf_counter()
        results[key], rows[key] = fn()
        phase_s[key] = elapsed = time.perf_counter() - t0
        cpu1 = (sum(os.times()[:2]), tree_cpu_seconds(server_pids), machine_busy_seconds())
        # What the rest of the machine used meanwhile: on a shared machine, it explains noise.
        other_cores[key] = (
            max(0.0, (cpu1[2] - cpu0[2]) - (cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1])) / elapsed
        )

    work = Path(tempfile.mkdtemp(prefix="spo3-policy-bench-"))
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_name(out.stem + "-vllm.log")
    try:
        t0 = time.perf_counter()
        model_dir = init_model(work / "model", preset, seed=0)
        phase_s["model_init"] = time.perf_counter() - t0
        meta = json.loads((model_dir / "spo3_model.json").read_text())
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        short, short_len = make_prompts(tokenizer, prompts, prompt_tokens, seed=1)
        long, long_len = make_prompts(
            tokenizer, long_prompts, long_prompt_tokens, seed=2, own_system=True
        )
        results["model"] = {
            **meta,
            "prompt_tokens_mean": sum(short_len) / len(short_len),
            "long_prompt_tokens_mean": sum(long_len) / len(long_len),
        }
        print(
            f"model {preset}: {meta['parameters'] / 1e6:.1f}M parameters; prompts {min(short_len)}-"
            f"{max(short_len)} tokens, long prompts {min(long_len)}-{max(long_len)} tokens",
            flush=True,
        )

        if not memory_only:
            print(
                f"[{time.perf_counter() - t_start:6.1f} s] starting vLLM ({dtype}), log {log_path} ...",
                flush=True,
            )
            server = VLLMServer(model_dir, dtype=dtype, log_path=log_path)
            t0 = time.perf_counter()
            try:
                server.start()
                phase_s["server_start"] = time.perf_counter() - t0
                pids = server_pids[:] = process_tree(server._proc.pid)
                version = httpx.get(f"{server.url}/version", timeout=5).json().get("version")
                results["server"] = {
                    "vllm": version,
                    "dtype": dtype,
                    "start_s": phase_s["server_start"],
                    "processes": len(pids),
                    "log": str(log_path),
                }
                print(
                    f"vLLM {version} up in {phase_s['server_start']:.0f} s at {server.url} "
                    f"({len(pids)} processes)",
                    flush=True,
                )
                if not two_servers_only:
                    phase(
                        "client",
                        "1 client vs raw",
                        lambda: bench_client(server.url, pids, short, params, rounds=rounds),
                    )
                    phase(
                        "n_samples", "2 n in one request", lambda: bench_n(server.url, long, params)
                    )
                    phase(
                        "publish",
                        "3 publish",
                        lambda: bench_publish(server.url, model_dir, work, reps=publish_reps),
                    )
                if two_servers or two_servers_only:
                    phase(
                        "two_servers",
                        "6 publish to 2 servers",
                        lambda: bench_two_servers(
                            server,
                            model_dir,
                            work,
                            reps=publish_reps,
                            dtype=dtype,
                            log_path=log_path,
                        ),
                    )
            finally:
                server.stop()
                server_pids.clear()
            if inprocess_prompts and not two_servers_only:
                phase(
                    "inprocess",
                    "4 in-process engine",
                    lambda: bench_inprocess(
                        model_dir,
                        short[:inprocess_prompts],
                        params,
                        dtype=inprocess_dtype,
                        vllm_rate=results["client"]["tokens_per_s"]["client"],
                        seconds=inprocess_seconds,
                    ),
                )
        if memory_vocab and not two_servers_only:
            t0 = time.perf_counter()
            memory_model = init_model(
                work / "model-vocab", preset, seed=0, tied=True, vocab_size=memory_vocab
            )
            phase_s["memory_model_init"] = time.perf_counter() - t0
            phase(
                "memory",
                "5 engine peak memory",
                lambda: bench_memory(
                    memory_model,
                    short[0],
                    n=n,
                    max_tokens=max_tokens,
                    device=memory_device,
                    dtype=memory_dtype,
                    variants=[v for v in memory_variants.split(",") if v],
                ),
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    total = time.perf_counter() - t_start
    results["phase_seconds"], results["total_seconds"] = phase_s, total
    results["other_processes_cpu_cores"] = other_cores
    write_json(out, results)
    ordered = [
        row
        for key in ("client", "n_samples", "publish", "inprocess", "memory", "two_servers")
        for row in rows.get(key, [])
    ]
    figures = "/".join(rows[k][0].figure[0] for k in other_cores)
    ordered.append(
        Row(
            f"* (diag) CPU of other processes, figures {figures}",
            " / ".join(f"{v:.2f}" for v in other_cores.values()) + f" cores of {os.cpu_count()}",
        )
    )
    print()
    print_table(
        ordered,
        f"policy benchmark: vLLM {results.get('server', {}).get('vllm', '(not run)')} ({dtype}), "
        f"{preset} model "
        f"({meta['parameters'] / 1e6:.1f}M), {os.cpu_count()} CPUs, total {total:.0f} s",
    )
    print("\nphases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in phase_s.items()))
    print(f"JSON: {out}")


if __name__ == "__main__":
    app()
