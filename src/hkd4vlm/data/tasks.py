"""The two tasks and the wording the public API uses by default (the Detector's questions and verdicts).
The synthetic benchmark writes its records with the same words, so a model tuned on it is asked the way
it was trained; changing the generator cannot change the API's defaults, since both read them here."""

from __future__ import annotations

from typing import Literal

Task = Literal["hallucination", "factuality"]
TASKS: tuple[Task, ...] = ("hallucination", "factuality")

#: hallucination detection: the question that produced the caption (``system1_question``) and the
#: question about the options (``system2_question``); the first of each is the default
SYSTEM1_QUESTIONS = ("Describe the image.", "What do you see in this picture?", "Write a short caption for this image.")
SYSTEM2_QUESTIONS = (
    "Which option is hallucinated?",
    "Which of the following is not supported by the image?",
    "Which option describes something that is not in the image?",
)
#: fact checking: the question (``question``); the first is the default
FACT_QUESTIONS = (
    "Is the claim factual?",
    "Which verdict fits the claim, given the image and the context?",
    "Is the claim supported by the image and the context?",
)
#: tasks whose question asks for the option that does *not* hold ("Which option is hallucinated?"): the
#: option readout's score means "this option holds" everywhere (pretraining statements, verdicts), and
#: for these tasks the answer is the option it scores lowest (models.scoring.option_signs)
ASKS_FOR_UNSUPPORTED: frozenset[str] = frozenset({"hallucination"})

#: fact checking: the four verdicts, in the order the benchmark's records and the Detector offer them
VERDICTS = (
    "True",
    "False: contradicted by the image",
    "False: contradicted by the context",
    "Not enough information",
)
