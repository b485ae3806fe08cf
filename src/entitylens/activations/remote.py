"""Activation capture through TransformerLens's vLLM driver (``RemoteBridge.boot_vllm``).

``CacheConfig(engine="vllm")`` / ``entitylens cache --engine vllm``. Everything that decides *what* is cached
stays entitylens's: the prompts, their token ids (the model's own BOS rule), the role positions, the hook
names, the storage dtype and the shard layout, all computed with the local bridge exactly as for the native
engine. vLLM only runs the forward passes: each batch goes to the driver as ragged token-id lists (no
padding: vLLM treats a pad token as content), and the driver's per-request captures come back right-padded,
so every row's role positions are read unshifted.

The driver captures the block outputs (``resid_post``) and the attention and MLP outputs (``attn_out``,
``mlp_out``) of every layer; vLLM passes the residual stream fused between layers, so ``resid_pre`` /
``resid_mid`` never exist there (``resid_pre`` of layer ``l`` is ``resid_post`` of layer ``l - 1``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from entitylens.activations.hooks import HookSpec
from entitylens.activations.runner import gather_hooks, stack_layers
from entitylens.errors import EntitylensError
from entitylens.models.vllm_support import VLLMOptions, engine_defaults, require_vllm

__all__ = ["REMOTE_HOOKS", "RemoteCapture", "boot_remote", "check_hook_keys", "silence_engine_bars"]

REMOTE_HOOKS: tuple[str, ...] = ("resid_post", "attn_out", "mlp_out")
"""Hook aliases TransformerLens's vLLM driver captures (every layer)."""

_REMOTE_NAMES = {"resid_post": "blocks.{layer}.hook_resid_post", "attn_out": "blocks.{layer}.hook_attn_out",
                 "mlp_out": "blocks.{layer}.hook_mlp_out"}


def boot_remote(location: str, dtype: torch.dtype, options: VLLMOptions | None = None) -> Any:
    """Start vLLM on the weights at ``location`` behind TransformerLens's ``RemoteBridge``.

    Args:
        location: A Hugging Face model directory or hub id (:func:`entitylens.models.weights_location`).
        dtype: Weight dtype (match the bridge's: a cache compares the two models' fingerprints).
        options: Placement and memory (:class:`~entitylens.models.vllm_support.VLLMOptions`).

    Returns:
        The ``RemoteBridge`` (batched captures on).

    Raises:
        EntitylensError: vLLM is not installed (what to install), or it could not start.
    """
    require_vllm()
    from transformer_lens.model_bridge.remote_bridge import RemoteBridge

    opts = options or VLLMOptions()
    util, eager = engine_defaults(opts)
    kwargs: dict[str, Any] = {"dtype": dtype, "gpu_memory_utilization": util, "enforce_eager": eager,
                              "enable_batching": True, "tensor_parallel_size": opts.tensor_parallel_size}
    if opts.max_model_len is not None:
        kwargs["max_model_len"] = int(opts.max_model_len)
    try:
        bridge = RemoteBridge.boot_vllm(location, **kwargs)
    except (ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EntitylensError(f"vLLM could not start {location}: {first}; check --tensor-parallel-size and "
                              "--gpu-memory-utilization") from None
    silence_engine_bars(bridge)
    return bridge


def silence_engine_bars(bridge: Any) -> None:
    """Turn off vLLM's own "Processed prompts" bar, which its ``LLM.generate`` draws for every batch.

    TransformerLens's driver calls ``generate`` without ``use_tqdm``; the cache draws one bar of its own
    (quiet with ``--quiet`` or off a terminal), so the engine's per-batch bars are only noise. Bridges without
    the driver's ``_driver._llm`` (another TransformerLens version) are left as they are.
    """
    llm = getattr(getattr(bridge, "_driver", None), "_llm", None)
    generate = getattr(llm, "generate", None)
    if generate is not None and not isinstance(generate, functools.partial):
        llm.generate = functools.partial(generate, use_tqdm=False)  # type: ignore[union-attr]


def check_hook_keys(keys: Sequence[str]) -> None:
    """Raise a one-line error for the first hook key the vLLM driver does not capture."""
    bad = [k for k in keys if k not in REMOTE_HOOKS]
    if bad:
        raise EntitylensError(f"--engine vllm captures {', '.join(REMOTE_HOOKS)}, not {bad[0]!r} (TransformerLens's "
                              "vLLM driver; resid_pre of layer l is resid_post of layer l - 1)")


class RemoteCapture:
    """Runs cache batches on a ``RemoteBridge``; a drop-in for :func:`~entitylens.activations.runner.run_batch`.

    Args:
        remote: The ``RemoteBridge`` (from :func:`boot_remote`).
    """

    def __init__(self, remote: Any) -> None:
        self.remote = remote

    @staticmethod
    def check(specs: Sequence[HookSpec]) -> None:
        """Refuse, in one line, a hook the driver cannot capture (before anything runs)."""
        check_hook_keys([s.key for s in specs])
        for s in specs:
            if list(s.names) != [_REMOTE_NAMES[s.key].format(layer=la) for la in s.layers]:
                check_hook_keys([str(list(s.names)[0])])

    def __call__(self, specs: Sequence[HookSpec], ids: Sequence[np.ndarray], positions: np.ndarray,
                 storage_dtype: torch.dtype) -> dict[str, Tensor]:
        """One batch: ``key -> [layer, batch, role, *feature]`` on the CPU, as ``run_batch`` returns it.

        Args:
            specs: The resolved hooks (checked by :meth:`check`).
            ids: Token ids of each prompt (sent unpadded).
            positions: ``[batch, roles]`` role token indices (``-1`` = missing: the last token is read, and the
                cache stores NaN there).
            storage_dtype: Dtype the gathered values are stored in.
        """
        lengths = torch.tensor([len(x) for x in ids])
        pos = torch.from_numpy(np.asarray(positions)).long()
        pos = torch.where(pos >= 0, pos, (lengths - 1)[:, None].expand_as(pos))
        gathered: dict[tuple[int, int], Tensor] = {}
        hooks = gather_hooks(specs, pos, int(lengths.max()), storage_dtype, False, gathered)
        with torch.no_grad():
            self.remote.run_with_hooks([np.asarray(x).tolist() for x in ids], fwd_hooks=hooks, return_type=None)
        return stack_layers(specs, gathered)
