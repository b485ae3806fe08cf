"""Tiny random models (``tiny:<name>`` specs) for fast, offline tests.

Every tiny model is built from a seed, needs no network, and comes with a small byte-level BPE
tokenizer trained (deterministically, in milliseconds) on boxes-task text. Its vocabulary is small
enough that some task objects split into several tokens, so code that handles multi-token objects
is exercised by the tiny models too.

Names:

- ``tiny:llama`` -- a randomly initialised Hugging Face ``LlamaForCausalLM`` (rotary, grouped-query
  attention, RMSNorm, SwiGLU) wrapped with ``TransformerBridge.boot_transformers``. It has an HF
  ``bridge.original_model`` with a real ``past_key_values`` KV cache, like every hub/local/GGUF model.
- ``tiny:gpt2`` -- a randomly initialised HF ``GPT2LMHeadModel`` (learned positions, LayerNorm,
  tokenizer that does NOT prepend BOS, like GPT-2 / OLMo / Phi / SmolLM2).
- ``tiny:native`` -- a TransformerLens-native model from ``TransformerBridge.boot_native``. It has no
  HF model behind it (``bridge.original_model`` is the TL ``NativeModel``).
- ``tiny:gemma3`` -- a randomly initialised HF ``Gemma3ForCausalLM`` (text): sliding-window and global
  attention layers alternating (``window`` tokens, default 64, so boxes prompts run past the window),
  q/k norms, scaled embeddings; BOS-prepending tokenizer, like Gemma-3.
- ``tiny:qwen2`` -- a randomly initialised HF ``Qwen2ForCausalLM`` (q/k/v biases) with a tokenizer that does
  NOT prepend BOS, like Qwen2/2.5.

Size options go after ``?``: ``tiny:llama?seed=1&layers=4&d_model=64&heads=4&kv_heads=2&d_mlp=128``
(``window=`` for ``tiny:gemma3``).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from entitylens.errors import EntitylensError
from entitylens.task import vocab

TINY_NAMES: tuple[str, ...] = ("llama", "gpt2", "native", "gemma3", "qwen2")
"""Names accepted after ``tiny:``."""

# Structural vocabulary of the boxes task (prompt instruction, descriptions, operations).
_INSTRUCTION = (
    'Given the description after "Description:", write a true statement about all boxes and their '
    'contents to the description after "Statement:".'
)
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TINY_VOCAB_SIZE = 512
"""Target vocabulary size of the tiny tokenizer (256 bytes + 7 specials + ~250 merges)."""


def task_objects() -> tuple[str, ...]:
    """The object nouns the tiny tokenizer is trained on.

    ``entitylens.task.vocab.BNC_OBJECTS``, the 100 common nouns of the boxes task. The disjoint (rare-noun)
    vocabulary is deliberately left out, so, as with a real tokenizer, rare nouns split into several tokens.
    """
    return tuple(vocab.BNC_OBJECTS)


def _training_corpus(objects: tuple[str, ...]) -> list[str]:
    """Deterministic boxes-task text; even-indexed objects are frequent, odd-indexed ones rare.

    The skew makes the BPE merge the frequent object names into single tokens while the rare ones
    stay split into several tokens.
    """
    lines = [_INSTRUCTION]
    n = len(objects)
    for i, obj in enumerate(objects):
        other = objects[(i * 7 + 3) % n]
        box, dest = i % 7, (i + 3) % 7
        reps = 6 if i % 2 == 0 else 1
        for _ in range(reps):
            lines.append(
                f"Description: Box {box} contains the {obj} and the {other}, Box {dest} contains nothing. "
                f"Move the {obj} from Box {box} to Box {dest}. Remove the {obj} from Box {dest}. "
                f"Put the {obj} into Box {box}.\nStatement: Box {box} contains the {obj}.\n"
            )
    return lines


@functools.lru_cache(maxsize=4)
def _train_tokenizer_json(objects: tuple[str, ...], vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(objects), trainer)
    return tok.to_str()


def tiny_tokenizer(bos: bool = True, vocab_size: int = TINY_VOCAB_SIZE) -> Any:
    """A fresh ``PreTrainedTokenizerFast`` trained on boxes-task text (offline, deterministic).

    Args:
        bos: Whether encoding prepends ``<s>`` (Llama-style) or not (GPT-2-style).
        vocab_size: Target vocabulary size; small values split more objects into several tokens.

    Returns:
        The tokenizer, with bos/eos/pad/unk tokens, left padding and a chat template.
    """
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_train_tokenizer_json(task_objects(), vocab_size))
    if bos:
        bos_id = backend.token_to_id("<s>")
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    name = f"entitylens/tiny-bpe-{'bos' if bos else 'nobos'}"
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=list(SPECIAL_TOKENS[4:]),
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        name_or_path=name,
        add_bos_token=bos,
    )
    # TransformerLens re-loads a tokenizer from ``name_or_path`` when it does not add BOS; ours is
    # never on disk, so record the flag where TL looks for it.
    tok.init_kwargs["name_or_path"] = name
    tok.init_kwargs["add_bos_token"] = True
    return tok


@dataclass(frozen=True)
class TinySpec:
    """Parsed ``tiny:<name>?key=value&...`` spec.

    Attributes:
        name: One of :data:`TINY_NAMES`.
        seed: Seed of the weight initialisation.
        layers: Number of transformer blocks.
        d_model: Residual width.
        heads: Attention heads.
        kv_heads: Key/value heads (grouped-query attention; Llama only).
        d_mlp: MLP hidden width.
        n_ctx: Maximum context length.
        window: Sliding-window length of ``tiny:gemma3``'s local layers.
    """

    name: str
    seed: int = 0
    layers: int = 2
    d_model: int = 64
    heads: int = 4
    kv_heads: int = 2
    d_mlp: int = 128
    n_ctx: int = 1024
    window: int = 64

    def __post_init__(self) -> None:
        if self.name not in TINY_NAMES:
            raise EntitylensError(
                f"unknown tiny model 'tiny:{self.name}'; use one of " + ", ".join(f"tiny:{n}" for n in TINY_NAMES)
            )
        for field in ("layers", "d_model", "heads", "kv_heads", "d_mlp", "n_ctx", "window"):
            if int(getattr(self, field)) <= 0:
                raise EntitylensError(f"tiny model option {field}={getattr(self, field)} must be positive")
        if self.d_model % self.heads or self.heads % self.kv_heads:
            raise EntitylensError(
                f"tiny model needs d_model % heads == 0 and heads % kv_heads == 0 "
                f"(got d_model={self.d_model}, heads={self.heads}, kv_heads={self.kv_heads}); adjust them"
            )

    @property
    def canonical(self) -> str:
        """The spec string with every option spelled out (stable; used as the model's identity)."""
        keys = ["seed", "layers", "d_model", "heads", "kv_heads", "d_mlp", "n_ctx"]
        if self.name == "gemma3":
            keys.append("window")
        opts = "&".join(f"{k}={getattr(self, k)}" for k in keys)
        return f"tiny:{self.name}?{opts}"

    @property
    def digest(self) -> str:
        """SHA-256 of :attr:`canonical` (the tiny model's ``source_hash``)."""
        return hashlib.sha256(self.canonical.encode()).hexdigest()


def parse_tiny_spec(spec: str, seed: int | None = None) -> TinySpec:
    """Parse ``tiny:<name>[?k=v&...]``; a ``seed`` argument overrides ``?seed=``.

    Raises:
        EntitylensError: Unknown name or option, or a non-integer value.
    """
    body = spec.split(":", 1)[1] if spec.startswith("tiny:") else spec
    name, _, query = body.partition("?")
    kwargs: dict[str, int] = {}
    allowed = {"seed", "layers", "d_model", "heads", "kv_heads", "d_mlp", "n_ctx", "window"}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if key not in allowed or not eq:
            raise EntitylensError(
                f"bad tiny model option {part!r} in {spec!r}; use key=value with keys {', '.join(sorted(allowed))}"
            )
        try:
            kwargs[key] = int(value)
        except ValueError:
            raise EntitylensError(f"tiny model option {key}={value!r} in {spec!r} must be an integer") from None
    if seed is not None:
        kwargs["seed"] = int(seed)
    return TinySpec(name=name, **kwargs)


def tiny_prepends_bos(name: str) -> bool:
    """Whether the tokenizer of ``tiny:<name>`` prepends BOS (as the family it imitates does)."""
    return name in ("llama", "native", "gemma3")


def build_tiny_hf(spec: TinySpec) -> tuple[torch.nn.Module, Any]:
    """Build the seeded HF model and tokenizer of a ``tiny:`` spec (float32, eval mode; not ``native``).

    The global torch RNG is left untouched.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel

    tok = tiny_tokenizer(bos=tiny_prepends_bos(spec.name))
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model: PreTrainedModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        if spec.name == "llama":
            llama_cfg = LlamaConfig(
                vocab_size=len(tok),
                hidden_size=spec.d_model,
                intermediate_size=spec.d_mlp,
                num_hidden_layers=spec.layers,
                num_attention_heads=spec.heads,
                num_key_value_heads=spec.kv_heads,
                max_position_embeddings=spec.n_ctx,
                # Large init so random logits are peaked: greedy decoding has no near-ties.
                initializer_range=0.3,
                tie_word_embeddings=False,
                **ids,
            )
            model = LlamaForCausalLM(llama_cfg)
        elif spec.name == "gemma3":
            from transformers import Gemma3ForCausalLM, Gemma3TextConfig

            head_dim = spec.d_model // spec.heads
            gemma_cfg = Gemma3TextConfig(
                vocab_size=len(tok),
                hidden_size=spec.d_model,
                intermediate_size=spec.d_mlp,
                num_hidden_layers=spec.layers,
                num_attention_heads=spec.heads,
                num_key_value_heads=spec.kv_heads,
                head_dim=head_dim,
                query_pre_attn_scalar=head_dim,
                max_position_embeddings=spec.n_ctx,
                sliding_window=spec.window,
                layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(spec.layers)],
                initializer_range=0.3,
                tie_word_embeddings=True,
                **ids,
            )
            model = Gemma3ForCausalLM(gemma_cfg)
        elif spec.name == "qwen2":
            from transformers import Qwen2Config, Qwen2ForCausalLM

            qwen_cfg = Qwen2Config(
                vocab_size=len(tok),
                hidden_size=spec.d_model,
                intermediate_size=spec.d_mlp,
                num_hidden_layers=spec.layers,
                num_attention_heads=spec.heads,
                num_key_value_heads=spec.kv_heads,
                max_position_embeddings=spec.n_ctx,
                initializer_range=0.3,
                tie_word_embeddings=False,
                **ids,
            )
            model = Qwen2ForCausalLM(qwen_cfg)
        else:
            gpt2_cfg = GPT2Config(
                vocab_size=len(tok),
                n_embd=spec.d_model,
                n_inner=spec.d_mlp,
                n_layer=spec.layers,
                n_head=spec.heads,
                n_positions=spec.n_ctx,
                initializer_range=0.3,
                **ids,
            )
            model = GPT2LMHeadModel(gpt2_cfg)
    model.config.name_or_path = spec.canonical
    model.config.architectures = [type(model).__name__]  # TransformerLens picks its adapter by this name
    return model.eval(), tok


def build_tiny_native_config(spec: TinySpec, vocab_size: int) -> Any:
    """The ``TransformerBridgeConfig`` of ``tiny:native`` (rotary, RMSNorm, gated MLP)."""
    from transformer_lens.config import TransformerBridgeConfig

    return TransformerBridgeConfig(
        d_model=spec.d_model,
        d_head=spec.d_model // spec.heads,
        n_layers=spec.layers,
        n_ctx=spec.n_ctx,
        n_heads=spec.heads,
        d_mlp=spec.d_mlp,
        d_vocab=vocab_size,
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        gated_mlp=True,
        seed=spec.seed,
        init_weights=True,
        architecture="TransformerLensNative",
    )
