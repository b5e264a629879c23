"""Run configs: pydantic models read from YAML, with `--set a.b=value` overrides.

Every choice of a run is a field with its default next to it; unknown keys are
refused, so a misspelt option fails loudly instead of being ignored.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from client.protocol import MAX_TOP_K, Split

C = TypeVar("C", bound=BaseModel)


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LlamaShape(Frozen):
    """The shape of a Llama built from scratch (trainer/models.py build_llama)."""

    hidden: int = 64  # width of the residual stream
    layers: int = 2  # decoder layers
    heads: int = 4  # attention heads
    kv_heads: int = 2  # key/value heads (grouped-query attention when fewer than heads)
    intermediate: int = 128  # width of each MLP
    max_positions: int = 2048  # the longest context the rotary embedding is set up for


class SFTConfig(Frozen):
    """Supervised fine-tuning (trainer/sft.py): response-only loss, warm-up and cosine."""

    epochs: float = 1.0  # passes over the examples (fractions allowed)
    batch_tokens: int = 4096  # padded tokens per optimizer step
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    warmup_steps: int = 20  # linear warm-up from 0 to lr
    weight_decay: float = 0.1  # AdamW's, on matrices only
    grad_clip: float = 1.0  # the gradient's global norm is clipped to this
    context_weight: float = 0.0  # > 0: also language-model the context tokens (see sft.py)
    # muon: Muon on the hidden layers' matrices, AdamW on embeddings and norms, one lr and
    # schedule (trainer/muon.py); docs/models.md compares the two on the tiny teacher.
    optimizer: Literal["adamw", "muon"] = "adamw"
    seed: int = 0  # the order of the examples


class DataConfig(Frozen):
    """What prepare gathers through the env service (train split only)."""

    expert_tasks: int = 1500  # expert episodes for the teacher
    recovery_tasks: int = 1500  # noisy episodes, each state labelled with the expert's action
    recovery_noise: float = 0.3  # chance per step of a deviation from the expert
    judge_tasks: int = 1500  # noisy episodes whose turns become judge examples
    judge_noise: float = 0.5  # the same for the judge's episodes
    near_miss: float = 0.5  # share of noisy steps that are near misses (trainer/data.py)
    # Half of the "go to" near misses go to another receptacle type, from those the
    # expert episodes' rooms hold (mostly one the room lacks: "Nothing happens.").
    near_miss_places: bool = False
    judge_holdout: float = 0.1  # share of judge examples kept out of training
    judge_turns_per_episode: int | None = None  # None: every turn; k: k label-balanced turns
    student_tasks: int = 40  # the student's warm start: the first N expert and N recovery episodes
    # DAgger after the teacher's SFT: each round the teacher plays dagger_tasks train tasks
    # (following itself with chance dagger_noise per step, else the expert), every state
    # is labelled with the expert's action, and the teacher is fine-tuned on them.
    dagger_rounds: int = 0
    dagger_tasks: int = 400  # per round, taken in turn from the expert and recovery tasks
    dagger_noise: float = 0.5  # chance per step that the teacher acts, not the expert
    # Then rounds in which the warm-started student plays instead (in charge with chance
    # student_dagger_noise per step), its states labelled by the expert, the teacher
    # fine-tuned on them: the teacher learns what to say in the states a weaker agent
    # reaches (its loops after its own wrong thoughts), where it supervises OPD.
    student_dagger_rounds: int = 0
    student_dagger_noise: float = 1.0
    seed: int = 0  # the noisy policies' choices

    @model_validator(mode="after")
    def _dagger_tasks_exist(self) -> DataConfig:
        rounds = self.dagger_rounds + self.student_dagger_rounds
        wanted = rounds * self.dagger_tasks
        if wanted > self.expert_tasks + self.recovery_tasks:
            raise ValueError(
                f"{rounds} DAgger rounds of {self.dagger_tasks} tasks need "
                f"{wanted} tasks, more than the {self.expert_tasks + self.recovery_tasks} "
                "expert and recovery tasks they are taken from"
            )
        return self


class PrepareConfig(Frozen):
    """`sage-opd prepare`: the tokenizer, the teacher and the student's warm start."""

    env: str = "household"  # the environment the data comes from (an env service name)
    history: int | None = 1  # turns of history in every prompt (None: the whole episode)
    show_admissible: bool = True  # list the admissible actions in every observation
    # The expert's responses think while searching ("Thought: apple not here"; see
    # trainer/data.py add_search_thoughts): the models learn to write it before acting.
    thoughts: bool = False
    # number: "apple 1 here" / "apple not here"; decision: "apple here" / "apple not
    # here", the number in the action only (the token after the name is the decision).
    thought_style: Literal["number", "decision"] = "number"
    max_turns: int = 30  # turns per episode, in the data and in prepare's evaluation
    vocab_size: int = 2048  # the fitted BPE tokenizer's
    tokenizer_tasks: int = 600  # train tasks whose text fits the tokenizer
    # The models' shapes, built from scratch, and the data they are trained on.
    teacher: LlamaShape = LlamaShape(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768)
    student: LlamaShape = LlamaShape(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=384)
    data: DataConfig = DataConfig()
    teacher_sft: SFTConfig = SFTConfig(epochs=2.0)  # agent turns plus judge examples
    # Each DAgger round: the round's examples plus as many of the teacher's first ones.
    dagger_sft: SFTConfig = SFTConfig(epochs=1.0, lr=1e-3, warmup_steps=50)
    student_sft: SFTConfig = SFTConfig(epochs=3.0, lr=2e-3)  # the student's warm start
    eval_tasks: int | None = None  # None: every task of each eval split
    seed: int = 0  # the models' initial weights (the student's is seed + 1)

    def digest(self) -> str:
        """A short hash of every field: the cache key of prepared artifacts."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys from "a.b=value" strings; values are read as YAML (3, 0.5, true, null)."""
    for override in overrides:
        if "=" not in override:
            raise ValueError(f"override {override!r} is not of the form key.path=value")
        path, raw = override.split("=", 1)
        keys = path.strip().split(".")
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {override!r}: {key!r} is not a section")
        node[keys[-1]] = yaml.safe_load(raw)
    return data


def load_config(model: type[C], path: str | Path | None, overrides: list[str] | None = None) -> C:
    """Read ``path`` (YAML; None: all defaults), apply overrides, validate as ``model``."""
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config is a mapping of fields")
        data = loaded or {}
    return model.model_validate(apply_overrides(data, overrides or []))


class LossConfig(Frozen):
    """docs/method.md's loss: standard OPD, or SAGE-OPD with each part switchable."""

    # opd: every switch below is ignored (all off). sft: the off-policy baseline, no
    # teacher service: the student imitates the won episodes of TrainConfig.sft_policy.
    kind: Literal["opd", "sage", "sft"] = "sage"
    intervention: bool = True  # i_t from the teacher's verdict (off: i_t = 1)
    confidence: bool = True  # c_t, the teacher's mean top-1 probability (off: c_t = 1)
    normalization: bool = True  # divide by sum s_t (off: by the number of tokens)
    alpha: float = Field(0.5, ge=0, le=1)  # i_t of a Weak turn
    force_strong_repeated: bool = False  # a repeated action with unchanged feedback is Strong
    ppo_clip: float = Field(0.2, gt=0)  # the sampled divergence's PPO clip (substeps > 1)
    substeps: int = Field(1, ge=1)  # optimizer steps per batch of rollouts
    # The per-token loss l_tj (trainer/losses.py). sampled: the paper's sampled-token
    # reverse KL, -sg(log pi_T(y) - log pi_S(y)) log pi_S(y). reverse_kl, forward_kl,
    # jsd: full-distribution divergences from the teacher's top_k log-probs plus a tail
    # bucket; forward_kl is SFT on the teacher's distribution in the student's states.
    divergence: Literal["sampled", "reverse_kl", "forward_kl", "jsd"] = "sampled"
    jsd_beta: float = Field(0.5, gt=0, lt=1)  # jsd: the mixture beta pi_T + (1 - beta) pi_S
    # Which tokens of each response carry the loss: all (the paper's dense OPD) or the
    # action line only (from "Action:" on; a thought before it stays in the context,
    # scored by the teacher but not trained). A response without an action line is
    # trained whole.
    tokens: Literal["all", "action"] = "all"
    # Teacher log-probs per token that the full divergences read (the service's limit).
    top_k: int = Field(MAX_TOP_K, ge=1, le=MAX_TOP_K)


class TrainConfig(Frozen):
    """`sage-opd train`: on-policy distillation of a student through the services."""

    student: str  # an HF id or a local folder (e.g. artifacts/prepare-.../student-init)
    # The services at their default ports; several teacher URLs are used round-robin,
    # one per episode.
    teacher_urls: list[str] = ["http://127.0.0.1:8200"]
    # Teachers per environment: a pattern (an environment name, or env/task type, with
    # shell wildcards: "household", "alfworld/pick_*", "*") to its teachers' URLs, used
    # round-robin. An episode goes to the first pattern that matches it; when this is
    # set, teacher_urls is not used.
    teachers: dict[str, list[str]] = {}
    # tokens when a teacher shares the student's vocabulary (it scores the student's
    # ids), else chunks (it scores its own tokens of the text, trainer/alignment.py);
    # chunks: always chunk-level, whatever the vocabularies.
    alignment: Literal["auto", "chunks"] = "auto"
    env_url: str = "http://127.0.0.1:8100"
    env: str = "household"  # the environment to train in (an env service name)
    # More environments of the same env service: each step draws its tasks from all of
    # them, and each is evaluated (metrics eval_<env>_<split>_*; env's are eval_<split>_*).
    envs: list[str] = []
    train_split: Split = "train"  # the tasks the episodes are drawn from
    history: int | None = None  # turns of history in every prompt (None: the whole episode)
    show_admissible: bool = True  # list the admissible actions in every observation
    max_turns: int = 30  # turns per episode, in training and evaluation
    # A training episode ends (lost) once this many turns in a row failed (no admissible
    # action, or "Nothing happens."); None: it plays on to max_turns. Evaluation always
    # plays to max_turns.
    end_after_failures: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0)  # the student's sampling temperature (0: greedy)
    max_new_tokens: int = 32  # the longest response
    episodes_per_step: int = Field(16, ge=1)  # one rollout per task, tasks drawn at random
    concurrency: int = 64  # episodes in flight
    steps: int = Field(20, ge=0)  # 0: only the evaluation of the student as it is
    lr: float = 1e-4  # AdamW's peak learning rate
    weight_decay: float = 0.1  # AdamW's, on matrices only
    grad_clip: float = 1.0  # the gradient's global norm is clipped to this
    warmup_steps: int = 0  # linear warm-up from 0 to lr
    min_lr_ratio: float = 1.0  # 1.0: a constant learning rate after warm-up
    eval_every: int = 0  # 0: evaluate only before the first and after the last step
    eval_at_start: bool = True  # false: no evaluation before the first step (a grid shares one)
    eval_splits: list[Split] = ["valid_seen", "valid_unseen"]  # greedy evaluation on these
    eval_tasks: int | None = None  # None: every task of each split
    # At each evaluation, the student's search decisions (trainer/diagnostics.py): how
    # often it says "not here" with the object in view or not, and the teacher's
    # log-probs at up to this many decisions of each kind per split (0: no diagnostics).
    diagnose_decisions: int = Field(64, ge=0)
    checkpoint_every: int = 10  # steps between checkpoints (0: only after the last step)
    keep_checkpoints: int = 2  # the newest this many are kept
    out_dir: str = "runs/default"  # metrics.jsonl, checkpoints/, TensorBoard events
    device: str = "auto"  # auto: CUDA when present, else CPU
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # the student's weights
    seed: int = 0  # the tasks of each step and each episode's sampling
    loss: LossConfig = LossConfig()  # OPD, SAGE-OPD (each part switchable) or off-policy SFT
    sft_policy: str | None = None  # loss.kind sft: the model that plays (e.g. the teacher)

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.loss.kind == "sft" and not self.sft_policy:
            raise ValueError("loss.kind sft needs sft_policy: the model whose episodes to imitate")
        if self.alignment == "chunks" and self.loss.divergence != "sampled":
            raise ValueError(
                f"loss.divergence {self.loss.divergence} needs the teacher's distribution over "
                "the student's vocabulary: chunk-level supervision takes divergence sampled"
            )
        if any(not urls for urls in self.teachers.values()):
            raise ValueError("each pattern of teachers needs at least one URL")
        if self.env in self.envs:
            raise ValueError(f"envs lists {self.env!r}, which env already names")
        return self

    def environments(self) -> list[str]:
        """Every environment the run trains in, env first."""
        return [self.env, *self.envs]

    def teacher_groups(self) -> dict[str, list[str]]:
        """Pattern -> teacher URLs: ``teachers``, or every episode to ``teacher_urls``."""
        return dict(self.teachers) if self.teachers else {"*": list(self.teacher_urls)}
