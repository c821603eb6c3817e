"""UniGenBench (Wang et al. 2025, the benchmark of Pref-GRPO): prompts with test points, judged per
test point by a VLM through the OpenAI-compatible judge client (``flowalign.rewards.vlm.ChatClient``).

**Prompt file** (the benchmark's ``data/test_prompts_en.csv``): columns ``index``, ``prompt_en`` and
``sub_dims_en``, a JSON object with ``"Testpoints"`` (names such as ``"Attribute - Color"``) and
``"Testpoint Description"`` (one sentence per test point, same length); ``_zh`` columns for Chinese
(``language="zh"`` reads them; the judge is still asked in English, the reference has a Chinese prompt).

**Judging** (the benchmark's ``eval/qwenvl_72b_en_eval.py``): one request per image with the prompt,
the test points, their definitions and descriptions; the judge answers
``<analysis>[...]</analysis><score>[1, 0, ...]</score>``, one binary score per test point. An answer
that is missing, unparsable or of the wrong length is asked again (``parse_retries`` times; the
reference asks forever), on top of the client's own retries of failed HTTP requests; an image that
still has no answer is counted in ``failed`` and left out of the scores.

**Scores**: accuracy per test point (sub-dimension, e.g. ``Attribute - Color``) and per primary
dimension (the part before `` - ``, e.g. ``Attribute``), pooled over all images' test points;
``overall`` is the mean over primary dimensions.
"""

from __future__ import annotations

import ast
import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

# UniGenBench's definitions of its test points (its evaluation script's explanation table, verbatim:
# the judge is prompted with this wording).
TESTPOINT_DEFINITIONS: dict[str, str] = {
    "Relationship - Comparison": "Comparison of attributes between two entities",
    "Relationship - Composition": "An entity is composed of one or more other entities",
    "Relationship - Inclusion": "A container contains an entity; the container can also be a plane, e.g., a snake "
                                "in a painting on a wall",
    "Relationship - Similarity": "Existence of similarities between different entities",
    "Compound - Imagination": "Things that are impossible in real life",
    "Compound - Feature Matching": "Different entities possess different types of attribute features",
    "Attribute - Size": "Assessment of the subject's size, height, length, thickness, width, or tallness/shortness",
    "Attribute - Expression": "Distinguishing expressions from facial actions; expressions must convey a clear emotion",
    "Attribute - Quantity": "Focuses on the challenge of depicting three or more items accurately",
    "Attribute - Material": "Evaluation of different material types and textures",
    "Attribute - Color": "Assessment of different colors",
    "Attribute - Shape": "Assessment of different shapes",
    "Entity Layout - Two-Dimensional Space": "Arrangement and positioning of entities in two-dimensional space",
    "Entity Layout - Three-Dimensional Space": "Arrangement and positioning of entities in three-dimensional space",
    "Action - Full-body (Character/Anthropomorphic)": "Full-body actions by characters or anthropomorphized "
                                                      "entities, such as running, diving, breakdancing, swinging, "
                                                      "or hanging upside down",
    "Action - Hand (Character/Anthropomorphic)": "Focuses on hand structure—checking if fingers are missing, "
                                                 "broken, or distorted",
    "Action - Animal": "Actions performed by animals",
    "Action - Contact Interaction": "Physical interactions between entities",
    "Action - Non-contact Interaction": "For example, two people making eye contact—testing if the model can "
                                        "accurately depict such interactions",
    "Action - State": "A sustained state of an entity, typically expressed with a verb",
    "Grammar - Negation": "Tests the model’s understanding of negation grammar",
    "Grammar - Pronoun Reference": "Tests if the model can resolve ambiguous pronoun references correctly",
    "Grammar - Consistency": "Evaluation of shared attributes among entities",
    "World Knowledge": "Covers knowledge of celebrities, architecture, basic domain knowledge, and internet slang. "
                       "Celebrities with modern copyright risk should be avoided",
    "Style": "Art, painting, photography, design styles, and corresponding artist names",
    "Text Generation": "The text content model needed to accurately generate without any omissions or extra words",
    "Logical Reasoning": "Requires the model to deeply understand the intent and perform reasoning",
}

# The judge's instructions (UniGenBench's English evaluation prompt); {prompt}, {testpoints},
# {definitions} and {descriptions} are filled in per image.
JUDGE_TEMPLATE = """You are a precise and objective English-language image description system. I will provide you with a prompt for image generation, as well as the corresponding generated image. You will be given a set of evaluation criteria (checkpoints) and their explanations that define the relevance between the prompt and the image. You must evaluate whether the generated image fulfills the requirements implied by each checkpoint in the prompt.

            For each image, follow the steps below in order:

            1. The prompt for the generated image is: 「{prompt}」. You are to analyze the image content in detail from the angles specified in {testpoints}. Detailed definitions of these checkpoints are provided here: {definitions}. The specific description of each checkpoint in the context of the prompt is: {descriptions}. You must analyze whether the image meets the requirements for each checkpoint individually.

            2. Based on the above analysis, determine whether the generated image satisfies each checkpoint in terms of its visual alignment with the prompt. If the image meets the requirements of a checkpoint, assign a score of 1 to that checkpoint; otherwise, assign a score of 0.

            Constraints:
            - Only describe content that is directly visible; do not interpret, speculate, or infer any background story.
            - Focus solely on visually verifiable details.
            - Omit any uncertain or ambiguous elements.
            - Even if mentioned in the input, do not describe abstract entities, emotions, or speculative ideas.

            Please strictly follow the output format below:

            <description>
                <prompt>{prompt}</prompt>
                <checkpoint>{testpoints}</checkpoint>
                <analysis>A list using square brackets `[]`, where each element is a string of detailed analysis corresponding to one checkpoint, as required in Step 1. **Ensure the list length matches the number of checkpoints**. Each element should be a string representing the analysis for that specific checkpoint.</analysis>
                <score>A list using square brackets `[]`, where each element is a binary score (0 or 1) corresponding to a checkpoint, as required in Step 2. **Ensure the list length matches the number of checkpoints**. Each element should be either 0 or 1, indicating whether the checkpoint was satisfied.</score>
            </description>
            """

_SCORE_RE = re.compile(r"<score>(.*?)</score>", re.S)
_CHECKPOINT_RE = re.compile(r"<checkpoint>(.*?)</checkpoint>", re.S)
_PROMPT_RE = re.compile(r"「(.*?)」", re.S)
IMAGES_PER_PROMPT = 4  # the benchmark's protocol: images <index>_0.png ... <index>_3.png


@dataclass(frozen=True)
class Item:
    """One benchmark prompt: ``index`` (the file's), text, test points and their descriptions."""

    index: int
    prompt: str
    testpoints: tuple[str, ...]
    descriptions: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"index": self.index, "prompt": self.prompt, "testpoints": list(self.testpoints),
                "descriptions": list(self.descriptions)}


def primary(testpoint: str) -> str:
    """``"Attribute - Color"`` → ``"Attribute"``; a test point without a sub-dimension is its own."""
    return testpoint.split("-", 1)[0].strip()


def read_items(path: str | os.PathLike, language: str = "en") -> list[Item]:
    """The prompts of a UniGenBench CSV; ValueError naming the file, row and the fix for bad input."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"UniGenBench prompt file {str(path)!r} does not exist; give the benchmark's CSV "
                         "(data/test_prompts_en.csv of CodeGoat24/UniGenBench)")
    cols = ("index", f"prompt_{language}", f"sub_dims_{language}")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in cols if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{path}: UniGenBench CSV is missing the column(s) {missing}; it needs {list(cols)} "
                             f"(sub_dims_{language}: JSON with 'Testpoints' and 'Testpoint Description')")
        items = []
        for n, row in enumerate(reader, 2):
            where = f"{path}:{n}"
            try:
                index = int(float(row["index"]))
                dims = json.loads(row[cols[2]])
                points, descs = dims["Testpoints"], dims["Testpoint Description"]
            except (ValueError, KeyError, TypeError) as err:
                raise UserError(f"{where}: bad UniGenBench row ({type(err).__name__}: {err}); 'index' must be a "
                                 f"number and {cols[2]} a JSON object with 'Testpoints' and 'Testpoint Description'") from None
            if not isinstance(points, list) or not points or len(points) != len(descs):
                raise UserError(f"{where}: 'Testpoints' and 'Testpoint Description' must be lists of the same "
                                 f"non-zero length, got {len(points) if isinstance(points, list) else points!r} "
                                 f"and {len(descs) if isinstance(descs, list) else descs!r}")
            unknown = [p for p in points if p not in TESTPOINT_DEFINITIONS]
            if unknown:
                raise UserError(f"{where}: unknown test point(s) {unknown}; UniGenBench's are "
                                 f"{sorted(TESTPOINT_DEFINITIONS)}")
            if not row[cols[1]].strip():
                raise UserError(f"{where}: empty {cols[1]}")
            items.append(Item(index, row[cols[1]].strip(), tuple(points), tuple(descs)))
    if not items:
        raise UserError(f"{path}: no prompts")
    return items


def write_items(path: str | os.PathLike, items: list[Item], language: str = "en") -> Path:
    """A UniGenBench CSV of ``items`` (tests and small benchmark subsets)."""
    import io

    from ..io import atomic_write_text

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["index", f"prompt_{language}", f"sub_dims_{language}"])
    for it in items:
        w.writerow([it.index, it.prompt, json.dumps({"Testpoints": list(it.testpoints),
                                                      "Testpoint Description": list(it.descriptions)})])
    return atomic_write_text(path, buf.getvalue())


def judge_text(item: Item) -> str:
    """The judge's instructions for one image of ``item``."""
    definitions = "Checkpoints Defination:「" + "".join(
        f"\n{p}: {TESTPOINT_DEFINITIONS[p]}" for p in item.testpoints) + "\n」"
    descriptions = "Checkpoints Description:「" + "".join(
        f"\n{p}: {d}" for p, d in zip(item.testpoints, item.descriptions)) + "\n」"
    return JUDGE_TEMPLATE.format(prompt=item.prompt, testpoints=list(item.testpoints), definitions=definitions,
                                 descriptions=descriptions)


def parse_scores(text: str, n: int) -> list[int] | None:
    """The ``<score>[...]</score>`` list when it has ``n`` binary entries, else None."""
    m = _SCORE_RE.search(text)
    if not m:
        return None
    try:
        scores = ast.literal_eval(m.group(1).strip())
    except (ValueError, SyntaxError):
        return None
    if not isinstance(scores, (list, tuple)) or len(scores) != n or any(s not in (0, 1) for s in scores):
        return None
    return [int(s) for s in scores]


def answer_from_score(text: str, score: float, pass_threshold: float = 0.5) -> str:
    """A judge answer in UniGenBench's format from one local score (``flowalign judge-server``): every
    test point named in the request's ``<checkpoint>`` list gets 1 when ``score >= pass_threshold``."""
    points = ast.literal_eval(_CHECKPOINT_RE.search(text).group(1).strip())
    m = _PROMPT_RE.search(text)
    verdict = int(score >= pass_threshold)
    analysis = [f"local judge score {score:.6g}" for _ in points]
    return (f"<description>\n<prompt>{m.group(1) if m else ''}</prompt>\n<checkpoint>{points}</checkpoint>\n"
            f"<analysis>{analysis}</analysis>\n<score>{[verdict] * len(points)}</score>\n</description>")


def is_request(text: str) -> bool:
    """Whether a judge request's text is a UniGenBench one (it asks for a ``<checkpoint>`` list)."""
    return bool(_CHECKPOINT_RE.search(text)) and "<score>" in text


@dataclass
class Judged:
    """Per image: the item, image path and the judge's scores (None when it never answered)."""

    item: Item
    image: str
    scores: list[int] | None
    attempts: int


@dataclass
class UniGenBenchJudge:
    """Judges images through a ``ChatClient`` (vLLM/SGLang serving UniGenBench's eval model or any
    VLM; ``flowalign judge-server`` in tests)."""

    client: object
    parse_retries: int = 2
    stats: dict = field(default_factory=lambda: {"images": 0, "unparsable": 0, "failed": 0})

    def judge(self, item: Item, image_url: str) -> tuple[list[int] | None, int]:
        content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": judge_text(item)}]
        for attempt in range(1, self.parse_retries + 2):
            text = self.client.complete(content)
            scores = None if text is None else parse_scores(text, len(item.testpoints))
            if scores is not None:
                return scores, attempt
            if text is not None:
                self.client.count("unparsable")
        return None, self.parse_retries + 1

    def evaluate(self, jobs: list[tuple[Item, str]]) -> list[Judged]:
        """``jobs``: (item, image path) pairs → one ``Judged`` each, judged on the client's thread pool."""
        from PIL import Image

        from ..rewards.vlm import _png_data_url

        def one(job):
            item, path = job
            import numpy as np

            url = _png_data_url(np.asarray(Image.open(path).convert("RGB")))
            scores, attempts = self.judge(item, url)
            return Judged(item, str(path), scores, attempts)

        results = self.client.map(one, jobs)
        self.stats["images"] += len(results)
        self.stats["failed"] += sum(r.scores is None for r in results)
        self.stats["unparsable"] = self.client.stats["unparsable"]
        return results


def summarize(results: list[Judged]) -> dict:
    """Accuracy per primary dimension and per test point (pooled over judged images), ``overall`` =
    mean over primary dimensions, and the counts of judged and failed images."""
    prim: dict[str, list[int]] = {}
    sub: dict[str, list[int]] = {}
    for r in results:
        if r.scores is None:
            continue
        for p, s in zip(r.item.testpoints, r.scores):
            prim.setdefault(primary(p), []).append(s)
            sub.setdefault(p, []).append(s)
    acc = {k: sum(v) / len(v) for k, v in sorted(prim.items())}
    return {
        "primary": acc,
        "sub": {k: sum(v) / len(v) for k, v in sorted(sub.items())},
        "overall": sum(acc.values()) / len(acc) if acc else float("nan"),
        "images": len(results),
        "failed": sum(r.scores is None for r in results),
    }


def format_summary(summary: dict) -> str:
    rows = [(k, v) for k, v in summary["primary"].items()] + [("overall", summary["overall"])]
    width = max(len(k) for k, _ in rows)
    lines = [f"{'dimension':<{width}}  accuracy"] + [f"{k:<{width}}  {v:8.3f}" for k, v in rows]
    lines.append(f"{summary['images']} images judged, {summary['failed']} without an answer")
    return "\n".join(lines)
