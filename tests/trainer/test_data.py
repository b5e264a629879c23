"""Training data gathered through a real env service: noise, near misses and labels."""

from __future__ import annotations

import asyncio
import random
import re

from client.env import EnvClient
from services.env.app import create_app as create_env_app
from services.env.settings import EnvSettings
from trainer.data import NOTHING_HAPPENS, gather, near_miss_action
from trainer.models import AgentSpec


def test_a_near_miss_changes_exactly_one_number() -> None:
    rng = random.Random(0)
    action = "take mug 2 from shelf 1"
    for _ in range(50):
        slip = near_miss_action(action, rng)
        assert slip is not None and slip != action
        assert re.sub(r"\d+", "#", slip) == re.sub(r"\d+", "#", action)
        pairs = zip(re.findall(r"\d+", action), re.findall(r"\d+", slip), strict=True)
        changed = [a != b for a, b in pairs]
        assert sum(changed) == 1
    assert near_miss_action("look", rng) is None
    assert near_miss_action(None, rng) is None
    # Without places a "go to" slip changes its number too.
    assert all(near_miss_action("go to desk 1", rng) != "go to desk 1" for _ in range(20))
    assert {near_miss_action("go to desk 1", rng)[:-1] for _ in range(50)} == {"go to desk "}


def test_given_places_half_the_go_near_misses_go_to_another_place() -> None:
    from trainer.data import Step, Trajectory, places_of

    rng = random.Random(0)
    places = ["desk", "dresser", "sofa"]
    slips = [near_miss_action("go to desk 1", rng, places) for _ in range(400)]
    elsewhere = [s for s in slips if not s.startswith("go to desk ")]
    assert set(elsewhere) == {"go to dresser 1", "go to sofa 1"}  # same number, other type
    assert 150 <= len(elsewhere) <= 250  # about half
    assert all(re.fullmatch(r"go to desk [2-5]", s) for s in slips if s not in elsewhere)
    # Other actions only change a number.
    assert near_miss_action("open drawer 1", rng, places).startswith("open drawer ")
    # The places are the receptacle types of the rooms' "go to" actions.
    step = Step("o", ["go to desk 1", "go to sofa 2", "go to sofa 1", "look"], "look", None, None)
    trajectory = Trajectory("train", 0, "task", "pick_and_place")
    trajectory.steps.append(step)
    assert places_of([trajectory]) == ["desk", "sofa"]


def _play(url: str, noise: float, near_miss: float) -> list:
    async def run() -> list:
        async with EnvClient(url) as env:
            return await gather(
                env,
                list(range(6)),
                noise,
                0,
                agent=AgentSpec(max_turns=8),
                progress=False,
                near_miss=near_miss,
            )

    return asyncio.run(run())


def test_noisy_play_deviates_by_near_misses_or_admissible_actions(serve) -> None:
    url = serve(create_env_app(EnvSettings()))
    slips = [s for t in _play(url, noise=1.0, near_miss=1.0) for s in t.steps]
    randoms = [s for t in _play(url, noise=1.0, near_miss=0.0) for s in t.steps]
    # Every step a near miss: the expert's action with one number changed...
    assert all(s.action != s.expert_action for s in slips)
    assert all(re.sub(r"\d+", "#", s.action) == re.sub(r"\d+", "#", s.expert_action) for s in slips)
    # ...that mostly does not apply, and the judge's label for that is Strong.
    failed = [s for s in slips if s.feedback == NOTHING_HAPPENS]
    assert len(failed) >= len(slips) // 2 and all(s.label == "Strong" for s in failed)
    # Without near misses every deviation is one of the admissible actions.
    assert all(s.action in s.admissible_actions for s in randoms)


def test_a_model_policy_drives_the_deviations_and_every_state_is_labelled(
    serve,
    tiny_model_dir,
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from client.prompts import ChatRenderer, parse_action
    from client.protocol import EpisodeTurn
    from services.env.household import HouseholdEnvironment
    from trainer.config import SFTConfig
    from trainer.data import ModelPolicy, agent_sequences, executed_turns, response_ids
    from trainer.rollout import BatchedGenerator
    from trainer.sft import Example, sft

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    renderer = ChatRenderer(tokenizer, show_admissible=False)
    # A model that always answers "look" (an action the expert never takes), with a
    # thought, also after turns of its own.
    said = "Thought: apple not here\nAction: look"
    look = response_ids(renderer, "look", "apple not here")
    assert tokenizer.decode(look, skip_special_tokens=True) == said
    family = HouseholdEnvironment()
    prompts = []
    for task_id in range(6):
        episode = family.make("train", task_id)
        observation, turns = episode.reset().observation, []
        for _ in range(4):
            prompts.append(renderer.prompt(episode.task.goal, turns, observation, [], None))
            feedback = episode.step("look").observation
            turns.append(EpisodeTurn(observation=observation, response_ids=look, feedback=feedback))
            observation = feedback
    examples = [Example.prompt_and_target(p, look) for p in prompts] * 4
    sft(
        model,
        examples,
        SFTConfig(epochs=4, lr=1e-2, batch_tokens=2048),
        tokenizer.pad_token_id,
        progress=False,
    )
    url = serve(create_env_app(EnvSettings()))

    class Recording:
        """The generator, keeping every prompt the policy sends it."""

        def __init__(self, inner: BatchedGenerator) -> None:
            self.inner, self.prompts = inner, []

        def episode(self, key: object):
            return self.inner.episode(key)

        async def generate(self, prompt: list[int], key: object):
            self.prompts.append(prompt)
            return await self.inner.generate(prompt, key=key)

    def play(noise: float) -> tuple[list, list[list[int]]]:
        async def run() -> tuple[list, list[list[int]]]:
            async with (
                EnvClient(url) as env,
                BatchedGenerator(model, tokenizer, temperature=0.0) as generator,
            ):
                recording = Recording(generator)
                policy = ModelPolicy(recording, renderer, None)  # type: ignore[arg-type]
                played = await gather(
                    env,
                    [0, 1, 2],
                    noise,
                    0,
                    agent=AgentSpec(max_turns=4),
                    progress=False,
                    policy=policy,
                )
                return played, recording.prompts

        return asyncio.run(run())

    own, asked = play(noise=1.0)
    steps = [s for t in own for s in t.steps]
    assert len(steps) == 12 and all(s.action == "look" != s.expert_action for s in steps)
    # Each step keeps what the model wrote (its action was done in every one).
    assert all(parse_action(s.said) == "look" for s in steps)
    assert sum(s.said == said for s in steps) >= 9
    # While it plays, the model reads its earlier turns as it wrote them (thought and
    # all), as in an evaluation; training renders them canonically (no thought here).
    thought_id = tokenizer.convert_tokens_to_ids("Thought")
    assert thought_id != tokenizer.unk_token_id
    written = [
        sum(
            tokenizer.encode(s.said, add_special_tokens=False).count(thought_id)
            for s in t.steps[:n]
        )
        for t in own
        for n in range(len(t.steps))
    ]
    before = min(p.count(thought_id) for p in asked)  # in the system prompt, if anywhere
    assert sorted(p.count(thought_id) - before for p in asked) == sorted(written)
    assert max(written) >= 3
    for trajectory in own:
        mine = executed_turns(renderer, trajectory, own_words=True)
        assert [tokenizer.decode(t.response_ids, skip_special_tokens=True) for t in mine] == [
            s.said for s in trajectory.steps
        ]
        canonical = executed_turns(renderer, trajectory)
        assert all(t.response_ids == response_ids(renderer, "look") for t in canonical)
    # With no noise the model is asked but the expert acts.
    assert all(
        s.action == s.expert_action and s.said is None for t in play(noise=0.0)[0] for s in t.steps
    )
    # No turn followed the expert, so the whole-episode sequences learn nothing; with
    # deviations each state is learnt: a branch after the context as lived, with the
    # expert's action.
    assert agent_sequences(renderer, own, None) == []
    labelled = agent_sequences(renderer, own, None, deviations=True)
    assert len(labelled) == len(own)
    for trajectory, example in zip(own, labelled, strict=True):
        lived = executed_turns(renderer, trajectory)
        assert len(example.branches) == len(trajectory.steps)
        for t, step in enumerate(trajectory.steps):
            context = renderer.prompt(trajectory.task, lived[:t], step.observation, [], None)
            target = response_ids(renderer, step.expert_action)
            view, learned = branch_view(example, t)
            assert view == context + target and learned == target
    assert sum(len(e.spans) for e in labelled) == len(steps)  # nothing else is learnt


def branch_view(example, b: int) -> tuple[list[int], list[int]]:
    """Branch b as the sequence it stands for, and the tokens of it that are learnt."""
    visible, start, end = example.branches[b]
    ids = example.input_ids
    learned = [ids[p] for s, e in example.spans for p in range(s, e) if start <= p < end]
    return ids[:visible] + ids[start:end], learned


def _noisy_episodes(serve, tiny_model_dir) -> tuple:
    """A renderer for the tiny model, and six half-noisy episodes played on a real env service."""
    from transformers import AutoTokenizer

    from client.prompts import ChatRenderer

    renderer = ChatRenderer(AutoTokenizer.from_pretrained(tiny_model_dir), show_admissible=False)
    return renderer, _play(serve(create_env_app(EnvSettings())), noise=0.5, near_miss=0.5)


def test_slips_stay_in_the_context_but_are_not_language_modelled(
    serve,
    tiny_model_dir,
) -> None:
    from trainer.data import agent_sequences, judge_sequences, response_ids

    renderer, trajectories = _noisy_episodes(serve, tiny_model_dir)
    slips = [
        [response_ids(renderer, s.action) for s in t.steps if s.action != s.expert_action]
        for t in trajectories
    ]
    assert any(slips)

    def quiet(example) -> list[list[int]]:
        return [example.input_ids[start:end] for start, end in example.quiet]

    # An agent sequence keeps every turn in its context; the slips are quiet.
    followed = [
        i for i, t in enumerate(trajectories) if any(s.action == s.expert_action for s in t.steps)
    ]
    agent = agent_sequences(renderer, trajectories, None)
    assert [quiet(e) for e in agent] == [slips[i] for i in followed]
    # A judge sequence ends at its last question: the slips up to there are quiet.
    judged = judge_sequences(renderer, trajectories, per_episode=3, seed=4)
    assert all(quiet(e) == slips[i][: len(quiet(e))] for i, e in enumerate(judged))
    assert sum(len(quiet(e)) for e in judged) > 0


def test_judge_sequences_hold_judge_examples_as_branches_of_one_episode(
    serve,
    tiny_model_dir,
) -> None:
    from trainer.data import judge_examples, judge_sequences

    renderer, trajectories = _noisy_episodes(serve, tiny_model_dir)
    separate = judge_examples(renderer, trajectories, None, per_episode=3, seed=4)
    shared = judge_sequences(renderer, trajectories, per_episode=3, seed=4)
    assert len(shared) == len(trajectories) and len(separate) > len(trajectories)
    views = [branch_view(example, b) for example in shared for b in range(len(example.branches))]
    assert views == [(prompt + label, label) for prompt, label, _ in separate]
    # Each episode is forwarded once: fewer tokens than the questions asked one by one.
    assert sum(len(e.input_ids) for e in shared) < sum(len(p) + 1 for p, _, _ in separate)


def test_search_thoughts_say_whether_the_sought_object_is_in_view(
    serve,
    tiny_model_dir,
) -> None:
    from transformers import AutoTokenizer

    from client.prompts import ChatRenderer, parse_action
    from trainer.data import executed_turns

    url = serve(create_env_app(EnvSettings()))

    async def run() -> list:
        async with EnvClient(url) as env:
            return await gather(
                env,
                list(range(12)),
                0.3,
                0,
                agent=AgentSpec(max_turns=30, thoughts=True),
                progress=False,
                near_miss=0.5,
            )

    trajectories = asyncio.run(run())
    finds = re.compile(r"(take|use) ")
    here = absent = after_failure = 0
    for trajectory in trajectories:
        last_find = max(
            (t for t, s in enumerate(trajectory.steps) if finds.match(s.expert_action or "")),
            default=-1,
        )
        in_view = None  # the contents seen last: "Nothing happens." leaves them in view
        for t, step in enumerate(trajectory.steps):
            if step.observation != NOTHING_HAPPENS:
                in_view = (
                    step.observation.split("you see", 1)[1]
                    if "you see" in step.observation
                    else None
                )
            if step.thought is None:
                continue
            assert t <= last_find and in_view is not None  # searching, contents in view
            after_failure += step.observation == NOTHING_HAPPENS
            if step.thought.endswith(" not here"):
                # "apple not here": no apple in view, and the expert walks on.
                sought = step.thought.removesuffix(" not here")
                assert not re.search(rf"\b{sought} \d", in_view)
                assert not finds.match(step.expert_action)
                absent += 1
            else:
                # "apple 1 here": in view, and the expert takes (or uses) exactly it, now.
                found = step.thought.removesuffix(" here")
                assert re.search(rf"\b{found}\b", in_view)
                assert re.match(rf"(take {found} from |use {found}$)", step.expert_action)
                here += 1
    assert here >= 6 and absent >= 6 and after_failure >= 1
    # Rendered before the action. A slip carries the thought its own action implies.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    renderer = ChatRenderer(tokenizer)
    thought_turns = slip_takes = slip_walks = 0
    for trajectory in trajectories:
        turns = executed_turns(renderer, trajectory)
        for step, turn in zip(trajectory.steps, turns, strict=True):
            text = tokenizer.decode(turn.response_ids, skip_special_tokens=True)
            assert parse_action(text) == step.action
            thought = re.match(r"Thought: (.*)\n", text)
            assert (thought is not None) <= (step.thought is not None)
            if step.action == step.expert_action:
                assert (thought and thought[1]) == step.thought
                thought_turns += thought is not None
            elif thought is not None:
                sought = re.match(r"(.+?) (\d+|not) here$", step.thought)[1]
                took = re.match(rf"(?:take ({sought} \d+) from |use ({sought} \d+)$)", step.action)
                if took:  # "take apple 2 from desk 1" thinks "apple 2 here"
                    assert thought[1] == f"{took[1] or took[2]} here"
                    slip_takes += 1
                else:  # walking on thinks it is not here
                    assert thought[1] == f"{sought} not here"
                    slip_walks += 1
    assert thought_turns >= 12 and slip_takes >= 1 and slip_walks >= 1


def test_decision_style_thoughts_leave_the_number_to_the_action(tiny_model_dir) -> None:
    from transformers import AutoTokenizer

    from client.prompts import ChatRenderer
    from trainer.data import Step, Trajectory, add_search_thoughts, executed_turns

    counter = "You arrive at countertop 1. On the countertop 1, you see a apple 1, and a mug 2."
    take = "take apple 1 from countertop 1"

    def trajectory() -> Trajectory:
        steps = [
            Step("You are in the middle of a room.", [], "go to cabinet 1", "go to cabinet 1", 3),
            Step("On the cabinet 1, you see a mug 3.", [], "go to countertop 1", None, 2),
            Step(counter, [], "take apple 2 from countertop 1", take, 1),  # a slip: wrong number
            Step(NOTHING_HAPPENS, [], take, take, 1),
        ]
        steps[1].expert_action = "go to countertop 1"
        trajectory = Trajectory("train", 0, "put some apple on table.", "pick_and_place")
        trajectory.steps.extend(steps)
        return trajectory

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    renderer = ChatRenderer(tokenizer)

    def thoughts(style: str) -> tuple[list, list]:
        played = trajectory()
        add_search_thoughts([played], style)  # type: ignore[arg-type]
        said = [
            tokenizer.decode(turn.response_ids, skip_special_tokens=True).split("\n")[0]
            for turn in executed_turns(renderer, played)
        ]
        return [s.thought for s in played.steps], said

    expert, said = thoughts("decision")
    assert expert == [None, "apple not here", "apple here", "apple here"]
    # The slip took apple 2, so it thought the apple was here; the number is the action's.
    assert said[2:] == ["Thought: apple here", "Thought: apple here"]
    expert, said = thoughts("number")
    assert expert == [None, "apple not here", "apple 1 here", "apple 1 here"]
    assert said[2:] == ["Thought: apple 2 here", "Thought: apple 1 here"]
