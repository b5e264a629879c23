"""The household world's text conventions, as agents and the trainer read them.

The embedded world (services/env/household) and ALFWorld's games answer an action
that does not apply with NOTHING_HAPPENS and list a receptacle's contents as "On the
desk 1, you see ..." or "... In it, you see ...". Agents taught to think while they
search write "Thought: apple 1 here" (or "apple here") when they take the object, and
"Thought: apple not here" when they walk on.
"""

from __future__ import annotations

import re
from typing import Literal

NOTHING_HAPPENS = "Nothing happens."

# How a search thought names a find: "apple 1 here" (number) or "apple here" (decision:
# the number in the action only, so the token after the name is the decision itself).
ThoughtStyle = Literal["number", "decision"]

# "go to desk 1": the place and its number.
GO = re.compile(r"^go to (?P<place>.+) (?P<n>\d+)$")
# A receptacle's contents in view: "On the desk 1, you see ..." or "... In it, you see ...".
CONTENTS = re.compile(r"(?:On the [^,]+|In it), you see (.*)$")
# The actions that end a search: taking the object, or using the lamp.
FOUND = re.compile(r"^(?:take (?P<take>.+?) (?P<n>\d+) from .+|use (?P<use>.+?) (?P<m>\d+))$")
# A search thought without its "Thought: " cue: "apple 1 here", "apple here", "apple not here".
THOUGHT = re.compile(r"^(?P<sought>.+?) (?:\d+ |not )?here$")
# The first line of a searching response, cue and all.
DECISION = re.compile(r"^Thought: (?P<sought>.+?) (?:\d+ |not )?here\s*$")
