"""The policy as a transformers model inside this process: the single-machine default and the
reference the vLLM client is tested against."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Mapping, Sequence

import torch

from services.contracts import ChatMessage, Completion, SamplingParams
from services.policy.interface import PolicyError
from services.policy.weights import weights_checksum


class InProcessPolicy:
    """Samples with `model.generate`; publishing swaps the weights in place.

    One lock covers sampling and publishing, so a completion never mixes weights and the
    version it reports is the version that produced it.
    """

    def __init__(self, model_dir: str | Path, *, dtype: str = "float32", device: str = "cpu",
                 version: int = 0, threads: int | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.model_dir = str(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=getattr(torch, dtype)).to(device)
        self.model.eval()
        self.device = device
        self.version = version
        self._lock = threading.Lock()
        self.eos_id = self.tokenizer.eos_token_id

    # --- sample -------------------------------------------------------------------------
    def prompt_ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        ids = self.tokenizer.apply_chat_template([m.model_dump() for m in messages],
                                                 add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)

    def sample(self, messages: Sequence[ChatMessage], params: SamplingParams) -> list[Completion]:
        prompt = self.prompt_ids(messages)
        with self._lock, torch.no_grad():
            if params.seed is not None:
                torch.manual_seed(params.seed)
            if params.choices:
                out = self._sample_choices(prompt, params)
            else:
                out = self._generate(prompt, params)
            return [c.model_copy(update={"policy_version": self.version, "prompt_token_ids": prompt}) for c in out]

    def _generate(self, prompt: list[int], p: SamplingParams) -> list[Completion]:
        input_ids = torch.tensor([prompt], device=self.device)
        sampling = p.temperature > 0
        out = self.model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=p.max_tokens,
            do_sample=sampling, temperature=p.temperature if sampling else None,
            top_p=p.top_p if sampling else None, top_k=0 if sampling else None,
            num_return_sequences=p.n if sampling else 1, eos_token_id=self.eos_id, pad_token_id=self.tokenizer.pad_token_id,
            return_dict_in_generate=True, output_logits=True,
        )
        gen = out.sequences[:, len(prompt):]
        # Raw-model logprobs (before temperature/top-p), as vLLM reports by default.
        logprobs = torch.stack(out.logits, dim=1).float().log_softmax(-1)
        chosen = logprobs.gather(-1, gen.unsqueeze(-1)).squeeze(-1)
        completions = []
        for row in range(gen.shape[0]):
            ids = gen[row].tolist()
            finish = "length"
            if self.eos_id in ids:
                ids = ids[: ids.index(self.eos_id) + 1]
                finish = "stop"
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            text, ids, finish = self._apply_stop(text, ids, finish, p.stop)
            completions.append(Completion(text=text, token_ids=ids, logprobs=chosen[row, : len(ids)].tolist(),
                                          finish_reason=finish, policy_version=0))
        # Greedy decoding gives one answer; n greedy samples are n copies of it.
        return completions if sampling else completions * p.n

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
        choice_ids = [self.tokenizer.encode(c, add_special_tokens=False) + [self.eos_id] for c in p.choices]
        logits = self._choice_logits(prompt, choice_ids)
        allowed: dict[tuple[int, ...], list[int]] = {}
        for ids in choice_ids:
            for j, tok in enumerate(ids):
                nxt = allowed.setdefault(tuple(ids[:j]), [])
                if tok not in nxt:
                    nxt.append(tok)
        temperature = p.temperature if p.temperature > 0 else 1.0
        seq_logp, token_logps = [], []
        for i, ids in enumerate(choice_ids):
            total, per_token = 0.0, []
            for j, tok in enumerate(ids):
                cand = allowed[tuple(ids[:j])]
                restricted = logits[i, j, cand]
                k = cand.index(tok)
                per_token.append(float(restricted.log_softmax(-1)[k]))
                total += float((restricted / temperature).log_softmax(-1)[k])
            seq_logp.append(total)
            token_logps.append(per_token)
        if p.temperature == 0:
            best = max(range(len(choice_ids)), key=lambda i: token_logps[i])  # greedy walk down the trie
            picks = [best] * p.n
        else:
            probs = torch.tensor(seq_logp).exp()
            picks = torch.multinomial(probs / probs.sum(), p.n, replacement=True).tolist()
        return [Completion(text=p.choices[i], token_ids=choice_ids[i], logprobs=token_logps[i],
                           finish_reason="stop", policy_version=0, choice_token_ids=choice_ids) for i in picks]

    def _choice_logits(self, prompt: list[int], choice_ids: list[list[int]]) -> torch.Tensor:
        """[choice, position, vocab]: the logits that predict each token of each choice. The prompt
        runs once and every choice row reads its KV cache: environments offer tens of commands and
        a prompt with history runs to hundreds of tokens, so a prompt per row cost tens of times more."""
        width = max(map(len, choice_ids))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        head = self.model(input_ids=torch.tensor([prompt], device=self.device), use_cache=True)
        cache = head.past_key_values
        cache.batch_repeat_interleave(len(choice_ids))
        rows = torch.tensor([ids + [pad] * (width - len(ids)) for ids in choice_ids], device=self.device)
        mask = torch.tensor([[1] * (len(prompt) + len(ids)) + [0] * (width - len(ids)) for ids in choice_ids],
                            device=self.device)
        tail = self.model(input_ids=rows, attention_mask=mask, past_key_values=cache, use_cache=True).logits
        first = head.logits[:, -1:].expand(len(choice_ids), 1, -1)  # predicts every choice's first token
        return torch.cat([first, tail[:, :-1]], dim=1).float()

    # --- publish ------------------------------------------------------------------------
    def publish(self, version: int, weights: Mapping[str, torch.Tensor]) -> None:
        if version < self.version:
            raise PolicyError(f"refusing to go back from version {self.version} to {version}")
        with self._lock, torch.no_grad():
            missing, unexpected = self.model.load_state_dict(dict(weights), strict=False)
            tied = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()
            if unexpected or set(missing) - tied:
                raise PolicyError(f"weights do not fit the model: missing {sorted(set(missing) - tied)[:5]}, "
                                  f"unexpected {sorted(unexpected)[:5]}")
            self.version = version

    def checksum(self) -> str:
        with self._lock:
            return weights_checksum(self.model.state_dict())
