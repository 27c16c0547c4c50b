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
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f"unknown torch dtype {dtype!r} (e.g. float32, bfloat16, float16)")
        model: Any = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch_dtype)
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
        self.pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        )
        # Sampling settings come from each request only. A real checkpoint's generation_config.json
        # (Qwen2.5-Instruct: repetition_penalty 1.05, top_k 20, top_p 0.8, temperature 0.7) would
        # otherwise fill in what a request leaves unset, and its tokens would be drawn from another
        # distribution than the log-probs returned (and the learner's logits / T) describe.
        from transformers import GenerationConfig

        self.model.generation_config = GenerationConfig(
            eos_token_id=self.eos_id, pad_token_id=self.pad_id
        )

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
        input_ids = torch.tensor(
            [[self.pad_id] * (width - len(x)) + x for x in prompts], device=self.device
        )
        attention = torch.tensor(
            [[0] * (width - len(x)) + [1] * len(x) for x in prompts], device=self.device
        )
        gen, chosen = self._decode(input_ids, attention, p)
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

    def _decode(
        self, input_ids: torch.Tensor, attention: torch.Tensor, p: SamplingParams
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The generated tokens [rows, steps] and each one's behaviour log-prob [rows, steps] (on
        the CPU). The log-prob is that of the distribution the token was drawn from:
        log_softmax(logits / T), renormalized over the top-p nucleus when top_p < 1 (what vLLM
        reports with --logprobs-mode processed_logprobs); greedy decoding has no temperature, so
        the model's own log-probs. The warpers are ours, in that order, with the recorder after
        them (generate puts its own warpers after any passed in, so it is given none): the recorder
        sees the very scores sampled from, and keeps one step of them, never a [rows, steps, vocab]
        history (output_scores, the old way, held 8 x 64 x 151,936 float32 = 311 MB per request)."""
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        sampling = p.temperature > 0
        warpers: list[Any] = []
        if sampling and p.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(p.temperature))
        if sampling and p.top_p < 1.0:
            warpers.append(TopPLogitsWarper(p.top_p))
        recorder = _ChosenLogprobs()
        sequences = self.model.generate(
            input_ids,
            attention_mask=attention,
            max_new_tokens=p.max_tokens,
            do_sample=sampling,
            # Neutral: generate adds no warper of its own (ours above do the work).
            temperature=1.0 if sampling else None,
            top_p=1.0 if sampling else None,
            top_k=0 if sampling else None,
            logits_processor=LogitsProcessorList([*warpers, recorder]),
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
            return_dict_in_generate=False,  # nor scores nor the KV cache outlive the call
        )
        gen = sequences[:, input_ids.shape[1] :]
        return gen.cpu(), recorder.chosen(gen).cpu()

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
        choice. One pass over the prompt and one teacher-forced pass over all choices give every
        hidden state this needs; only the allowed tokens' logits are computed from them."""
        choices = p.choices
        assert choices, "constrained mode needs choices"
        choice_ids = [
            self.tokenizer.encode(c, add_special_tokens=False) + [self.eos_id] for c in choices
        ]
        allowed: dict[tuple[int, ...], list[int]] = {}
        for ids in choice_ids:
            for j, tok in enumerate(ids):
                nxt = allowed.setdefault(tuple(ids[:j]), [])
                if tok not in nxt:
                    nxt.append(tok)
        cand_logits = self._choice_logits(prompt, choice_ids, allowed)
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
                restricted = cand_logits[i][j] / temperature
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

    def _choice_logits(
        self,
        prompt: list[int],
        choice_ids: list[list[int]],
        allowed: Mapping[tuple[int, ...], list[int]],
    ) -> list[list[torch.Tensor]]:
        """[choice][position]: float32 CPU logits of the tokens `allowed` after that choice's
        tokens before the position (in `allowed`'s order), as the model's head gives them.

        The prompt runs once; then every choice's tokens (but its last, which predicts nothing) run
        as one row after it, each token seeing the whole prompt and the tokens before it in its
        own choice only (a block mask, positions counted from the prompt's end). Environments
        offer tens of commands and a prompt with history runs to hundreds of tokens: a prompt per
        choice cost tens of times more, and a batch of choices over a copied prompt cache twice
        as much as this single row. Both passes stop at the decoder's hidden states; the head runs
        on the allowed tokens' rows only, so nothing [positions, vocab] is made (a full head over
        30 choices x 8 tokens of a 151,936-token vocabulary was 146 MB in float32, and as much
        again for the prompt's positions)."""
        p = len(prompt)
        body = self.model.base_model  # the decoder stack, final norm included
        out = body(input_ids=torch.tensor([prompt], device=self.device), use_cache=True)
        hidden = [out.last_hidden_state[0, -1:]]  # predicts every choice's first token
        flat = [t for ids in choice_ids for t in ids[:-1]]
        if flat:
            owner = torch.tensor(
                [i for i, ids in enumerate(choice_ids) for _ in ids[:-1]], device=self.device
            )
            step = torch.tensor(
                [j for ids in choice_ids for j in range(len(ids) - 1)], device=self.device
            )
            own = (owner[:, None] == owner[None, :]) & (step[None, :] <= step[:, None])
            mask = torch.cat(
                [torch.ones(len(flat), p, dtype=torch.bool, device=self.device), own], dim=1
            )
            tail = body(
                input_ids=torch.tensor([flat], device=self.device),
                position_ids=(step + p)[None],
                attention_mask=mask[None, None],
                past_key_values=out.past_key_values,
                use_cache=False,
            ).last_hidden_state[0]
            hidden.append(tail)
        del out
        states = torch.cat(hidden)  # row 0: the prompt's last; row 1 + k: flat token k
        # Row of `states` that predicts token j of choice i: the prompt's last for j = 0, else the
        # choice's token j - 1. One (row, token) pair per allowed token there.
        rows, toks, sizes, start = [], [], [], 1
        for ids in choice_ids:
            for j in range(len(ids)):
                cand = allowed[tuple(ids[:j])]
                rows += [0 if j == 0 else start + j - 1] * len(cand)
                toks += cand
                sizes.append(len(cand))
            start += len(ids) - 1
        head = self.model.get_output_embeddings()
        tok_index = torch.tensor(toks, device=self.device)
        # One dot product per pair, as a batched matmul in the model's dtype (the head's own
        # output is a matmul in that dtype too).
        dots = torch.bmm(
            head.weight[tok_index][:, None, :],
            states[torch.tensor(rows, device=self.device)][:, :, None],
        ).reshape(-1)
        if getattr(head, "bias", None) is not None:
            dots = dots + head.bias[tok_index]
        flat_logits = dots.float().cpu().split(sizes)
        result: list[list[torch.Tensor]] = []
        k = 0
        for ids in choice_ids:
            result.append(list(flat_logits[k : k + len(ids)]))
            k += len(ids)
        return result

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


class _ChosenLogprobs:
    """A logits processor, last in generate's list: at each step it keeps the log-softmax of the
    scores the next token is drawn from (one [rows, vocab] tensor), and at the next step, once
    that token is known (the last column of `input_ids`), keeps only its log-prob."""

    def __init__(self) -> None:
        self._last: torch.Tensor | None = None  # [rows, vocab] log-probs of the latest step
        self._steps: list[torch.Tensor] = []  # [rows] log-prob of each drawn token

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._last is not None:
            self._steps.append(self._last.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self._last = scores.float().log_softmax(-1)
        return scores

    def chosen(self, gen: torch.Tensor) -> torch.Tensor:
        """[rows, steps]: the log-prob of each token of `gen` (the generated part of the sequences)."""
        steps = gen.shape[1]
        if len(self._steps) < steps and self._last is not None:  # the last token drawn
            self._steps.append(self._last.gather(-1, gen[:, -1:]).squeeze(-1))
        self._last = None
        if not self._steps:
            return torch.zeros(gen.shape[0], 0)
        # A generate that undoes a step it took (a deferred stop check) left one too many.
        return torch.stack(self._steps[:steps], dim=1)


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
