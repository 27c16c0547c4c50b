"""The in-process engine: the policy contract, and versioned weight swaps."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from spo3.app.model_init import init_model
from spo3.policy.inprocess import InProcessPolicy
from spo3.policy.interface import PolicyError
from spo3.policy.weights import weights_checksum
from spo3.transport.contracts import SamplingParams
from tests import policy_contract as contract


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return init_model(tmp_path_factory.mktemp("model"), "tiny", seed=0)


@pytest.fixture
def policy(model_dir):
    return InProcessPolicy(model_dir)


@pytest.fixture(scope="module")
def reference(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def test_contract(policy, reference):
    contract.check_n_samples_with_ids_and_logprobs(policy, reference, tol=1e-4)
    contract.check_greedy_is_deterministic(policy)
    contract.check_choice_mode(policy)


def test_choice_logprobs_match_a_full_forward_of_prompt_and_choice(policy, reference):
    """Choice mode reuses one prompt pass for every choice: each choice token's logprob (restricted
    to the tokens that keep the text a prefix of some choice) equals the one a plain forward of
    prompt + choice gives, for choices of different lengths (padded rows)."""
    # Shared prefixes, so that later tokens are drawn among several too (not forced).
    choices = [
        "go north",
        "go south",
        "take apple",
        "take apple from table",
        "take red apple",
        "take red pen",
        "look",
    ]
    outs = policy.sample(
        contract.MESSAGES, SamplingParams(n=64, choices=choices, temperature=1.0, seed=1)
    )
    prompt = outs[0].prompt_token_ids
    choice_ids = {
        c: policy.tokenizer.encode(c, add_special_tokens=False) + [policy.eos_id] for c in choices
    }
    allowed: dict[tuple[int, ...], set[int]] = {}
    for ids in choice_ids.values():
        for j, tok in enumerate(ids):
            allowed.setdefault(tuple(ids[:j]), set()).add(tok)
    checked = set()
    for c in outs:
        if c.text in checked:
            continue
        ids = choice_ids[c.text]
        assert c.token_ids == ids
        with torch.no_grad():
            logits = (
                reference(input_ids=torch.tensor([prompt + ids]))
                .logits[0, len(prompt) - 1 : -1]
                .float()
            )
        for j, tok in enumerate(ids):
            cand = sorted(allowed[tuple(ids[:j])])
            expect = float(logits[j, cand].log_softmax(-1)[cand.index(tok)])
            assert abs(c.logprobs[j] - expect) < 1e-4, (c.text, j, c.logprobs[j], expect)
        checked.add(c.text)
    assert len(checked) >= 4
    assert any(lp < 0 for c in outs for lp in c.logprobs[1:]), (
        "no choice token after the first was drawn"
    )


def test_stop_strings_cut_text_and_say_stop(policy):
    outs = policy.sample(
        contract.MESSAGES, SamplingParams(n=8, max_tokens=40, temperature=1.0, stop=["o"], seed=1)
    )
    for c in outs:
        assert "o" not in c.text
        assert c.finish_reason in ("stop", "length")
    assert any(c.finish_reason == "stop" for c in outs)


def perturbed(model_dir, scale=0.5, seed=1):
    m = AutoModelForCausalLM.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return m


def test_publish_changes_outputs_and_version(policy, model_dir):
    before = contract.check_greedy_is_deterministic(policy)
    assert policy.sample(contract.MESSAGES, SamplingParams())[0].policy_version == 0
    new = perturbed(model_dir)
    policy.publish(1, new.state_dict())
    assert policy.checksum() == weights_checksum(new.state_dict())
    after = policy.sample(contract.MESSAGES, SamplingParams(n=1, max_tokens=8, temperature=0.0))[0]
    assert after.policy_version == 1
    assert after.token_ids != before
    with pytest.raises(PolicyError, match="go back"):
        policy.publish(0, new.state_dict())
    with pytest.raises(PolicyError, match="do not fit"):
        policy.publish(2, {"not.a.param": torch.zeros(1)})
    assert policy.version == 1


def test_version_always_matches_the_weights_that_produced_it(policy, model_dir):
    """Sampling in threads while weights flip between two versions: every greedy completion
    is the one its reported version produces, never a mix."""
    v0 = {k: v.clone() for k, v in policy.model.state_dict().items()}
    v1 = perturbed(model_dir).state_dict()
    greedy = SamplingParams(n=1, max_tokens=6, temperature=0.0)
    expected = {0: policy.sample(contract.MESSAGES, greedy)[0].token_ids}
    policy.publish(1, v1)
    expected[1] = policy.sample(contract.MESSAGES, greedy)[0].token_ids
    assert expected[0] != expected[1]
    policy.publish(2, v0)  # version 2 carries v0's weights
    expected[2] = expected[0]
    seen, stop = [], threading.Event()

    def sampler():
        while not stop.is_set():
            c = policy.sample(contract.MESSAGES, greedy)[0]
            seen.append((c.policy_version, c.token_ids))

    threads = [threading.Thread(target=sampler) for _ in range(2)]
    for t in threads:
        t.start()
    for version in range(3, 9):
        weights = v1 if version % 2 else v0
        expected[version] = expected[1] if version % 2 else expected[0]
        policy.publish(version, weights)
    stop.set()
    for t in threads:
        t.join()
    assert len(seen) > 0
    for version, ids in seen:
        assert ids == expected[version], f"version {version} reported for other weights"


def test_in_process_engines_follow_directory_publishes(policy, model_dir, redis_url, tmp_path):
    from spo3.policy.follow import FollowingPolicy
    from spo3.policy.publish import DirectoryPublisher
    from spo3.transport.connection import connect

    client = connect(redis_url)
    publisher = DirectoryPublisher(tmp_path / "weights", client, "run1", keep=2)
    follower = FollowingPolicy(policy, tmp_path / "weights", client, "run1")
    greedy = SamplingParams(n=1, max_tokens=8, temperature=0.0)
    before = follower.sample(contract.MESSAGES, greedy)[0]
    assert before.policy_version == 0 and follower.reloads == 0
    new = perturbed(model_dir)
    for v in (1, 2, 3):
        publisher.publish(v, new.state_dict())
    after = follower.sample(contract.MESSAGES, greedy)[0]
    assert after.policy_version == 3 and follower.reloads == 1  # jumps straight to the newest
    assert after.token_ids != before.token_ids
    assert policy.checksum() == weights_checksum(new.state_dict())
    assert len(list((tmp_path / "weights").iterdir())) == 2


def test_concurrent_requests_share_one_generate_and_keep_their_logprobs(policy, reference):
    """Threads asking at once run as one left-padded `generate`; every row's logprobs are still
    those of a plain forward of its own prompt + tokens, and greedy answers equal solo ones."""
    from spo3.transport.contracts import ChatMessage

    prompts = [
        [ChatMessage(role="user", content="You are in the kitchen." + " You see a box." * k)]
        for k in range(4)
    ]
    calls = []
    real_generate = policy.model.generate

    def counting_generate(*args, **kwargs):
        calls.append(args[0].shape)
        return real_generate(*args, **kwargs)

    policy.model.generate = counting_generate
    results: dict[int, list] = {}
    params = [SamplingParams(n=3, max_tokens=12, temperature=1.0)] * 3 + [
        SamplingParams(n=2, max_tokens=12, temperature=0.0)
    ]
    policy._lock.acquire()  # hold the engine so that all four requests are waiting together
    threads = [
        threading.Thread(
            target=lambda i=i: results.__setitem__(i, policy.sample(prompts[i], params[i]))
        )
        for i in range(4)
    ]
    for t in threads:
        t.start()
    while len(policy._pending) < 4:
        threading.Event().wait(0.01)
    policy._lock.release()
    for t in threads:
        t.join(timeout=60)
    # one generate for the three sampled requests (3 x 3 rows), one for the greedy one
    assert sorted(shape[0] for shape in calls) == [1, 9]
    for i, outs in results.items():
        assert len(outs) == params[i].n
        for c in outs:
            ids = torch.tensor([c.prompt_token_ids + c.token_ids])
            with torch.no_grad():
                logits = (
                    reference(input_ids=ids).logits[0, len(c.prompt_token_ids) - 1 : -1].float()
                )
            expect = (
                logits.log_softmax(-1)
                .gather(-1, ids[0, len(c.prompt_token_ids) :, None])
                .squeeze(-1)
            )
            assert torch.allclose(torch.tensor(c.logprobs), expect, atol=1e-4), i
    policy.model.generate = real_generate
    assert (
        policy._announced == 0 and policy._pending == []
    )  # nothing left for a later leader to wait for
    solo = policy.sample(prompts[3], SamplingParams(n=1, max_tokens=12, temperature=0.0))[0]
    assert results[3][0].token_ids == solo.token_ids


def test_a_request_that_fails_to_tokenize_leaves_no_trace(policy, monkeypatch):
    def broken(messages):
        raise ValueError("bad chat template")

    monkeypatch.setattr(policy, "prompt_ids", broken)
    with pytest.raises(ValueError, match="bad chat template"):
        policy.sample(contract.MESSAGES, SamplingParams(n=2, max_tokens=4))
    assert policy._announced == 0 and policy._pending == []


def test_requests_arriving_within_the_settle_time_join_the_batch(policy):
    """A leader waits while new requests keep being announced less than `settle_s` apart (threads
    released together reach the engine a little apart), but a lone caller does not wait out the
    whole batch window."""
    from spo3.transport.contracts import ChatMessage

    sizes: list[int] = []
    run_batch = policy._run_batch
    policy._run_batch = lambda batch: (sizes.append(len(batch)), run_batch(batch))[1]
    window, settle = policy.batch_window_s, policy.settle_s
    policy.batch_window_s, policy.settle_s = 5.0, 0.2
    try:
        chat = [ChatMessage(role="user", content="You are in the kitchen.")]
        params = SamplingParams(n=2, max_tokens=4, temperature=1.0)
        early = []
        for _ in range(2):  # each arrives well inside the settle time of the one before
            early.append(threading.Thread(target=policy.sample, args=(chat, params)))
            early[-1].start()
            threading.Event().wait(0.12)
        policy.sample(chat, params)
        for t in early:
            t.join(timeout=60)
        assert sizes == [3]
        t0 = time.monotonic()
        policy.sample(chat, params)
        assert time.monotonic() - t0 < 2.5  # settle (0.2 s) plus the generate, not the 5 s window
        assert sizes == [3, 1]
    finally:
        policy._run_batch = run_batch
        policy.batch_window_s, policy.settle_s = window, settle


def test_engine_thread_serves_every_caller_and_ends_with_its_policy(model_dir):
    """Free-form requests run on one long-lived engine thread, whichever thread asks; once the
    policy is dropped the thread ends, so the model it served can be freed."""
    import gc
    import weakref

    from spo3.transport.contracts import ChatMessage

    policy = InProcessPolicy(model_dir)
    ran_on: list[str] = []
    generate = policy._generate
    policy._generate = lambda requests: (
        ran_on.append(threading.current_thread().name),
        generate(requests),  # noqa: F821
    )[1]
    chat = [ChatMessage(role="user", content="You are in the kitchen.")]
    params = SamplingParams(n=2, max_tokens=4, temperature=1.0)
    for _ in range(2):
        caller = threading.Thread(target=policy.sample, args=(chat, params))
        caller.start()
        caller.join(timeout=60)
    policy.sample(chat, params)
    assert ran_on == ["spo3-inprocess-engine"] * 3
    engine_thread, alive = policy._engine_thread, weakref.ref(policy)
    del policy, generate
    gc.collect()
    engine_thread.join(timeout=10)
    assert alive() is None and not engine_thread.is_alive()


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_free_form_logprobs_are_those_of_the_tempered_distribution(policy, reference, temperature):
    """Behaviour log-probs describe the distribution each token was drawn from: at temperature T
    that is softmax(logits / T), not the model's T = 1 distribution (else the learner's importance
    weight and KL compare against another policy than the one sampled)."""
    outs = policy.sample(
        contract.MESSAGES,
        SamplingParams(n=4, max_tokens=12, temperature=temperature, seed=5),
    )
    gap = 0.0
    for c in outs:
        assert len(c.logprobs) == len(c.token_ids) >= 1
        ids = torch.tensor([c.prompt_token_ids + c.token_ids])
        with torch.no_grad():
            logits = reference(input_ids=ids).logits[0, len(c.prompt_token_ids) - 1 : -1].float()
        picked = ids[0, len(c.prompt_token_ids) :, None]
        tempered = (logits / temperature).log_softmax(-1).gather(-1, picked).squeeze(-1)
        untempered = logits.log_softmax(-1).gather(-1, picked).squeeze(-1)
        got = torch.tensor(c.logprobs)
        assert torch.allclose(got, tempered, atol=1e-4), (got, tempered)
        gap = max(gap, float((got - untempered).abs().max()))
    assert gap > 1e-2, "the test cannot tell tempered from untempered log-probs"


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_choice_logprobs_are_those_of_the_tempered_restricted_distribution(
    policy, reference, temperature
):
    """Choice mode draws each token from the model's logits restricted to the trie's next tokens
    and divided by T; the log-prob returned with each token is under exactly that distribution."""
    choices = ["go north", "go south", "take apple", "take red apple", "take red pen", "look"]
    outs = policy.sample(
        contract.MESSAGES,
        SamplingParams(n=48, choices=choices, temperature=temperature, seed=2),
    )
    prompt = outs[0].prompt_token_ids
    choice_ids = {
        c: policy.tokenizer.encode(c, add_special_tokens=False) + [policy.eos_id] for c in choices
    }
    allowed: dict[tuple[int, ...], set[int]] = {}
    for ids in choice_ids.values():
        for j, tok in enumerate(ids):
            allowed.setdefault(tuple(ids[:j]), set()).add(tok)
    gap, checked = 0.0, set()
    for c in outs:
        if c.text in checked:
            continue
        ids = choice_ids[c.text]
        assert c.token_ids == ids
        with torch.no_grad():
            logits = (
                reference(input_ids=torch.tensor([prompt + ids]))
                .logits[0, len(prompt) - 1 : -1]
                .float()
            )
        for j, tok in enumerate(ids):
            cand = sorted(allowed[tuple(ids[:j])])
            k = cand.index(tok)
            expect = float((logits[j, cand] / temperature).log_softmax(-1)[k])
            assert abs(c.logprobs[j] - expect) < 1e-4, (c.text, j, c.logprobs[j], expect)
            gap = max(gap, abs(c.logprobs[j] - float(logits[j, cand].log_softmax(-1)[k])))
        checked.add(c.text)
    assert len(checked) >= 2
    assert gap > 1e-2, "the test cannot tell tempered from untempered log-probs"


def test_top_p_logprobs_are_renormalised_over_the_nucleus(policy, reference):
    """With top_p < 1 a token is drawn from the tempered distribution cut to its nucleus and
    renormalised: the log-prob returned is under that distribution (tokens outside it never come)."""
    from transformers import TopPLogitsWarper

    temperature, top_p = 0.7, 0.8
    outs = policy.sample(
        contract.MESSAGES,
        SamplingParams(n=4, max_tokens=10, temperature=temperature, top_p=top_p, seed=3),
    )
    gap = 0.0
    for c in outs:
        ids = torch.tensor([c.prompt_token_ids + c.token_ids])
        with torch.no_grad():
            logits = reference(input_ids=ids).logits[0, len(c.prompt_token_ids) - 1 : -1].float()
        picked = ids[0, len(c.prompt_token_ids) :, None]
        nucleus = TopPLogitsWarper(top_p)(ids, logits / temperature).log_softmax(-1)
        expect = nucleus.gather(-1, picked).squeeze(-1)
        whole = (logits / temperature).log_softmax(-1).gather(-1, picked).squeeze(-1)
        got = torch.tensor(c.logprobs)
        assert torch.isfinite(expect).all(), "a token outside the nucleus was drawn"
        assert torch.allclose(got, expect, atol=1e-4), (got, expect)
        gap = max(gap, float((got - whole).abs().max()))
    assert gap > 1e-2, "the test cannot tell the nucleus from the whole distribution"


def test_a_checkpoints_generation_config_does_not_change_what_is_sampled(model_dir, tmp_path):
    """Real checkpoints ship sampling defaults (Qwen2.5-Instruct: repetition_penalty 1.05, top_k 20,
    top_p 0.8, temperature 0.7); the engine samples with the request's settings only, so the
    log-probs it returns are still log_softmax(logits / T) of the whole vocabulary."""
    import shutil

    from transformers import GenerationConfig

    model = tmp_path / "with-defaults"
    shutil.copytree(model_dir, model)
    GenerationConfig(
        do_sample=True, repetition_penalty=1.5, top_k=5, top_p=0.5, temperature=0.3, eos_token_id=1
    ).save_pretrained(model)
    policy = InProcessPolicy(model)
    reference = AutoModelForCausalLM.from_pretrained(model).eval()
    outs = policy.sample(
        contract.MESSAGES, SamplingParams(n=3, max_tokens=10, temperature=1.0, seed=4)
    )
    for c in outs:
        ids = torch.tensor([c.prompt_token_ids + c.token_ids])
        with torch.no_grad():
            logits = reference(input_ids=ids).logits[0, len(c.prompt_token_ids) - 1 : -1].float()
        expect = logits.log_softmax(-1).gather(-1, ids[0, len(c.prompt_token_ids) :, None])
        assert torch.allclose(torch.tensor(c.logprobs), expect.squeeze(-1), atol=1e-4)


def test_no_vocabulary_wide_history_is_kept(policy, monkeypatch):
    """Free-form: generate keeps no scores (one step's log-probs at a time instead) and returns
    no cache; choice mode: the model's head never runs over the whole vocabulary (only the allowed
    tokens' rows of it are used)."""
    calls = []
    real_generate = policy.model.generate

    def spying_generate(*args, **kwargs):
        calls.append(kwargs)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(policy.model, "generate", spying_generate)
    outs = policy.sample(contract.MESSAGES, SamplingParams(n=8, max_tokens=6, temperature=1.0))
    assert len(outs) == 8 and all(len(c.logprobs) == len(c.token_ids) for c in outs)
    assert calls and not calls[0].get("output_scores") and not calls[0]["return_dict_in_generate"]
    head_calls = []
    hook = policy.model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: head_calls.append(out.shape)
    )
    try:
        chosen = policy.sample(
            contract.MESSAGES,
            SamplingParams(n=8, choices=["go north", "go south", "look"], temperature=1.0),
        )
    finally:
        hook.remove()
    assert all(c.text in ("go north", "go south", "look") for c in chosen)
    assert head_calls == []


def test_actor_policy_builds_the_engine_with_the_dtype_and_device_asked_for(model_dir):
    from pydantic import ValidationError

    from spo3.app.wiring import PolicySource, actor_policy

    source = PolicySource(model=str(model_dir), dtype="bfloat16", device="cpu")
    policy = actor_policy(source, redis_url="redis://unused", run="r")
    assert isinstance(policy, InProcessPolicy)
    assert next(policy.model.parameters()).dtype == torch.bfloat16
    assert policy.device == "cpu"
    out = policy.sample(contract.MESSAGES, SamplingParams(n=2, max_tokens=4, temperature=1.0))
    assert all(len(c.logprobs) == len(c.token_ids) for c in out)
    assert PolicySource(model="m").dtype == "float32" and PolicySource(model="m").device == "cpu"
    with pytest.raises(ValidationError):
        PolicySource(model="m", dtype="float8")
    with pytest.raises(ValidationError):
        PolicySource(model="m", device="gpu0")
