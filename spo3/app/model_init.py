"""Make a small causal LM with no downloads: a tokenizer trained here and a Qwen2-shaped model.

Real users point the system at a real checkpoint directory (e.g. Qwen2.5-1.5B-Instruct); this
exists so the whole system runs and trains offline, on CPU, in minutes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# Head size 32: vLLM's CPU attention supports head sizes 32, 64, 80, 96, 112, 128, ... only.
# Keys besides Qwen2Config's: `vocab_size` is the tokenizer's (trained here), `model_vocab_size`
# pads the model's embedding beyond it, `tied` is the preset's default for init_model's `tied`.
PRESETS: dict[str, dict] = {
    # ~0.15M parameters: tests and CI.
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=128,
        vocab_size=1024,
    ),
    # ~3.5M parameters: the single-machine demo.
    "small": dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=768,
        vocab_size=4096,
    ),
    # ~360M parameters: Qwen2.5-0.5B's body with the small vocabulary (`make check-gpu`).
    "qwen0.5b-body": dict(
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=4096,
    ),
    # ~1.54B parameters: Qwen2.5-1.5B(-Instruct)'s shape, tied embeddings and the real vocabulary
    # size (the tokenizer trained here has 4096 tokens at most; the embedding is padded to
    # `model_vocab_size`, as Qwen's 151,936 pads its tokenizer's 151,665). 6 GB in float32:
    # `make check-gpu` builds it on the GPU (init_model(..., device="cuda")).
    "qwen2.5-1.5b": dict(
        hidden_size=1536,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        intermediate_size=8960,
        vocab_size=4096,
        model_vocab_size=151936,
        tied=True,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
    ),
}

# Qwen2.5-style chat template, so prompts look as they will with real checkpoints.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_VERBS = [
    "go",
    "take",
    "drop",
    "open",
    "close",
    "put",
    "examine",
    "look",
    "inventory",
    "eat",
    "cook",
    "slice",
    "chop",
    "insert",
    "unlock",
    "lock",
    "use",
    "heat",
    "cool",
    "clean",
    "toggle",
    "move",
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
    "bathtub",
    "garbage can",
    "safe",
]
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
_DIRECTIONS = ["north", "south", "east", "west", "up", "down"]


def _corpus(seed: int, n_lines: int = 20000):
    """Text in the shape of agent prompts and replies, so BPE merges fit the domain."""
    rng = random.Random(seed)
    for _ in range(n_lines):
        v, o, p, d = (
            rng.choice(_VERBS),
            rng.choice(_OBJECTS),
            rng.choice(_PLACES),
            rng.choice(_DIRECTIONS),
        )
        yield rng.choice(
            [
                f"You are in the {p}. You see a {o} and a {rng.choice(_OBJECTS)}. Exits: {d}.",
                f"<think>I should {v} the {o}.</think><action>{v} {o}</action>",
                f"<action>go {d}</action>",
                f"Admissible actions: {v} {o}, go {d}, look, inventory, examine {rng.choice(_OBJECTS)}",
                f"Your task is to put a {o} in the {rng.choice(_OBJECTS)}. Step {rng.randint(1, 50)}.",
                f"Nothing happens. You are carrying: a {o}. Score: {rng.randint(0, 10)}/10.",
            ]
        )


def train_tokenizer(vocab_size: int, seed: int = 0):
    """Byte-level BPE (no unknown tokens: any byte string round-trips) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def init_model(
    out_dir: str | Path,
    preset: str = "tiny",
    seed: int = 0,
    dtype: str = "float32",
    *,
    tied: bool | None = None,
    vocab_size: int | None = None,
    device: str = "cpu",
) -> Path:
    """Write a tokenizer + randomly initialized Qwen2 model in Hugging Face format (safetensors).

    `tied`: tie lm_head to the input embeddings, as Qwen2.5-0.5B..3B do (the checkpoint then holds
    no `lm_head.weight`); None takes the preset's default (untied, like the larger Qwen2.5 models,
    but for `qwen2.5-1.5b`). `vocab_size`: the model's vocabulary, padded beyond the tokenizer's
    (default: the preset's `model_vocab_size`, else the tokenizer's size); the extra rows are
    tokens the tokenizer never produces, as in real checkpoints. `device`: where the weights are
    initialized (a 1.5B model takes seconds on a GPU, minutes on a CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = dict(PRESETS[preset])
    tokenizer = train_tokenizer(spec.pop("vocab_size"), seed)
    padded = spec.pop("model_vocab_size", None)
    tied = bool(spec.pop("tied", False)) if tied is None else tied
    vocab = max(len(tokenizer), vocab_size or padded or 0)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab,
        max_position_embeddings=spec.pop("max_position_embeddings", 2048),
        tie_word_embeddings=tied,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **spec,
    )
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "spo3_model.json").write_text(
        json.dumps(
            {
                "preset": preset,
                "seed": seed,
                "tied": tied,
                "vocab_size": vocab,
                "tokenizer_size": len(tokenizer),
                "parameters": sum(p.numel() for p in model.parameters()),
            }
        )
    )
    return out
