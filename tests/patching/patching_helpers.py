"""Helpers for the patching tests: boxes-like pairs on the tiny model and a hand-built copy model."""

from __future__ import annotations

from typing import Any

import torch

from entitylens.patching import PatchPair

CLEAN = "Box 0 contains the car, Box 1 contains the map. Move the car from Box 0 to Box 1. Box 1 contains the"
CORRUPTED = "Box 0 contains the car, Box 1 contains the map. Move the map from Box 1 to Box 0. Box 1 contains the"


def ids(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


@torch.no_grad()
def peaked_answers(model: Any, clean: torch.Tensor, corrupted: torch.Tensor) -> tuple[int, int]:
    """Clean answer = the clean run's top token, corrupted answer = the corrupted run's (a large gap)."""
    lc = model(clean[None])[0, -1]
    lx = model(corrupted[None])[0, -1]
    good = int(lc.argmax())
    bad = int(lx.argmax())
    if bad == good:
        bad = int(lx.topk(2).indices[1])
    return good, bad


CANDIDATES = (
    "car",
    "map",
    "book",
    "bag",
    "bottle",
    "paper",
    "letter",
    "key",
    "ring",
    "coat",
    "boat",
    "apple",
    "eggnog",
    "magnet",
    "umbrella",
    "television",
    "guitar",
)
TEMPLATE = "Box 0 contains the {a}, Box 1 contains the {b}. Move the {x} from Box {s} to Box {d}. Box 1 contains the"


def same_length_objects(tok: Any) -> tuple[str, str]:
    """Two candidate objects with the same number of tokens (after a space)."""
    objs = [(o, len(ids(tok, f" {o}"))) for o in CANDIDATES]
    return next((x, y) for i, (x, n) in enumerate(objs) for y, m in objs[i + 1 :] if n == m)


def same_length_pair(model: Any, name: str = "same") -> PatchPair:
    """Equal-length boxes pair (the corruption changes which object moves where).

    Among candidate object pairs of equal token length, the one whose clean/corrupted logit-difference gap is
    largest (a random model separates some prompts far better than others; a tiny gap magnifies float noise
    in the normalised metric).
    """
    tok = model.tokenizer
    bos = [tok.bos_token_id]
    objs = [(o, len(ids(tok, f" {o}"))) for o in CANDIDATES]
    best: tuple[float, PatchPair] | None = None
    for i, (a, n) in enumerate(objs):
        for b, m in objs[i + 1 :]:
            if n != m:
                continue
            clean = torch.tensor(bos + ids(tok, TEMPLATE.format(a=a, b=b, x=a, s=0, d=1)))
            corr = torch.tensor(bos + ids(tok, TEMPLATE.format(a=a, b=b, x=b, s=1, d=0)))
            good, bad = peaked_answers(model, clean, corr)
            with torch.no_grad():
                lc, lx = model(clean[None])[0, -1], model(corr[None])[0, -1]
            gap = abs(float((lc[good] - lc[bad]) - (lx[good] - lx[bad])))
            first = int((clean != corr).nonzero()[0, 0])
            pair = PatchPair(
                clean, corr, good, bad, clean_roles={"object": first}, corrupted_roles={"object": first}, name=name
            )
            if best is None or gap > best[0]:
                best = (gap, pair)
    assert best is not None and best[0] > 1.0, best
    return best[1]


def different_length_pair(model: Any) -> PatchPair:
    """Clean and corrupted move objects of different token lengths: lengths differ, roles align them."""
    tok = model.tokenizer
    bos = [tok.bos_token_id]
    head = ids(tok, "Box 0 contains the car, Box 1 contains the map. Move the")
    tail = ids(tok, " from Box 0 to Box 1. Box 1 contains the")
    by_len: dict[int, list[int]] = {}
    for obj in CANDIDATES:
        by_len.setdefault(len(ids(tok, f" {obj}")), ids(tok, f" {obj}"))
    short, long = by_len[min(by_len)], by_len[max(by_len)]
    assert len(short) < len(long)
    clean = torch.tensor(bos + head + short + tail)
    corr = torch.tensor(bos + head + long + tail)
    good, bad = peaked_answers(model, clean, corr)
    c_obj, x_obj = len(bos + head + short) - 1, len(bos + head + long) - 1
    return PatchPair(
        clean,
        corr,
        good,
        bad,
        clean_roles={"object": c_obj, "after_object": c_obj + 1, "verb": len(head)},
        corrupted_roles={"object": x_obj, "after_object": x_obj + 1, "verb": len(head)},
        name="diff",
    )


# ------------------------------------------------------------------------------------------------
# Hand-built 1-layer model: attention copies the object token into the last position
# ------------------------------------------------------------------------------------------------

V = 16
OBJECTS = tuple(range(4, 12))
QUERY = 12
BOS = 13


def word_tokenizer(n: int = V) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(n)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="t0",
        bos_token=f"t{BOS}",
        eos_token="t14",
        pad_token="t15",
        name_or_path="entitylens/hand-built",
        add_bos_token=True,
    )
    tok.init_kwargs["name_or_path"] = "entitylens/hand-built"
    tok.init_kwargs["add_bos_token"] = True
    return tok


def blank_llama(d: int, layers: int = 1, heads: int = 1, head_dim: int | None = None, **cfg: Any) -> Any:
    """A Llama over the word vocabulary with every weight zero and every RMSNorm weight one (build on it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=V, hidden_size=d, intermediate_size=8, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, head_dim=head_dim or d,
                         max_position_embeddings=64, tie_word_embeddings=False, rms_norm_eps=1e-6,
                         bos_token_id=BOS, eos_token_id=14, pad_token_id=15, **cfg)
    m = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        for layer in m.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        m.model.norm.weight.fill_(1.0)
    return m


def word_embeddings(m: Any) -> None:
    """Embeddings: one-hot token id in dims 0..15 plus "is object" (16), "is query" (17) or "other" (18)."""
    emb = m.model.embed_tokens.weight
    with torch.no_grad():
        for t in range(V):
            emb[t, t] = 1.0
            emb[t, 16 if t in OBJECTS else 17 if t == QUERY else 18] = 1.0


def hand_built_bridge(m: Any) -> Any:
    """The TransformerBridge over a hand-built HF model, with the word tokenizer."""
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers("entitylens/hand-built", hf_model=m, tokenizer=word_tokenizer())


def copy_model() -> Any:
    """A 1-layer Llama whose only head moves the object token's identity into the last (query) position.

    Embeddings (d=32): one-hot token id in dims 0..15, "is object" in dim 16, "is query" in dim 17,
    "other" in dim 18 (every embedding has norm sqrt(2), so RMSNorm scales all by 4). The query (dim 15, the
    rotary pair with ~zero frequency) reads "is query", the key reads "is object": the last position attends
    to the object with weight ~1. Values copy the object one-hot (dims 4..11), o_proj writes it to dims
    20..27, the MLP is zero, and the unembedding reads dims 20..27 as the object logits.
    """
    m = blank_llama(32, rope_theta=1e30)
    with torch.no_grad():
        layer = m.model.layers[0]
        word_embeddings(m)
        a = 3.0
        layer.self_attn.q_proj.weight[15, 17] = a
        layer.self_attn.k_proj.weight[15, 16] = a
        for j, t in enumerate(OBJECTS):
            layer.self_attn.v_proj.weight[t, t] = 1.0
            layer.self_attn.o_proj.weight[20 + j, t] = 1.0
            m.lm_head.weight[t, 20 + j] = 1.0
    return hand_built_bridge(m)


def copy_pair(obj_pos: int = 3, length: int = 7, clean_obj: int = 5, corrupted_obj: int = 9) -> PatchPair:
    """Fillers, one object at ``obj_pos``, the query token last; the two prompts differ only in the object."""
    filler = [0, 1, 2, 3, 14, 15]
    toks = [BOS] + [filler[i % len(filler)] for i in range(length - 2)] + [QUERY]
    clean, corr = list(toks), list(toks)
    clean[obj_pos], corr[obj_pos] = clean_obj, corrupted_obj
    return PatchPair(
        torch.tensor(clean),
        torch.tensor(corr),
        clean_obj,
        corrupted_obj,
        clean_roles={"object": obj_pos, "filler": 1},
        corrupted_roles={"object": obj_pos, "filler": 1},
        name="copy",
    )


def two_head_path_model() -> Any:
    """A 2-layer, 2-head Llama with one known path: head 0.0 -> the value of head 1.0 -> the logits.

    Embeddings as :func:`copy_model` (d = 48). Layer 0, head 0 (the mover): the query position attends to the
    object and writes its one-hot to dims 20..27 of the query position. Layer 1, head 0 (the reader): the
    query position attends to itself (query and key both read "is query") and its value copies dims 20..27
    to dims 28..35, which alone the unembedding reads. Heads 0.1 and 1.1 and both MLPs are zero. So the
    sender head 0.0 at the query position acts only through head 1.0's value there (and the residual stream
    before layer 1), never through a query or key (those read "is query", which the object never changes,
    and the RMS norm is the same for every object).
    """
    hd = 48
    m = blank_llama(48, layers=2, heads=2, head_dim=hd, rope_theta=1e30)
    a, slow = 3.0, hd // 2 - 1  # rotary pair (slow, slow + hd/2) turns by ~0 at theta = 1e30
    with torch.no_grad():
        word_embeddings(m)
        mover, reader = m.model.layers[0].self_attn, m.model.layers[1].self_attn
        mover.q_proj.weight[slow, 17] = a
        mover.k_proj.weight[slow, 16] = a
        reader.q_proj.weight[slow, 17] = 4 * a  # sharper: the mover's output dilutes the RMS-normed "is query"
        reader.k_proj.weight[slow, 17] = 4 * a
        for j, t in enumerate(OBJECTS):
            mover.v_proj.weight[t, t] = 1.0
            mover.o_proj.weight[20 + j, t] = 1.0
            reader.v_proj.weight[j, 20 + j] = 1.0
            reader.o_proj.weight[28 + j, j] = 1.0
            m.lm_head.weight[t, 28 + j] = 1.0
    return hand_built_bridge(m)


PLUS, MINUS, ANS_A, ANS_B = (4, 5, 6, 7), (8, 9, 10, 11), 12, 13


def variable_model(d: int = 32, seed: int = 0) -> Any:
    """A 1-layer Llama storing one binary variable in one known direction (dim 0) of the last token's stream.

    Cue tokens 4-7 write +1 and 8-11 write -1 to dim 0, plus a fixed random vector (norm ~1) in dims 2..d-1
    that the output ignores; attention and MLP are zero, and the unembedding reads dim 0: +dim 0 for token 12,
    -dim 0 for token 13. So the answer is 12 when the variable is +, 13 when -, and an interchange of dim 0
    alone moves it; a random 1-D direction barely overlaps dim 0.
    """
    m = blank_llama(d)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        emb = m.model.embed_tokens.weight
        for t in range(V):
            emb[t, 1] = 1.0  # every token: a constant component
        for t in PLUS + MINUS:
            emb[t, 0] = 1.0 if t in PLUS else -1.0
            emb[t, 2:] = torch.randn(d - 2, generator=gen) / (d - 2) ** 0.5
        m.lm_head.weight[ANS_A, 0] = 1.0
        m.lm_head.weight[ANS_B, 0] = -1.0
    return hand_built_bridge(m)


def variable_pairs(n: int, seed: int = 0) -> list[PatchPair]:
    """Pairs whose clean prompt ends in a + cue and corrupted in a - cue (fillers vary); answers 12 / 13.

    The causal model's answer to the corrupted prompt with the variable set from the clean one is 12.
    """
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        filler = [rng.choice([0, 1, 2, 3, 14]) for _ in range(rng.randint(2, 5))]
        clean = torch.tensor([BOS, *filler, rng.choice(PLUS)])
        corr = torch.tensor([BOS, *filler, rng.choice(MINUS)])
        out.append(PatchPair(clean, corr, ANS_A, ANS_B, name=f"v{i}", counterfactual_answer=ANS_A))
    return out
