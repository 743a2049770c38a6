"""What a model does: generate text, or embed it (vLLM's pooling runner, ``/v1/embeddings``).

Decided from the checkpoint's architecture as vLLM's own registry names them: a ``...Model``
without a language-model head (``LlamaModel``, ``Qwen2Model``, ``BertModel``) is an embedding
model, and so is a sentence-transformers directory (``modules.json``). vLLM 0.32 does not infer
it by itself — it served a ``LlamaModel`` checkpoint as a generator ("Supported tasks:
['generate']") — so Berth passes ``--runner pooling`` for these::

    model_task("LlamaModel")          # "embed"
    model_task("LlamaForCausalLM")    # "generate"
"""

from __future__ import annotations

from collections.abc import Iterable

GENERATE, EMBED = "generate", "embed"
# Heads that make a generator, whatever comes before them.
GENERATIVE_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
# Embedding architectures of vLLM's registry that do not end in "Model" alone, or do but are
# not base models of a generator.
EMBEDDING_ARCHITECTURES = frozenset(
    {"BgeM3EmbeddingModel", "GteNewModel", "JinaEmbeddingsV5Model", "EmbeddingGemma2Model"}
)
SENTENCE_TRANSFORMERS_FILE = "modules.json"


def model_task(architecture: str | None, files: Iterable[str] = ()) -> str:
    """``embed`` or ``generate`` for a checkpoint's first architecture and its file names."""
    if SENTENCE_TRANSFORMERS_FILE in set(files):
        return EMBED
    if not architecture or architecture.endswith(GENERATIVE_SUFFIXES):
        return GENERATE
    if architecture in EMBEDDING_ARCHITECTURES or architecture.endswith("Model"):
        return EMBED
    return GENERATE
