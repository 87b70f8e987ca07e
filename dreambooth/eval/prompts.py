"""DreamBench-style prompts for a subject: the benchmark's scenes, accessories and properties as our templates,
and the subject phrase each prompt names, swapped for its class noun when CLIP-T is scored."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dreambooth.errors import UserError

PLACEHOLDER = "{subject}"

# Recontextualisation: the subject placed in another scene. Objects get 20, live subjects the first 10.
_SCENES = [
    "in the jungle", "in the snow", "on the beach", "on a cobblestone street", "on top of pink fabric",
    "on top of a wooden floor", "with a city in the background", "with a mountain in the background",
    "with a blue house in the background", "on top of a purple rug in a forest",
    "with a wheat field in the background", "with a tree and autumn leaves in the background",
    "with the Eiffel Tower in the background", "floating on top of water", "floating in an ocean of milk",
    "on top of green grass with sunflowers around it", "on top of a mirror",
    "on top of the sidewalk in a crowded street", "on top of a dirt road", "on top of a white rug",
]
# Accessorisation, for live subjects (pets) only.
_OUTFITS = [
    "wearing a red hat", "wearing a santa hat", "wearing a rainbow scarf", "wearing a black top hat and a monocle",
    "in a chef outfit", "in a firefighter outfit", "in a police outfit", "wearing pink glasses",
    "wearing a yellow shirt", "in a purple wizard outfit",
]
# Property modification, for both.
_PROPERTIES = ["red", "purple", "shiny", "wet", "cube shaped"]

OBJECT = [f"a {PLACEHOLDER} {s}" for s in _SCENES] + [f"a {p} {PLACEHOLDER}" for p in _PROPERTIES]
LIVE = ([f"a {PLACEHOLDER} {s}" for s in _SCENES[:10]] + [f"a {PLACEHOLDER} {o}" for o in _OUTFITS]
        + [f"a {p} {PLACEHOLDER}" for p in _PROPERTIES])

# Class nouns that make `--prompts auto` pick the live list (DreamBench's live subjects are pets).
LIVE_NOUNS = {"dog", "cat", "puppy", "kitten", "pet", "animal", "horse", "bird", "rabbit", "bunny", "hamster",
              "parrot", "fox", "person", "man", "woman", "boy", "girl", "baby", "child"}

# "a photo of", "an image of the", "a": what comes before the subject in an instance or class prompt.
_LEAD = re.compile(r"^(?:(?:a|an|the)\s+)?(?:(?:photo|picture|image|portrait)\s+of\s+)?(?:(?:a|an|the)\s+)?",
                   re.IGNORECASE)


def _core(prompt: str) -> str:
    return _LEAD.sub("", prompt.strip()).strip().rstrip(".,;").strip()


def _words(phrase: str) -> re.Pattern:
    """The phrase as whole words, case-insensitive, any run of spaces between them."""
    return re.compile(r"(?<!\w)" + r"\s+".join(map(re.escape, phrase.split())) + r"(?!\w)", re.IGNORECASE)


@dataclass(frozen=True)
class SubjectText:
    """How prompts name a subject: its phrase ("riobugger toy") and the class noun ("toy") CLIP-T puts instead."""
    phrase: str
    noun: str

    @classmethod
    def from_prompts(cls, instance_prompt: str, class_prompt: str | None = None,
                     noun: str | None = None) -> "SubjectText":
        """From "a photo of riobugger toy" and "a photo of a toy"; without a class prompt the phrase's last word
        is the noun ("sks dog" -> "dog"), unless `noun` says it."""
        phrase = _core(instance_prompt)
        noun = (noun or (_core(class_prompt) if class_prompt else "")).strip()
        if not noun:
            words = phrase.split()
            if len(words) < 2:
                raise UserError(f"cannot tell the class noun of {instance_prompt!r}: give --class-noun (e.g. dog) "
                                "or a class_prompt in dataset_info.json")
            noun = words[-1]
        return cls(phrase, noun)

    def names(self, prompt: str) -> bool:
        """Whether `prompt` names this subject."""
        return bool(_words(self.phrase).search(prompt))

    def fill(self, template: str) -> str:
        return template.replace(PLACEHOLDER, self.phrase)

    def neutral(self, prompt: str) -> str:
        """The prompt with the subject's phrase replaced by its class noun (what CLIP-T compares with)."""
        return _words(self.phrase).sub(self.noun, prompt)


def kind_of(noun: str) -> str:
    """'live' for pets and people, else 'object' (which of the two lists `--prompts auto` takes)."""
    return "live" if noun.lower().split()[-1] in LIVE_NOUNS else "object"


def read_templates(path: str | Path) -> list[str]:
    """One template per line, each naming the subject as {subject}; blank lines and # comments skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read prompt file {path}: {e}") from None
    templates = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if PLACEHOLDER not in line:
            raise UserError(f"{path} line {number}: {line!r} does not name the subject: write {PLACEHOLDER} where it "
                            f"goes, e.g. 'a {PLACEHOLDER} on the moon'")
        templates.append(line)
    if not templates:
        raise UserError(f"{path} holds no prompt templates: one per line, each with {PLACEHOLDER}")
    return templates


def templates_for(choice: str, subject: SubjectText) -> tuple[str, list[str]]:
    """(name, templates) for `--prompts`: auto (by the class noun), object, live, or a file of templates."""
    choice = choice or "auto"
    if choice == "auto":
        choice = kind_of(subject.noun)
    if choice == "object":
        return "object", list(OBJECT)
    if choice == "live":
        return "live", list(LIVE)
    if not Path(choice).is_file():
        raise UserError(f"--prompts {choice}: give auto, object, live or a file of templates (one per line, "
                        f"each with {PLACEHOLDER})")
    return str(choice), read_templates(choice)
