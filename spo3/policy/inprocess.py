"""The policy as a transformers model inside this process: the single-machine default and the
reference the vLLM client is tested against."""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spo3.policy.interface import PolicyError
from spo3.policy.weights import weights_checksum
from spo3.transport.contracts import ChatMessage, Completion, SamplingParams


def chat_prompt_ids(tokenizer, messages: Sequence[ChatMessage]) -> list[int]:
    """The prompt tokens the engine samples from: the chat template with the generation prompt
    (also how `spo3 sft` tokenizes expert steps, so its examples are what the policy sees)."""
    ids = tokenizer.apply_chat_template(
        [m.model_dump() for m in messages], add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)


@dataclass(eq=False)
class _Request:
    """A free-form request waiting for the engine thread, which fills in `result` or `error` and sets `done`."""

    prompt: list[int]
    params: SamplingParams
    result: list[Completion] | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class InProcessPolicy:
    """Samples with `model.generate`; publishing swaps the weights in place.

    One lock covers sampling and publishing, so a completion never mixes weights and the
    version it reports is the version that produced it.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        version: int = 0,
        threads: int | None = None,
        batch_window_s: float = 0.02,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.model_dir = str(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        # Any: transformers' decorated `to` does not type-check as a bound method.
        model: Any = AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=getattr(torch, dtype)
        )
        self.model = model.to(device)
        self.model.eval()
        self.device = device
        self.version = version
        self._lock = threading.Lock()
        self._pending_lock = threading.Lock()
        self._work = threading.Condition(
            self._pending_lock
        )  # the engine thread waits on it for requests
        self._engine_thread: threading.Thread | None = None
        self._pending: list[_Request] = []
        self._announced = 0  # free-form requests announced and not yet taken into a batch
        self.batch_window_s = batch_window_s
        self.settle_s = min(0.001, batch_window_s)
        self._last_announce = 0.0  # monotonic time of the latest announcement
        self.eos_id = self.tokenizer.eos_token_id

    # --- sample -------------------------------------------------------------------------
    def prompt_ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages)

    def sample(self, messages: Sequence[ChatMessage], params: SamplingParams) -> list[Completion]:
        """`params.n` completions. Free-form requests run on one engine thread of this policy, and
        those that threads of this process make at the same time run as one batched `generate`
        (the n samples of each are rows of it too): on a GPU a request costs about what the slowest
        row of the batch costs, not a pass of its own. One long-lived thread also spares every
        caller thread the device's per-thread set-up (on CUDA, a generate from a fresh thread
        took 3.3x as long as from a thread that had run one before)."""
        if params.choices:
            prompt = self.prompt_ids(messages)
            with self._lock, torch.no_grad():
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                return self._stamp(self._sample_choices(prompt, params), prompt)
        with self._pending_lock:
            self._announced += 1  # before tokenizing: the engine thread waits for this request
            self._last_announce = time.monotonic()
        try:
            request = _Request(self.prompt_ids(messages), params)
        except BaseException:
            with self._pending_lock:
                self._announced -= 1
            raise
        with self._work:
            self._pending.append(request)
            if self._engine_thread is None or not self._engine_thread.is_alive():
                self._engine_thread = threading.Thread(
                    target=_serve,
                    args=(weakref.ref(self), self._work),
                    name="spo3-inprocess-engine",
                    daemon=True,
                )
                self._engine_thread.start()
            self._work.notify()
        request.done.wait()
        if request.error is not None:
            raise request.error
        assert request.result is not None  # the engine thread sets result or error
        return request.result

    def _serve_pending(self) -> None:
        """On the engine thread: take every request waiting (after `_gather`) and run them."""
        batch: list[_Request] = []
        try:
            with self._lock:
                self._gather()
                with self._pending_lock:
                    batch, self._pending = self._pending, []
                    self._announced -= len(batch)
                self._run_batch(batch)
        except BaseException as e:  # noqa: BLE001 - every caller gets an answer, none waits forever
            for r in batch:
                if r.result is None and r.error is None:
                    r.error = e
        finally:
            for r in batch:
                r.done.set()

    def _gather(self) -> None:
        """Wait (at most `batch_window_s`) for requests announced but not queued yet (their
        prompts are being tokenized), and for new announcements while they keep coming less than
        `settle_s` apart, so that requests made together run together. A lone caller waits
        `settle_s` once; nobody waits for callers whose requests were already served."""
        deadline = time.monotonic() + self.batch_window_s
        while True:
            # Sleeping also yields the interpreter: callers released at the same moment (threads
            # of one actor) are runnable but may not have announced yet when the first gets here.
            time.sleep(min(self.settle_s, max(deadline - time.monotonic(), 0.0)))
            now = time.monotonic()
            with self._pending_lock:
                if now >= deadline or (
                    len(self._pending) >= self._announced
                    and now - self._last_announce >= self.settle_s
                ):
                    return

    def _stamp(self, completions: list[Completion], prompt: list[int]) -> list[Completion]:
        return [
            c.model_copy(update={"policy_version": self.version, "prompt_token_ids": prompt})
            for c in completions
        ]

    def _run_batch(self, batch: list[_Request]) -> None:
        """Requests that can share a `generate` (same temperature, top-p, length; a seeded one runs
        alone, so its seed means what it says) run together; every request gets its answer or the error."""
        by_settings: dict[tuple, list[_Request]] = {}
        for r in batch:
            p = r.params
            key = (
                ("seeded", id(r)) if p.seed is not None else (p.temperature, p.top_p, p.max_tokens)
            )
            by_settings.setdefault(key, []).append(r)
        for requests in by_settings.values():
            try:
                with torch.no_grad():
                    if requests[0].params.seed is not None:
                        torch.manual_seed(requests[0].params.seed)
                    for r, out in zip(
                        requests, self._generate([(r.prompt, r.params) for r in requests])
                    ):
                        r.result = self._stamp(out, r.prompt)
            except Exception as e:  # noqa: BLE001 - handed to every waiting caller, not swallowed
                for r in requests:
                    r.error = e

    def _generate(
        self, requests: Sequence[tuple[list[int], SamplingParams]]
    ) -> list[list[Completion]]:
        """One left-padded `generate` over every sample of every request (all with the same settings)."""
        p = requests[0][1]
        sampling = p.temperature > 0
        rows = [(prompt, q) for prompt, q in requests for _ in range(q.n if sampling else 1)]
        prompts = [prompt for prompt, _ in rows]
        width = max(map(len, prompts))
        pad = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        )
        input_ids = torch.tensor(
            [[pad] * (width - len(x)) + x for x in prompts], device=self.device
        )
        attention = torch.tensor(
            [[0] * (width - len(x)) + [1] * len(x) for x in prompts], device=self.device
        )
        out = self.model.generate(
            input_ids,
            attention_mask=attention,
            max_new_tokens=p.max_tokens,
            do_sample=sampling,
            temperature=p.temperature if sampling else None,
            top_p=p.top_p if sampling else None,
            top_k=0 if sampling else None,
            eos_token_id=self.eos_id,
            pad_token_id=pad,
            return_dict_in_generate=True,
            output_scores=True,
        )
        gen = out.sequences[:, width:]
        # Behaviour log-probs: those of the distribution each token was drawn from. `scores` are the
        # logits after generate's processors (temperature, then top-p), the very tensor it samples
        # from, so this is log_softmax(logits / T) (renormalized over the top-p nucleus when
        # top_p < 1), what vLLM reports with --logprobs-mode processed_logprobs. Greedy decoding has
        # no temperature: the model's own log-probs. One step at a time, so a large vocabulary never
        # needs a [rows, steps, vocab] float32 copy.
        chosen = torch.stack(
            [
                step.float().log_softmax(-1).gather(-1, gen[:, t : t + 1]).squeeze(-1)
                for t, step in enumerate(out.scores)
            ],
            dim=1,
        ).cpu()
        gen = gen.cpu()
        completions = []
        for row in range(gen.shape[0]):
            ids = gen[row].tolist()
            finish = "length"
            if self.eos_id in ids:
                ids = ids[: ids.index(self.eos_id) + 1]
                finish = "stop"
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            assert isinstance(text, str)  # one sequence in, one string out
            text, ids, finish = self._apply_stop(text, ids, finish, rows[row][1].stop)
            completions.append(
                Completion(
                    text=text,
                    token_ids=ids,
                    logprobs=chosen[row, : len(ids)].tolist(),
                    finish_reason=finish,
                    policy_version=0,
                )
            )
        per_request, start = [], 0
        for _, q in requests:
            if sampling:
                per_request.append(completions[start : start + q.n])
                start += q.n
            else:  # greedy decoding gives one answer; n greedy samples are n copies of it
                per_request.append([completions[start]] * q.n)
                start += 1
        return per_request

    def _apply_stop(self, text: str, ids: list[int], finish: str, stops: list[str]):
        """Cut at the first stop string: the text excludes it, the tokens end with the one that
        completed it (vLLM's behaviour)."""
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        if cut < 0:
            return text, ids, finish
        for k in range(1, len(ids) + 1):
            if len(self.tokenizer.decode(ids[:k], skip_special_tokens=True)) > cut:
                return text[:cut], ids[:k], "stop"
        return text[:cut], ids, "stop"

    def _sample_choices(self, prompt: list[int], p: SamplingParams) -> list[Completion]:
        """Constrained mode, as guided decoding does it: token by token, the next token is drawn
        from the model's distribution restricted to tokens that keep the text a prefix of some
        choice. One pass over the prompt and one teacher-forced pass over all choices give every logit
        this needs."""
        choices = p.choices
        assert choices, "constrained mode needs choices"
        choice_ids = [
            self.tokenizer.encode(c, add_special_tokens=False) + [self.eos_id] for c in choices
        ]
        logits = self._choice_logits(prompt, choice_ids)
        allowed: dict[tuple[int, ...], list[int]] = {}
        for ids in choice_ids:
            for j, tok in enumerate(ids):
                nxt = allowed.setdefault(tuple(ids[:j]), [])
                if tok not in nxt:
                    nxt.append(tok)
        # Each token is drawn from softmax(restricted logits / T); its log-prob under that very
        # distribution is the behaviour log-prob. Greedy decoding (T = 0) has no temperature: the
        # walk compares the model's own restricted log-probs.
        temperature = p.temperature if p.temperature > 0 else 1.0
        seq_logp: list[float] = []
        token_logps: list[list[float]] = []
        for i, ids in enumerate(choice_ids):
            per_token = []
            for j, tok in enumerate(ids):
                cand = allowed[tuple(ids[:j])]
                restricted = logits[i, j, cand] / temperature
                per_token.append(float(restricted.log_softmax(-1)[cand.index(tok)]))
            seq_logp.append(sum(per_token))
            token_logps.append(per_token)
        if p.temperature == 0:
            best = max(
                range(len(choice_ids)), key=lambda i: token_logps[i]
            )  # greedy walk down the trie
            picks = [best] * p.n
        else:
            probs = torch.tensor(seq_logp, device="cpu").exp()
            picks = torch.multinomial(probs / probs.sum(), p.n, replacement=True).tolist()
        return [
            Completion(
                text=choices[i],
                token_ids=choice_ids[i],
                logprobs=token_logps[i],
                finish_reason="stop",
                policy_version=0,
                choice_token_ids=choice_ids,
            )
            for i in picks
        ]

    def _choice_logits(self, prompt: list[int], choice_ids: list[list[int]]) -> torch.Tensor:
        """[choice, position, vocab]: the logits that predict each token of each choice (zeros past a
        choice's end). The prompt runs once; then every choice's tokens run as one row after it, each
        token seeing the whole prompt and the tokens before it in its own choice only (a block mask,
        positions counted from the prompt's end). Environments offer tens of commands and a prompt
        with history runs to hundreds of tokens: a prompt per choice cost tens of times more, and a
        batch of choices over a copied prompt cache twice as much as this single row."""
        n, width, p = len(choice_ids), max(map(len, choice_ids)), len(prompt)
        head = self.model(input_ids=torch.tensor([prompt], device=self.device), use_cache=True)
        flat = [t for ids in choice_ids for t in ids]
        owner = torch.tensor(
            [i for i, ids in enumerate(choice_ids) for _ in ids], device=self.device
        )
        step = torch.tensor([j for ids in choice_ids for j in range(len(ids))], device=self.device)
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
        out[:, 0] = head.logits[0, -1].float()  # predicts every choice's first token
        later = (
            step > 0
        )  # token j > 0 of a choice is predicted at its token j - 1, one place before it
        out[owner[later], step[later]] = tail[:-1][later[1:]]
        return out

    # --- publish ------------------------------------------------------------------------
    def publish(self, version: int, weights: Mapping[str, torch.Tensor]) -> None:
        if version < self.version:
            raise PolicyError(f"refusing to go back from version {self.version} to {version}")
        with self._lock, torch.no_grad():
            missing, unexpected = self.model.load_state_dict(dict(weights), strict=False)
            tied = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()
            if unexpected or set(missing) - tied:
                raise PolicyError(
                    f"weights do not fit the model: missing {sorted(set(missing) - tied)[:5]}, "
                    f"unexpected {sorted(unexpected)[:5]}"
                )
            self.version = version

    def checksum(self) -> str:
        with self._lock:
            return weights_checksum(self.model.state_dict())


def _serve(ref: weakref.ref[InProcessPolicy], work: threading.Condition) -> None:
    """The engine thread of one policy: runs waiting free-form requests until the policy is gone.
    It holds the policy only while serving, so a dropped policy (and its model) can be freed."""
    while True:
        with work:
            ready = work.wait_for(lambda: (p := ref()) is None or bool(p._pending), timeout=1.0)
        policy = ref()
        if policy is None:
            return
        if ready:
            policy._serve_pending()
        del policy
