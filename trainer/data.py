"""Training data gathered through the env service: expert, recovery and judge examples.

A (possibly noisy) policy plays train tasks; at every state the env service's
expert says what it would do and how many steps it still needs. That gives:
- expert trajectories (no noise): what the agent should do;
- recovery data: states a noisy policy reached, each labelled with the expert's
  action from there (the agent learns to get back on track); the noise is random
  admissible actions and near misses (the expert's action with a wrong number),
  or a model's own actions (DAgger: the model learns to recover from the
  mistakes it makes itself, such as taking an object that is not there);
- judge examples: each executed action with the environment's feedback, labelled
  Skip when it brought the goal closer (the expert's remaining steps fell),
  Weak when it was admissible but changed nothing, Strong when it failed, was
  not admissible, or set the agent back (the remaining steps grew).
"""

from __future__ import annotations

import contextlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from client.env import EnvClient
from client.household import CONTENTS, FOUND, GO, NOTHING_HAPPENS, THOUGHT, ThoughtStyle
from client.prompts import ChatRenderer, History, agent_response, label_word, parse_action
from client.protocol import EpisodeTurn, ExpertAction, Label, SessionCreated, StepResult
from trainer.episodes import Task, play_episode, play_many
from trainer.models import DEFAULT_AGENT, AgentSpec
from trainer.sft import Example

if TYPE_CHECKING:
    from trainer.rollout import BatchedGenerator


@dataclass
class Step:
    observation: str
    admissible_actions: list[str]
    action: str  # what was executed
    expert_action: str | None  # what the expert would have done here
    steps_left: int | None  # the expert's remaining steps before the action
    feedback: str = ""
    steps_left_after: int | None = None
    thought: str | None = None  # the expert's thought before its action (add_search_thoughts)
    said: str | None = None  # a model's whole response, where its action was executed

    @property
    def label(self) -> Label:
        """The judge's label for the executed action (see the module docstring)."""
        if self.action not in self.admissible_actions or self.feedback == NOTHING_HAPPENS:
            return "Strong"
        before, after = self.steps_left, self.steps_left_after
        if before is None or after is None:
            return "Skip" if self.action == self.expert_action else "Weak"
        if after < before:
            return "Skip"
        return "Weak" if after == before else "Strong"


@dataclass
class Trajectory:
    split: str
    task_id: int
    task: str
    task_type: str
    steps: list[Step] = field(default_factory=list)
    won: bool = False
    # How its search thoughts name a find (add_search_thoughts): "number" ("apple 1
    # here") or "decision" ("apple here", the number only in the action).
    thought_style: ThoughtStyle = "number"


async def play_with_expert(
    env: EnvClient,
    split: str,
    task_id: int,
    noise: float,
    seed: int,
    agent: AgentSpec = DEFAULT_AGENT,
    near_miss: float = 0.0,
    policy: ModelPolicy | None = None,
    places: Sequence[str] = (),
) -> Trajectory:
    """Follow the expert, deviating with probability ``noise``.

    A deviation is the ``policy`` model's action when one is given, else, with
    probability ``near_miss``, the expert's action with one number changed, or a
    "go to" with another of ``places`` (see :func:`near_miss_action`), else a random
    admissible action. The model is asked
    every turn (its batches then hold every episode in flight) and sees the episode
    as lived: its own turns as it wrote them (``Step.said``), as in an evaluation,
    the expert's as in training.
    """
    deviating = DeviatingExpert(
        split,
        task_id,
        noise,
        random.Random(f"{seed}:{split}:{task_id}:{noise}"),
        near_miss,
        policy,
        places,
    )
    in_flight = policy.generator.episode(deviating.key) if policy else contextlib.nullcontext()
    async with in_flight:
        task = Task(agent.env, split, task_id, agent.max_turns)  # type: ignore[arg-type]
        last = await play_episode(env, task, deviating)
    assert deviating.trajectory is not None
    deviating.trajectory.won = last.won
    return deviating.trajectory


@dataclass
class DeviatingExpert:
    """The expert's action, or with probability ``noise`` a slip (play_with_expert);
    it keeps the trajectory with the expert's advice and remaining steps at each state."""

    split: str
    task_id: int
    noise: float
    rng: random.Random
    near_miss: float
    policy: ModelPolicy | None
    places: Sequence[str]
    key: object = field(default_factory=object)  # the episode in the model's batches
    trajectory: Trajectory | None = None
    env: EnvClient | None = None
    session_id: str = ""
    advice: ExpertAction | None = None
    step: Step | None = None

    async def begin(self, env: EnvClient, session: SessionCreated) -> None:
        task = session.task
        self.env, self.session_id = env, session.session_id
        self.trajectory = Trajectory(self.split, self.task_id, task.goal, task.task_type)
        self.advice = await env.expert(session.session_id, steps_left=True)

    async def act(self, state: StepResult) -> str | None:
        assert self.trajectory is not None and self.advice is not None
        action = expert = self.advice.action
        own = said = None
        if self.policy is not None:
            own, said = await self.policy.act(
                self.trajectory, state.observation, state.admissible_actions, self.key
            )
        if action is None or self.rng.random() < self.noise:
            slip = None
            if own is not None:
                slip = own or None  # an unreadable response: a random action instead
            elif self.near_miss > 0 and self.rng.random() < self.near_miss:
                slip = near_miss_action(action, self.rng, self.places)
            action = slip or self.rng.choice(state.admissible_actions)
        self.step = Step(
            observation=state.observation,
            admissible_actions=state.admissible_actions,
            action=action,
            expert_action=expert,
            steps_left=self.advice.steps_left,
            said=said if own and action == own else None,
        )
        return action

    async def after(self, action: str, result: StepResult) -> bool:
        assert self.env is not None and self.trajectory is not None and self.step is not None
        self.advice = await self.env.expert(self.session_id, steps_left=True)
        self.step.feedback = result.observation
        self.step.steps_left_after = 0 if result.won else self.advice.steps_left
        self.trajectory.steps.append(self.step)
        return False


@dataclass(frozen=True)
class ModelPolicy:
    """A model playing as the agent would: its prompt rendered from the episode so far."""

    generator: BatchedGenerator
    renderer: ChatRenderer
    history: History

    async def act(
        self, trajectory: Trajectory, observation: str, admissible: list[str], key: object
    ) -> tuple[str, str]:
        """The model's action here ("" when its response names none) and its whole response."""
        turns = executed_turns(self.renderer, trajectory, own_words=True)
        prompt = self.renderer.prompt(trajectory.task, turns, observation, admissible, self.history)
        sample = await self.generator.generate(prompt, key=key)
        text = self.renderer.tokenizer.decode(sample.token_ids, skip_special_tokens=True)
        return parse_action(text) or "", text


def places_of(trajectories: list[Trajectory]) -> list[str]:
    """The receptacle types the trajectories' "go to" actions name, sorted."""
    return sorted(
        {
            go["place"]
            for trajectory in trajectories
            for step in trajectory.steps
            for action in step.admissible_actions
            if (go := GO.match(action))
        }
    )


def near_miss_action(
    action: str | None, rng: random.Random, places: Sequence[str] = ()
) -> str | None:
    """``action`` with one of its numbers changed ("take mug 2 from shelf 1" -> "... shelf 3").

    The slip a half-trained agent makes: it names the right thing with the wrong
    instance, which mostly is not there ("Nothing happens."). Data with such slips
    teaches the teacher to recover from them and the judge to call them Strong.
    Given ``places`` (receptacle types), half of the "go to" slips go to another type
    instead ("go to desk 1" -> "go to dresser 1"), mostly one this room lacks: the
    slip of an agent that recalls a room it has seen before. None when ``action``
    has no number.
    """
    go = GO.match(action or "")
    if go and len(places) > 1 and rng.random() < 0.5:
        return f"go to {rng.choice([p for p in places if p != go['place']])} {go['n']}"
    numbers = list(re.finditer(r"\d+", action or ""))
    if action is None or not numbers:
        return None
    match = rng.choice(numbers)
    other = rng.choice([n for n in range(1, 6) if n != int(match.group())])
    return f"{action[: match.start()]}{other}{action[match.end() :]}"


async def gather(
    env: EnvClient,
    task_ids: list[int],
    noise: float,
    seed: int,
    split: str = "train",
    agent: AgentSpec = DEFAULT_AGENT,
    concurrency: int = 32,
    desc: str = "episodes",
    progress: bool = True,
    near_miss: float = 0.0,
    policy: ModelPolicy | None = None,
    places: Sequence[str] = (),
) -> list[Trajectory]:
    """Play ``task_ids`` (see play_with_expert) in ``agent``'s environment, within its
    turns; an agent that thinks gets add_search_thoughts in its style."""
    trajectories = await play_many(
        lambda t: play_with_expert(env, split, t, noise, seed, agent, near_miss, policy, places),
        task_ids,
        concurrency,
        desc,
        progress,
    )
    if agent.thoughts:
        add_search_thoughts(trajectories, agent.thought_style)
    return trajectories


def response_ids(renderer: ChatRenderer, action: str, thought: str | None = None) -> list[int]:
    """The ids of the canonical response naming ``action``, closed by the end-of-turn token."""
    return text_ids(renderer, agent_response(action, thought))


def text_ids(renderer: ChatRenderer, text: str) -> list[int]:
    """The ids of a response ``text``, closed by the end-of-turn token."""
    return renderer.tokenizer.encode(text, add_special_tokens=False) + [renderer.eos_id]


def expert_response(renderer: ChatRenderer, step: Step) -> list[int]:
    """The ids of the response the agent should have given at ``step``."""
    assert step.expert_action is not None
    return response_ids(renderer, step.expert_action, step.thought)


def views_in(observations: Sequence[str]) -> list[str | None]:
    """The receptacle contents in view at each step (None: none), given each step's
    observation: the newest ones listed, still in view after "Nothing happens."."""
    views, view = [], None
    for observation in observations:
        if observation != NOTHING_HAPPENS:
            contents = CONTENTS.search(observation)
            view = contents.group(1) if contents is not None else None
        views.append(view)
    return views


def find_thought(sought: str, number: str, style: ThoughtStyle) -> str:
    """The thought of a find: "apple 1 here" (style number) or "apple here" (decision)."""
    return f"{sought} {number} here" if style == "number" else f"{sought} here"


def add_search_thoughts(trajectories: list[Trajectory], style: ThoughtStyle = "number") -> None:
    """Give the expert's responses a thought wherever it searches: is the object here?

    At each step whose observation shows a receptacle's contents while the expert
    still looks for an object (its next "take" or "use" names it), the expert's
    response starts "Thought: apple 1 here" when it takes it now, else "Thought:
    apple not here" (``style`` decision: "apple here", the number named by the
    action alone, so the token after the name is the decision itself, " here" or
    " not", and a wrong number is no alternative to it). Written before the action,
    the thought names the sought object next to the contents it is checked against,
    so a small model decides take-or-go by matching one name in view instead of
    recalling the task's. After "Nothing happens." the contents seen last are still
    in view, and the thought checks them again (the step after a failed take asks
    afresh whether the object is there). Steps whose contents show the object without the expert
    taking it (it holds another) get none. Thoughts are known once an episode is
    over (from the expert's later finds); a model playing DAgger episodes reads its
    own turns as it wrote them instead (``Step.said``).
    """
    for trajectory in trajectories:
        trajectory.thought_style = style
        views = views_in([step.observation for step in trajectory.steps])
        sought = None  # the object of the expert's next find
        for step, view in zip(reversed(trajectory.steps), reversed(views), strict=True):
            found = FOUND.match(step.expert_action or "")
            if found:
                sought = found["take"] or found["use"]
            step.thought = None
            if view is None or sought is None:
                continue
            if found:
                step.thought = find_thought(sought, found["n"] or found["m"], style)
            elif not re.search(rf"\b{re.escape(sought)} \d+", view):
                step.thought = f"{sought} not here"


def slip_thought(step: Step, style: ThoughtStyle = "number") -> str | None:
    """The thought that a slip's own action implies where the expert had one.

    An agent that takes the wrong thing first thinks it is there ("apple 2 here"),
    and one that walks on thinks it is not: a slip rendered with that thought is
    the context a model meets after its own mistakes. None where the expert had no
    thought, or for a take of anything but the sought object.
    """
    thought = THOUGHT.match(step.thought or "")
    if thought is None:
        return None
    sought = thought["sought"]
    found = FOUND.match(step.action or "")
    if found is None:
        return f"{sought} not here"
    if (found["take"] or found["use"]) != sought:
        return None
    return find_thought(sought, found["n"] or found["m"], style)


def executed_turns(
    renderer: ChatRenderer, trajectory: Trajectory, own_words: bool = False
) -> list[EpisodeTurn]:
    """The trajectory as the agent lived it: the executed actions as its responses.

    A response is the canonical one for its action, with the expert's thought where
    the action was the expert's and a slip's own (slip_thought) elsewhere: what
    training learns and reads. ``own_words``: a model's turns are what it wrote
    (``Step.said``), as the model itself saw them while it played.
    """
    return [
        EpisodeTurn(
            observation=s.observation,
            admissible_actions=s.admissible_actions,
            response_ids=(
                text_ids(renderer, s.said)
                if own_words and s.said is not None
                else response_ids(
                    renderer,
                    s.action,
                    s.thought
                    if s.action == s.expert_action
                    else slip_thought(s, trajectory.thought_style),
                )
            ),
            feedback=s.feedback,
        )
        for s in trajectory.steps
    ]


def agent_examples(
    renderer: ChatRenderer, trajectories: list[Trajectory], history: History
) -> list[tuple[list[int], list[int]]]:
    """(prompt, target) pairs: the context as lived, and the expert's action from there."""
    out = []
    for trajectory in trajectories:
        turns = executed_turns(renderer, trajectory)
        for t, step in enumerate(trajectory.steps):
            if step.expert_action is None:
                continue
            prompt = renderer.prompt(
                trajectory.task, turns[:t], step.observation, step.admissible_actions, history
            )
            out.append((prompt, expert_response(renderer, step)))
    return out


def agent_sequences(
    renderer: ChatRenderer,
    trajectories: list[Trajectory],
    history: History,
    deviations: bool = False,
) -> list[Example]:
    """SFT examples teaching the expert's action in the contexts the agent lived.

    With the whole history, one sequence per trajectory learns every turn whose
    executed action was the expert's (a noisy turn stays in the context, unlearned and
    quiet: the context loss does not language-model a slip as text to imitate):
    the cost is one pass over the episode instead of one per turn. ``deviations``:
    each turn that deviated is learnt too, as a branch after its context as lived
    (the expert's response in place of the executed one), so every state is
    labelled, as DAgger wants for a model's own episodes. With a window, each turn
    is its own example, its target the expert's action.
    """
    if history is not None:
        return [
            Example.prompt_and_target(p, t)
            for p, t in agent_examples(renderer, trajectories, history)
        ]
    out = []
    for trajectory in trajectories:
        rendered = renderer.episode(trajectory.task, executed_turns(renderer, trajectory))
        ids = rendered.input_ids
        spans, corrections, quiet = [], [], []
        for (start, end), step in zip(rendered.spans, trajectory.steps, strict=True):
            if step.action == step.expert_action:
                spans.append((start, end))
                continue
            quiet.append((start, end))
            if deviations and step.expert_action is not None:
                # From the token before the response on: it predicts the response's first.
                corrections.append(
                    (start - 1, [ids[start - 1], *expert_response(renderer, step)], 1)
                )
        if spans or corrections:
            out.append(Example.branched(ids, spans, corrections, quiet))
    return out


def judge_examples(
    renderer: ChatRenderer,
    trajectories: list[Trajectory],
    history: History,
    per_episode: int | None = None,
    seed: int = 0,
) -> list[tuple[list[int], list[int], Label]]:
    """(judge prompt, label token, label) for the executed actions.

    Every turn, or ``per_episode`` turns of each trajectory picked to balance the
    labels (one of each label in turn, at random within a label): with the whole
    history each judge prompt holds the episode so far, so all turns would cost
    quadratically many tokens.
    """
    label_ids = renderer.label_ids()
    rng = random.Random(seed)
    out = []
    for trajectory in trajectories:
        turns = executed_turns(renderer, trajectory)
        chosen = range(len(trajectory.steps))
        if per_episode is not None:
            chosen = _balanced_turns(trajectory, per_episode, rng)
        for t in chosen:
            step = trajectory.steps[t]
            prompt = renderer.judge_prompt(trajectory.task, turns[: t + 1], history)
            out.append((prompt, [label_ids[step.label]], step.label))
    return out


def judge_sequences(
    renderer: ChatRenderer,
    trajectories: list[Trajectory],
    per_episode: int | None = None,
    seed: int = 0,
) -> list[Example]:
    """The judge examples of judge_examples (whole history), one sequence per trajectory.

    Each chosen turn's judge question and label is a branch after that turn's
    response, so the episode is forwarded once for all its questions. The label is
    learnt; the episode and the questions are context, as in separate examples.
    """
    label_ids = renderer.label_ids()
    rng = random.Random(seed)
    out = []
    for trajectory in trajectories:
        turns = executed_turns(renderer, trajectory)
        rendered = renderer.episode(trajectory.task, turns)
        chosen = range(len(turns))
        if per_episode is not None:
            chosen = _balanced_turns(trajectory, per_episode, rng)
        questions = []
        for t in chosen:
            question = [
                *renderer.judge_suffix(turns[: t + 1]),
                label_ids[trajectory.steps[t].label],
            ]
            questions.append((rendered.spans[t][1], question, len(question) - 1))
        if questions:
            main = rendered.input_ids[: max(visible for visible, _, _ in questions)]
            quiet = [
                span
                for span, step in zip(rendered.spans, trajectory.steps, strict=True)
                if step.action != step.expert_action and span[1] <= len(main)
            ]
            out.append(Example.branched(main, [], questions, quiet))
    return out


def _balanced_turns(trajectory: Trajectory, count: int, rng: random.Random) -> list[int]:
    by_label: dict[str, list[int]] = {}
    for t, step in enumerate(trajectory.steps):
        by_label.setdefault(step.label, []).append(t)
    for group in by_label.values():
        rng.shuffle(group)
    picked: list[int] = []
    while len(picked) < count and any(by_label.values()):
        for group in by_label.values():
            if group and len(picked) < count:
                picked.append(group.pop())
    return sorted(picked)


def corpus(trajectories: list[Trajectory]) -> list[str]:
    """Every text an agent or judge reads, for fitting a tokenizer."""
    from client.prompts import JUDGE_ANSWER_CUE, JUDGE_INSTRUCTIONS, SYSTEM_PROMPT

    texts = [SYSTEM_PROMPT, JUDGE_INSTRUCTIONS]
    texts += [f"{JUDGE_ANSWER_CUE}{label_word(label)}" for label in ("Skip", "Weak", "Strong")] * 50
    for trajectory in trajectories:
        texts.append(f"Task: {trajectory.task}")
        for step in trajectory.steps:
            texts.append(f"Observation: {step.observation}")
            texts.append("Admissible actions: " + ", ".join(step.admissible_actions))
            texts.append(agent_response(step.action, step.thought))
            texts.append(f"Feedback: {step.feedback}")
    return texts
