"""Path patching and multi-site patching against naive implementations written here with plain forward hooks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch

from entitylens.errors import EntitylensError
from entitylens.patching import PatchPair
from entitylens.patching.paths import path_patch
from entitylens.patching.sites import Site, parse_sites, patch_sites

_HOOKS = {"resid_pre": "hook_resid_pre", "resid_post": "hook_resid_post", "mlp_out": "hook_mlp_out",
          "attn_out": "hook_attn_out", "head": "attn.hook_z", "q": "attn.hook_q", "k": "attn.hook_k",
          "v": "attn.hook_v"}


def _module(model: Any, s: Site) -> Any:
    return model.get_submodule(f"blocks.{s.layer}.{_HOOKS[s.component]}")


def _pos(p: PatchPair, role: str | None, side: str) -> list[int]:
    if role is None:
        return list(range(len(p.corrupted_tokens)))
    return [(p.clean_roles if side == "clean" else p.corrupted_roles)[role]]


@torch.no_grad()
def _run(model: Any, tokens: torch.Tensor, setters: Sequence[tuple[Site, Any]], record: Sequence[Site] = ()
         ) -> tuple[torch.Tensor, dict[Site, torch.Tensor]]:
    """One unbatched forward with plain ``register_forward_hook`` hooks: setters edit, recorders copy."""
    handles, got = [], {}
    for site, fn in setters:
        handles.append(_module(model, site).register_forward_hook(lambda m, i, o, fn=fn: fn(o.clone())))
    for site in record:
        handles.append(_module(model, site).register_forward_hook(
            lambda m, i, o, s=site: got.__setitem__(s, o.clone())))
    try:
        logits = model(tokens[None])[0]
    finally:
        for h in handles:
            h.remove()
    return logits, got


def _cache(model: Any, tokens: torch.Tensor, sites: Sequence[Site]) -> tuple[torch.Tensor, dict[Site, torch.Tensor]]:
    return _run(model, tokens, [], sites)


def _ld(logits: torch.Tensor, p: PatchPair, pos: int) -> float:
    return float(logits[pos, p.clean_answer] - logits[pos, p.corrupted_answer])


D_HEAD = 16  # the tiny model's head width: plain hooks see heads flattened, [batch, pos, heads * d_head]


def _split(t: torch.Tensor) -> torch.Tensor:
    return t.view(*t.shape[:-1], -1, D_HEAD)


def _get(t: torch.Tensor, s: Site, pos: list[int]) -> torch.Tensor:
    return t[0, pos] if s.head is None else _split(t)[0, pos, s.head]


def _writer(s: Site, dst: list[int], value: torch.Tensor) -> Any:
    def fn(o: torch.Tensor) -> torch.Tensor:
        if s.head is None:
            o[0, dst] = value
        else:
            _split(o)[0, dst, s.head] = value
        return o

    return fn


def naive_path(model: Any, p: PatchPair, sender: Site, receiver: Site, freeze_mlps: bool) -> float:
    """The textbook two forwards per cell, unbatched."""
    L = int(model.cfg.n_layers)
    heads = [Site("head", la, 0) for la in range(L)]  # the module is per layer; head index unused here
    mlps = [Site("mlp_out", la) for la in range(L)]
    clean_l, clean = _cache(model, p.clean_tokens, [sender])
    corr_l, corr = _cache(model, p.corrupted_tokens, heads + mlps + [receiver])
    src, dst = _pos(p, sender.role, "clean"), _pos(p, sender.role, "corrupted")
    val = _get(clean[sender], sender, src)
    setters = [(sender, _writer(sender, dst, val))]
    for la in range(sender.layer + 1, L):
        setters.append((heads[la], lambda o, v=corr[heads[la]]: v.clone()))
    if freeze_mlps:
        for la in range(sender.layer, L):
            if not (sender.component == "mlp_out" and la == sender.layer):
                setters.append((mlps[la], lambda o, v=corr[mlps[la]]: v.clone()))
    _, rec = _run(model, p.corrupted_tokens, setters, [receiver])
    rpos = _pos(p, receiver.role, "corrupted")
    rval = _get(rec[receiver], receiver, rpos)
    logits, _ = _run(model, p.corrupted_tokens, [(receiver, _writer(receiver, rpos, rval))])
    ld_c, ld_x = _ld(clean_l, p, p.clean_answer_pos), _ld(corr_l, p, p.corrupted_answer_pos)
    return (_ld(logits, p, p.corrupted_answer_pos) - ld_x) / (ld_c - ld_x)


SENDERS = (Site("head", 0, 0, "object"), Site("head", 0, 3, "object"), Site("mlp_out", 0, None, "object"),
           Site("attn_out", 0, None, "object"))
RECEIVERS = (Site("resid_pre", 1, None, "last"), Site("q", 1, 2, "last"), Site("k", 1, 1, None),
             Site("v", 1, 0, "object"), Site("resid_post", 1, None, "last"), Site("resid_post", 0, None, None))


@pytest.mark.parametrize("method", ["fast", "hooks"])
@pytest.mark.parametrize("freeze_mlps", [False, True])
def test_path_patching_equals_naive_hooks(tiny_model: Any, diff_pair: PatchPair, freeze_mlps: bool,
                                          method: str) -> None:
    assert int(tiny_model.cfg.d_head) == D_HEAD
    res = path_patch(tiny_model, [diff_pair], SENDERS, RECEIVERS, freeze_mlps=freeze_mlps, batch=5, method=method)
    assert res.normalised.shape == (1, len(SENDERS), len(RECEIVERS))
    for si, s in enumerate(SENDERS):
        for ri, r in enumerate(RECEIVERS):
            want = naive_path(tiny_model, diff_pair, s, r, freeze_mlps)
            assert abs(float(res.normalised[0, si, ri]) - want) <= 1e-5, (str(s), str(r), want)
    # the q / k / v edits do reach the output (a no-op edit would give exactly 0 everywhere)
    assert float(res.normalised[0, :, 1:4].abs().max()) > 1e-3


def test_path_to_the_next_residual_stream_is_plain_patching(tiny_model: Any, diff_pair: PatchPair) -> None:
    """Everything after the receiver recomputes: a path to resid_pre of the next layer at every position is the
    sender's own patch -- checked against the existing exact-patching engine."""
    from entitylens.patching import run_patching

    sender = Site("head", 0, 2, "last")
    path = path_patch(tiny_model, [diff_pair], [sender], [Site("resid_pre", 1)])
    exact = run_patching(tiny_model, [diff_pair], component="head_z", grid="layer_head", roles=["last"],
                         layers=[0], method="hooks")
    want = float(exact.normalised[0, 0, 2])
    assert abs(want) > 1e-3  # a real effect to agree on
    assert abs(float(path.normalised[0, 0, 0]) - want) <= 1e-5
    sites = patch_sites(tiny_model, [diff_pair], [[sender]])
    assert abs(float(sites.normalised[0, 0]) - want) <= 1e-5


def test_patching_every_site_reproduces_the_clean_run(tiny_model: Any, pair: PatchPair) -> None:
    L, H = int(tiny_model.cfg.n_layers), int(tiny_model.cfg.n_heads)
    everything = [Site("head", la, h) for la in range(L) for h in range(H)] + [Site("mlp_out", la) for la in range(L)]
    res = patch_sites(tiny_model, [pair], [[Site("resid_pre", 0)], everything])
    torch.testing.assert_close(res.ld[0], res.ld_clean.expand(2), atol=1e-4, rtol=0)
    torch.testing.assert_close(res.normalised[0], torch.ones(2), atol=1e-5, rtol=0)


def test_same_layer_sites_equal_a_naive_sequential_loop(tiny_model: Any, diff_pair: PatchPair) -> None:
    sites = [Site("head", 1, 0, "last"), Site("head", 1, 3, "last"), Site("head", 1, 1, "object")]
    res = patch_sites(tiny_model, [diff_pair], [sites, sites[:1]])
    clean_l, clean = _cache(tiny_model, diff_pair.clean_tokens, [sites[0]])
    corr_l, _ = _cache(tiny_model, diff_pair.corrupted_tokens, [])
    setters = []
    for s in sites:  # one hook after another on the same module
        src, dst = _pos(diff_pair, s.role, "clean"), _pos(diff_pair, s.role, "corrupted")
        setters.append((s, _writer(s, dst, _get(clean[sites[0]], s, src))))
    logits, _ = _run(tiny_model, diff_pair.corrupted_tokens, setters)
    ld = _ld(logits, diff_pair, diff_pair.corrupted_answer_pos)
    assert abs(float(res.ld[0, 0]) - ld) <= 1e-4
    assert res.circuits[0] == "head:1.0@last+head:1.3@last+head:1.1@object"


def test_freezing_blocks_the_downstream_route(tiny_model: Any, diff_pair: PatchPair) -> None:
    sender = [Site("head", 0, 1, "object")]
    L1 = parse_sites("head:1.*,mlp_out:1", 2, 4, 2)
    free = patch_sites(tiny_model, [diff_pair], [sender])
    frozen = patch_sites(tiny_model, [diff_pair], [sender], freeze=L1)
    # with every layer-1 component frozen, only the residual (direct) route of the sender remains
    direct = path_patch(tiny_model, [diff_pair], sender, [Site("resid_post", 1)], freeze_mlps=True)
    assert abs(float(frozen.normalised[0, 0]) - float(direct.normalised[0, 0, 0])) <= 1e-5
    assert abs(float(frozen.normalised[0, 0]) - float(free.normalised[0, 0])) > 1e-4


def test_parse_sites_expands_stars() -> None:
    got = parse_sites("head:1.*@last, mlp_out:*@query_box, k:0.*", n_layers=2, n_heads=4, n_kv_heads=2)
    assert [str(s) for s in got] == ["head:1.0@last", "head:1.1@last", "head:1.2@last", "head:1.3@last",
                                     "mlp_out:0@query_box", "mlp_out:1@query_box", "k:0.0", "k:0.1"]


@pytest.mark.usefixtures("no_shape_checks")
def test_one_line_errors(tiny_model: Any, diff_pair: PatchPair) -> None:
    with pytest.raises(EntitylensError, match="later layer"):
        path_patch(tiny_model, [diff_pair], [Site("head", 1, 0, "object")], [Site("resid_pre", 1, None, "last")])
    with pytest.raises(EntitylensError, match="key/value heads"):
        path_patch(tiny_model, [diff_pair], [Site("head", 0, 0, "object")], [Site("k", 1, 3, "last")])
    with pytest.raises(EntitylensError, match="beyond the model"):
        patch_sites(tiny_model, [diff_pair], [[Site("head", 7, 0, "last")]])
    with pytest.raises(EntitylensError, match="needs a head"):
        Site("head", 0)
    with pytest.raises(EntitylensError, match="cannot parse"):
        parse_sites("head 0.1", 2, 4)
    with pytest.raises(EntitylensError, match="equal-length"):
        patch_sites(tiny_model, [diff_pair], [[Site("resid_pre", 0)]])
    with pytest.raises(EntitylensError, match="a path ends at"):
        path_patch(tiny_model, [diff_pair], [Site("head", 0, 0, "object")], [Site("mlp_out", 1, None, "last")])


@pytest.mark.parametrize("method", ["fast", "hooks"])
def test_hand_built_two_head_path_gives_the_known_grid(method: str) -> None:
    from patching_helpers import copy_pair, two_head_path_model

    model = two_head_path_model()
    pair = copy_pair()
    clean = model(pair.clean_tokens[None])[0, -1]
    assert int(clean.argmax()) == pair.clean_answer  # the model does copy the object
    senders = [Site("head", 0, 0, "last"), Site("head", 0, 1, "last")]
    receivers = [Site("q", 1, 0, "last"), Site("k", 1, 0), Site("v", 1, 0, "last"), Site("v", 1, 1, "last"),
                 Site("resid_pre", 1, None, "last")]
    res = path_patch(model, [pair], senders, receivers, method=method)
    known = torch.tensor([[0.0, 0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(res.normalised[0], known, atol=1e-4, rtol=0)
