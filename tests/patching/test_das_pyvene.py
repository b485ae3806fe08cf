"""Optional cross-check: pyvene's rotated-space intervention gives the same IIA as ours for the same rotation.

pyvene (Wu et al.'s intervention library, the reference implementation of DAS's ``RotatedSpaceIntervention``)
wraps the tiny model's Hugging Face Llama; its rotation's first ``k`` columns are our basis. For every pair
and site the intervened run's answer logits agree (1e-4), hence the same hits and IIA. ``bootstrap.sh``
installs pyvene without its dependencies (it imports cleanly against the main environment); skipped where
it is absent.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

pyvene = pytest.importorskip("pyvene")


def _rotation(basis: torch.Tensor) -> torch.Tensor:
    """A ``[d, d]`` orthogonal matrix whose first ``k`` columns are ``basis`` (``[d, k]``, orthonormal)."""
    d, k = basis.shape
    rest = torch.randn(d, d - k, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.cat([basis.double(), rest], 1))
    q[:, :k] = basis.double()  # QR may flip signs: keep the basis itself
    return q.float()


def test_pyvene_rotated_space_intervention_gives_our_iia(tiny_model: Any) -> None:
    from entitylens.behavior.runners import unwrapped_hf_model
    from entitylens.patching.das import _alternatives, _capture, _engine, _logits, _Site, interchange_iia
    from entitylens.patching.pair_build import build_pairs
    from entitylens.patching.pair_tokens import to_patch_pairs
    from entitylens.task.generate import GeneratorConfig, generate_states

    text = build_pairs(generate_states(GeneratorConfig(seed=3, num_states=40)), "op_object", seed=0, max_pairs=6,
                       cross_query=True)
    pairs = to_patch_pairs(tiny_model, text, roles=["changed_object", "last"])
    gen = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(64, 3, generator=gen))
    fp = _engine(tiny_model)
    caps = _capture(fp, pairs)
    with unwrapped_hf_model(tiny_model) as hf:
        for layer, role in ((0, "changed_object"), (1, "last")):
            cfg = pyvene.IntervenableConfig(representations=[{"layer": layer, "component": "block_input",
                                                              "unit": "pos", "max_number_of_units": 1}],
                                            intervention_types=pyvene.RotatedSpaceIntervention)
            iv = pyvene.IntervenableModel(cfg, hf)
            (inter,) = iv.interventions.values()
            inter = inter[0] if isinstance(inter, tuple | list) else inter
            inter.rotate_layer.weight = _rotation(basis)
            inter.set_interchange_dim(3)
            theirs = []
            for p in pairs:
                with torch.no_grad():
                    _, out = iv({"input_ids": p.corrupted_tokens[None]}, [{"input_ids": p.clean_tokens[None]}],
                                {"sources->base": ([[[p.clean_roles[role]]]], [[[p.corrupted_roles[role]]]])})
                theirs.append(out.logits[0, p.corrupted_answer_pos])
            theirs_t = torch.stack(theirs)
            with torch.no_grad():
                ours = _logits(fp, [_Site(fp, p, c, x, layer, role) for p, (c, x) in zip(pairs, caps, strict=True)],
                               basis)
            torch.testing.assert_close(ours.float(), theirs_t.float(), atol=1e-4, rtol=1e-4)
            with torch.no_grad():
                plain = torch.stack([hf(p.corrupted_tokens[None]).logits[0, p.corrupted_answer_pos] for p in pairs])
            assert float((theirs_t - plain).abs().max()) > 1e-2  # the intervention really changed the run
            tg = [int(p.counterfactual_answer) for p in pairs]
            alt = _alternatives(pairs, tg)
            margin = theirs_t.gather(1, torch.tensor(tg)[:, None])[:, 0] - theirs_t.gather(1, torch.tensor(alt)).amax(1)
            assert interchange_iia(tiny_model, pairs, layer, role, basis).tolist() == (margin > 0).tolist()
