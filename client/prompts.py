"""What the agent and the judge read, and how a conversation becomes token ids.

One module renders every prompt, so that the student's rollouts, the teacher's
scoring and judging, and SFT see exactly the same text. The message texts are
plain functions; :class:`ChatRenderer` turns a conversation into token ids with a
model's own chat template while splicing in the student's sampled response ids
unchanged (token ids are never re-tokenized).

The tokenizer is duck-typed (``apply_chat_template``, ``encode``, ``eos_token``,
``eos_token_id``): a Hugging Face tokenizer fits, and client/ does not import
transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from client.protocol import LABELS, EpisodeTurn, Label

# Short on purpose: every turn of every rollout, score and SFT example carries it.
SYSTEM_PROMPT = (
    "You act in a household. Reply with 'Action: ' and one admissible action, "
    "optionally after one line 'Thought: ...'."
)

JUDGE_INSTRUCTIONS = (
    "Judge the agent's last action. Skip: it made progress. Weak: allowed, no progress. "
    "Strong: it failed, was not allowed, or undid progress."
)
# The judge answers inside its own turn after this cue; each label is read as the
# token of " " + label (a leading space keeps common words single tokens).
JUDGE_ANSWER_CUE = "Verdict:"


def label_word(label: Label) -> str:
    return " " + label


def observation_message(task: str, observation: str, admissible: Sequence[str], first: bool) -> str:
    """The user message of a turn: the task (first turn only), what happened, what is allowed."""
    parts = [f"Task: {task}"] if first else []
    parts.append(f"Observation: {observation}")
    if admissible:
        parts.append("Admissible actions: " + ", ".join(admissible))
    return "\n".join(parts)


def judge_message(feedback: str) -> str:
    return f"Feedback: {feedback}\n{JUDGE_INSTRUCTIONS}"


def agent_response(action: str, thought: str | None = None) -> str:
    """The canonical response text (what SFT trains and the parser reads)."""
    if thought:
        return f"Thought: {thought}\nAction: {action}"
    return f"Action: {action}"


def parse_action(response: str) -> str | None:
    """The action named by a response ('Action: ...' on its last such line), or None."""
    action = None
    for line in response.splitlines():
        stripped = line.strip()
        if stripped.lower().startswith("action:"):
            action = stripped[len("action:") :].strip()
    return action or None


def action_start(
    tokenizer: Any, response_ids: Sequence[int], ends: Sequence[int | None] | None = None
) -> int:
    """The index of the first token of a response's last 'Action:' line: the tokens from
    there on name the action, those before it think. 0 when no line names an action
    (the whole response is then what the agent said instead of an action). ``ends``:
    the ids' token_ends, when the caller has them already."""
    text = tokenizer.decode(list(response_ids), skip_special_tokens=True)
    offset = None
    position = 0
    for line in text.splitlines(keepends=True):
        stripped = line.lstrip()
        if stripped.lower().startswith("action:"):
            offset = position + len(line) - len(stripped)
        position += len(line)
    if offset is None:
        return 0
    ends = token_ends(tokenizer, response_ids) if ends is None else ends
    # The token that holds the line's first character.
    return next((i for i, end in enumerate(ends) if end is not None and end > offset), 0)


def token_ends(tokenizer: Any, ids: Sequence[int]) -> list[int | None]:
    """Where each of ``ids`` ends in their text, decode(ids) without special tokens: the
    length of the decoded prefix that ends with it. None for a token after which the
    decoded prefix is not a prefix of the text (it ends inside a character that the
    next token completes). A special token is empty: it ends where the one before it does.
    """
    ids = list(ids)
    prefixes = tokenizer.batch_decode(
        [ids[: i + 1] for i in range(len(ids))], skip_special_tokens=True
    )
    text = prefixes[-1] if prefixes else ""
    return [len(p) if text.startswith(p) else None for p in prefixes]


class ChatTokenizer(Protocol):
    eos_token: str | None
    eos_token_id: int | None

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> Any: ...

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(frozen=True)
class RenderedEpisode:
    """Token ids with the responses to train on at ``spans``, turn ``turns[i]`` at ``spans[i]``."""

    input_ids: list[int]
    spans: list[tuple[int, int]]
    turns: list[int]


# How much history a turn's context holds: None for the whole episode, k for the
# last k turns before it (the task is restated in the first turn of a window).
History = int | None


def window(turns: Sequence[EpisodeTurn], t: int, history: History) -> Sequence[EpisodeTurn]:
    """Turn t with the history it is shown: turns[t - history .. t] (all before it: None)."""
    start = 0 if history is None else max(0, t - history)
    return turns[start : t + 1]


# A string no environment text contains: stands in for each response while the
# template renders, then the text is split on it and the real ids go in between.
_SLOT = "\u2063RESPONSE\u2063"


class ChatRenderer:
    """Renders agent conversations with one tokenizer's chat template."""

    def __init__(
        self,
        tokenizer: ChatTokenizer,
        system_prompt: str = SYSTEM_PROMPT,
        show_admissible: bool = True,
    ) -> None:
        """``show_admissible=False``: the agent is not shown the admissible actions.

        It then reads the room from the first observation and names actions itself,
        as in ALFWorld's ReAct prompts; contexts are several times shorter.
        """
        if tokenizer.eos_token is None or tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs an end-of-turn (eos) token")
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.show_admissible = show_admissible
        self.eos_id = tokenizer.eos_token_id
        self.eos_text = tokenizer.eos_token

    def text_response(self, text: str, ends_turn: bool) -> tuple[list[int], list[int]]:
        """A response given as text, in this tokenizer's ids (its own end-of-turn token
        last when ``ends_turn``), and where each id ends in ``text``, in characters."""
        ids: list[int] = []
        ends: list[int] = []
        if text:  # a fast tokenizer's offset mapping: where its tokens are in the text
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = list(encoded["input_ids"])
            ends = [end for _, end in encoded["offset_mapping"]]
        if ends_turn:
            ids.append(self.eos_id)
            ends.append(len(text))
        return ids, ends

    def own_ids(
        self, turns: Sequence[EpisodeTurn]
    ) -> tuple[list[EpisodeTurn], list[list[int] | None]]:
        """The turns with every response in this tokenizer's ids (a text response
        tokenized here, see text_response), and per turn where its ids end in its text
        (None: the response came as ids, spliced in unchanged)."""
        out, offsets = [], []
        for turn in turns:
            if turn.response_text is None:
                out.append(turn)
                offsets.append(None)
                continue
            ids, ends = self.text_response(turn.response_text, turn.ends_turn)
            out.append(turn.model_copy(update={"response_ids": ids, "response_text": None}))
            offsets.append(ends)
        return out, offsets

    def messages(self, task: str, turns: Sequence[EpisodeTurn]) -> list[dict[str, str]]:
        """The chat up to each turn's response (a slot where each response goes)."""
        chat = [{"role": "system", "content": self.system_prompt}]
        for t, turn in enumerate(turns):
            admissible = turn.admissible_actions if self.show_admissible else ()
            content = observation_message(task, turn.observation, admissible, t == 0)
            chat.append({"role": "user", "content": content})
            chat.append({"role": "assistant", "content": _SLOT})
        return chat

    def _segments(self, chat: list[dict[str, str]], generation_prompt: bool) -> list[str]:
        text = self.tokenizer.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=generation_prompt
        )
        return text.split(_SLOT)

    def _encode(self, text: str, after_response: Sequence[int] | None) -> list[int]:
        # A response that ended with its own eos already closed the turn; the
        # template's copy of that token must not follow it a second time.
        if after_response and after_response[-1] == self.eos_id and text.startswith(self.eos_text):
            text = text[len(self.eos_text) :]
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def _assemble(
        self, segments: list[str], responses: Sequence[Sequence[int]]
    ) -> tuple[list[int], list[tuple[int, int]]]:
        ids = self._encode(segments[0], None)
        spans = []
        for response, segment in zip(responses, segments[1:], strict=True):
            start = len(ids)
            ids.extend(response)
            spans.append((start, len(ids)))
            ids.extend(self._encode(segment, response))
        return ids, spans

    def episode(self, task: str, turns: Sequence[EpisodeTurn]) -> RenderedEpisode:
        """The whole episode: every observation and every response, responses as given."""
        segments = self._segments(self.messages(task, turns), generation_prompt=False)
        ids, spans = self._assemble(segments, [turn.response_ids for turn in turns])
        return RenderedEpisode(ids, spans, list(range(len(turns))))

    def contexts(
        self, task: str, turns: Sequence[EpisodeTurn], history: History = None
    ) -> list[RenderedEpisode]:
        """What the agent saw when it wrote each response, as few sequences as that allows.

        With the whole history, one sequence holds every turn (each response's
        prefix is exactly what the agent saw). With a window of k turns, each turn
        is its own sequence: its window, with only its own response to train on.
        """
        if history is None:
            return [self.episode(task, turns)]
        out = []
        for t in range(len(turns)):
            rendered = self.episode(task, window(turns, t, history))
            out.append(RenderedEpisode(rendered.input_ids, rendered.spans[-1:], [t]))
        return out

    def prompt(
        self,
        task: str,
        turns: Sequence[EpisodeTurn],
        observation: str,
        admissible: Sequence[str],
        history: History = None,
    ) -> list[int]:
        """The ids the agent generates its next response after (its history, then the new turn)."""
        if history is not None:
            turns = turns[len(turns) - history :] if history > 0 else []
        pending = EpisodeTurn(
            observation=observation, admissible_actions=list(admissible), response_ids=[self.eos_id]
        )
        chat = self.messages(task, [*turns, pending])[:-1]  # no slot for the response to come
        segments = self._segments(chat, generation_prompt=True)
        ids, _ = self._assemble(segments, [turn.response_ids for turn in turns])
        return ids

    def judge_suffix(self, turns: Sequence[EpisodeTurn]) -> list[int]:
        """The ids that follow turn ``turns[-1]``'s response when the judge is asked about it.

        The judge reads the whole episode up to and including that response, then
        this suffix (the end of the turn, the feedback and the question, its own
        turn and the answer cue); the label is the next token.
        """
        last = turns[-1]
        chat = [
            {"role": "assistant", "content": _SLOT},
            {"role": "user", "content": judge_message(last.feedback)},
        ]
        full = self._segments(chat, generation_prompt=True)
        # Only the part after the response matters; render with a neutral prefix
        # (the template's system header, if any, falls before the slot).
        return self._encode(full[-1] + JUDGE_ANSWER_CUE, last.response_ids)

    def judge_prompt(
        self, task: str, turns: Sequence[EpisodeTurn], history: History = None
    ) -> list[int]:
        """The whole judge prompt for the last of ``turns``: its context, response, judge suffix."""
        rendered = self.episode(task, window(turns, len(turns) - 1, history))
        end = rendered.spans[-1][1]
        return rendered.input_ids[:end] + self.judge_suffix(turns)

    def label_ids(self) -> dict[Label, int]:
        """Each label's single token id; raises ValueError when a label is several tokens."""
        ids: dict[Label, int] = {}
        for label in LABELS:
            tokens = self.tokenizer.encode(label_word(label), add_special_tokens=False)
            if len(tokens) != 1:
                raise ValueError(
                    f"judge label {label_word(label)!r} is {len(tokens)} tokens in this "
                    f"tokenizer ({tokens}); a judge label must be exactly one token"
                )
            ids[label] = tokens[0]
        if len(set(ids.values())) != len(LABELS):
            raise ValueError(f"judge labels share a token: {ids}")
        return ids
