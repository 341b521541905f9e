"""Random-weight tiny causal LMs built in code (no download), one per supported architecture.

Every model has hidden size 64, 4 query heads, 2 KV heads (GQA), head_dim 16, vocab 128, float32, ``sdpa``
attention, eval mode. Architecture-specific features the KV tooling must handle are switched on on purpose:

* ``llama``: plain full attention.
* ``mistral``: sliding window of 8 in every layer (the cache keeps only the last 7 tokens).
* ``qwen2``: q/k/v projections with bias (Qwen2's default).
* ``gemma3``: 4 layers mixing sliding (window 8) and full attention, a different RoPE theta per layer type
  (sliding 1e4, full 1e6), and ``k_norm`` before RoPE with randomised (non-identity) norm weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

ARCHS = ("llama", "mistral", "qwen2", "gemma3")

HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
VOCAB = 128
SLIDING_WINDOW = 8
SLIDING_THETA = 10_000.0
FULL_THETA = 1_000_000.0
#: Std of the random weights: larger than the 0.02 default so attention is far from uniform and K/V
#: perturbations visibly move the logits.
INIT_STD = 0.15

#: Layer types of the tiny Gemma3 (two sliding, one full, one sliding ... as configured below).
GEMMA3_LAYER_TYPES = ("sliding_attention", "full_attention", "sliding_attention", "full_attention")

#: Expected number of layers and per-layer types of each tiny model.
EXPECTED_LAYER_TYPES: dict[str, tuple[str, ...]] = {
    "llama": ("full_attention",) * 2,
    "mistral": ("sliding_attention",) * 2,
    "qwen2": ("full_attention",) * 2,
    "gemma3": GEMMA3_LAYER_TYPES,
}

#: Sliding window the tiny model's sliding layers use (``None``: no sliding layer).
EXPECTED_SLIDING_WINDOW: dict[str, int | None] = {
    "llama": None,
    "mistral": SLIDING_WINDOW,
    "qwen2": None,
    "gemma3": SLIDING_WINDOW,
}


def _common() -> dict[str, Any]:
    return dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        initializer_range=INIT_STD,
        attn_implementation="sdpa",
    )


def tiny_config(arch: str) -> Any:
    """The transformers config of the tiny model of ``arch``."""
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(num_hidden_layers=2, **_common())
    if arch == "mistral":
        from transformers import MistralConfig

        return MistralConfig(num_hidden_layers=2, sliding_window=SLIDING_WINDOW, **_common())
    if arch == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(num_hidden_layers=2, **_common())
    if arch == "gemma3":
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(
            num_hidden_layers=len(GEMMA3_LAYER_TYPES),
            layer_types=list(GEMMA3_LAYER_TYPES),
            sliding_window=SLIDING_WINDOW,
            query_pre_attn_scalar=HEAD_DIM,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": SLIDING_THETA},
                "full_attention": {"rope_type": "default", "rope_theta": FULL_THETA},
            },
            **_common(),
        )
    raise ValueError(f"unknown tiny arch {arch!r}; choose from {ARCHS}")


def _model_class(arch: str) -> Any:
    import transformers

    return {
        "llama": transformers.LlamaForCausalLM,
        "mistral": transformers.MistralForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
        "gemma3": transformers.Gemma3ForCausalLM,
    }[arch]


@torch.no_grad()
def tiny_model(arch: str, seed: int = 0) -> Any:
    """A random-weight tiny causal LM of ``arch`` (float32, eval mode, ``sdpa``), deterministic in ``seed``."""
    cfg = tiny_config(arch)
    torch.manual_seed(seed)
    model = _model_class(arch)(cfg).to(torch.float32).eval()
    if arch == "gemma3":
        # Gemma3's RMSNorm scales by (1 + weight) with weight initialised to 0: randomise so k_norm (and the
        # other norms) are not the identity scaling.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    if arch == "qwen2":
        # Biases are zero-initialised: make them non-trivial so the test sees them.
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):
                p.normal_(0.0, 0.5)
    return model


def save_model_folder(folder: Path, text_file: Path, head_dim: int | None = None, bos: bool = False) -> Path:
    """Save the tiny Llama (optionally with another ``head_dim``) with a 128-token BPE tokenizer trained on
    ``text_file`` into ``folder``: a real, loadable model folder for CLI tests. With ``bos``, the tokenizer puts a
    BOS ``<s>`` before every text it tokenizes with special tokens (a ``"<s> $A"`` post-processor, as Llama 3's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["[UNK]", "<s>"] if bos else ["[UNK]"]
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train([str(text_file)], trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials, limit_alphabet=90))
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>").save_pretrained(folder)
    else:
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    if head_dim is None:
        tiny_model("llama").save_pretrained(folder)
    else:
        cfg = tiny_config("llama")
        cfg.head_dim = head_dim
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).to(torch.float32).eval().save_pretrained(folder)
    return folder


class TinyLM:
    """The parts of a :class:`~kvtool.models.LoadedModel` the codec uses, around a tiny model (``tiny``: a
    conftest ``Tiny``): the model, its architecture, a fingerprint, and a one-word tokenizer."""

    def __init__(self, tiny: Any, weights: str = "1"):
        self.model, self.arch = tiny.model, tiny.info
        self.fingerprint = {"id": f"tiny-{tiny.arch}", "config_digest": tiny.info.digest(),
                            "weights_digest": "sha256:" + weights * 64}  # fmt: skip
        self.tokenizer = _OneWordTokenizer()


class _OneWordTokenizer:
    def get_vocab(self) -> dict[str, int]:
        return {"a": 0}
