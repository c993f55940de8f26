"""Build the EPA study's preference data offline, with a gold reward that depends on the prompt.

    python -m training.review_data --out epa-study/data      # SmolLM2-135M-Instruct, 520 prompts, CPU

Each prompt asks for a positive or a negative one-line review of a named subject ("Write a one-line negative
review of the Eiffel Tower."). The gold reward of an answer is its AFINN sentiment signed by the requested
polarity, halved and clipped to [−3, 3], minus OFF_SUBJECT_PENALTY when the answer never names the subject. So an
answer written for another prompt (another subject, maybe the other polarity) is genuinely worse under this one:
the premise of weak negatives holds here, unlike in `training.demo_data` whose gold ignores the prompt; meta.json
reports the gap. Preferences are drawn from the gold reward exactly as in `training.demo_data` (by the same code,
`training.preference_data`: Bradley–Terry pairs; the EPA energy model's chosen among all answers), and the files
are the same: ``train_pairs.jsonl``, ``train_multi.jsonl``, ``train_ranked.jsonl``, ``eval.jsonl`` and
``meta.json``, plus ``responses.jsonl`` (every sampled answer and its gold reward, written last), from which
`redraw` draws other preferences from the same answers (the EPA study's seeds).

Subjects, not prompts, are split: the held-out prompts ask about subjects no training prompt names. Every subject
gets 2 polarities × 2 phrasings = 4 prompts; the defaults give 456 training and 104 held-out prompts. Generation
takes ~10 min on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

import numpy as np

from training.preference_data import (
    FILES,
    DemoDataError,
    _afinn,
    argument_parser,
    build_rows,
    generate,
    load_model,
    parse_options,
    write,
    write_jsonl,
)

SYSTEM = "You are a helpful assistant. Answer in one sentence."
TEMPLATES = ("Write a one-line {polarity} review of {subject}.", "Give a short {polarity} opinion of {subject}.")
POLARITIES = {"positive": 1.0, "negative": -1.0}
OFF_SUBJECT_PENALTY = 2.0
SENTIMENT_CLIP = 3.0
SUBJECTS = (
    # places
    "the Eiffel Tower", "Central Park", "the Grand Canyon", "Venice", "Tokyo", "the London Underground",
    "Niagara Falls", "the Sahara Desert", "Times Square", "the Great Wall of China", "Yellowstone National Park",
    "Las Vegas", "the Louvre museum", "Mount Everest", "Disneyland", "the Amazon rainforest", "Iceland", "Paris",
    "a small fishing village", "the local public library",
    # food and drink
    "pineapple pizza", "sushi", "dark chocolate", "black coffee", "green tea", "instant noodles", "fried chicken",
    "vegan burgers", "Brussels sprouts", "French cheese", "street tacos", "energy drinks", "sourdough bread",
    "blue cheese", "mango ice cream", "airline food", "hospital food", "spicy curry", "oatmeal", "avocado toast",
    # products
    "the iPhone", "electric cars", "smartwatches", "wireless earbuds", "mechanical keyboards", "the Nintendo Switch",
    "a robot vacuum cleaner", "e-readers", "standing desks", "noise-cancelling headphones", "paper notebooks",
    "fountain pens", "instant cameras", "air fryers", "electric scooters", "memory foam mattresses",
    "smart speakers", "laptop stickers", "vinyl records", "running shoes",
    # media and culture
    "the Harry Potter books", "the movie Titanic", "Shakespeare's plays", "jazz music", "heavy metal",
    "reality television", "video games", "superhero movies", "classical music", "podcasts", "opera",
    "stand-up comedy", "social media", "the Olympic Games", "chess", "crossword puzzles", "board games",
    "K-pop", "horror movies", "poetry",
    # everyday life
    "working from home", "public transport", "online shopping", "camping", "long flights", "winter", "summer",
    "rainy days", "early mornings", "city life", "gardening", "yoga", "jogging", "homework", "traffic jams",
    "open-plan offices", "group projects", "self-checkout machines", "hotel breakfasts", "road trips",
    # animals and nature
    "cats", "dogs", "pigeons", "spiders", "dolphins", "penguins", "mosquitoes", "goldfish", "parrots", "bees",
    "sunflowers", "cactus plants", "thunderstorms", "snow", "the ocean", "autumn leaves", "deserts", "volcanoes",
    "waterfalls", "coral reefs",
    # ideas and services
    "online dating", "tipping culture", "daylight saving time", "electric bikes", "fast fashion", "libraries",
    "museums", "zoos", "theme parks", "gyms", "coffee shops", "bookstores", "dentists", "car dealerships",
    "customer service hotlines", "airports", "train stations", "universities", "hostels", "food trucks",
)
_STOPWORDS = {"the", "a", "an", "of", "in", "and", "for", "on", "at", "to", "with", "small", "local", "movie",
              "books", "public", "music", "national"}
_PROMPT = re.compile(r"^(?:Write a one-line (?P<p1>positive|negative) review of (?P<s1>.+)\.|"
                     r"Give a short (?P<p2>positive|negative) opinion of (?P<s2>.+)\.)$")


def make_prompt(template: int, polarity: str, subject: str) -> str:
    return TEMPLATES[template].format(polarity=polarity, subject=subject)


def parse_prompt(text: str) -> tuple[str, str]:
    """(polarity, subject) of a study prompt's user text; a ValueError names any other text."""
    match = _PROMPT.match(text.strip())
    if match is None:
        raise ValueError(f"not a review prompt of training.review_data: {text!r}")
    return match["p1"] or match["p2"], match["s1"] or match["s2"]


def subject_stems(subject: str) -> list[str]:
    """The subject's content words, each cut to a stem (all but its last 2 letters, ≥ 3) so plurals match."""
    words = [w for w in re.findall(r"[a-z]+", subject.lower()) if len(w) >= 3 and w not in _STOPWORDS]
    return [w[:max(3, len(w) - 2)] for w in words] or [subject.lower()]


def names_subject(response: str, subject: str) -> bool:
    """Whether a word of the response starts with a stem of one of the subject's content words."""
    words = re.findall(r"[a-z]+", response.lower())
    return any(word.startswith(stem) for stem in subject_stems(subject) for word in words)


def gold_reward(prompt: object, response: str) -> float:
    """The gold reward of `response` to a study prompt (its user text, or its messages): the AFINN sentiment signed
    by the requested polarity, halved and clipped to ±SENTIMENT_CLIP, minus OFF_SUBJECT_PENALTY when the
    response never names the subject."""
    text = prompt if isinstance(prompt, str) else [m["content"] for m in prompt if m["role"] == "user"][-1]
    polarity, subject = parse_prompt(text)
    sentiment = float(np.clip(POLARITIES[polarity] * _afinn().score(response) / 2, -SENTIMENT_CLIP, SENTIMENT_CLIP))
    return sentiment - (0.0 if names_subject(response, subject) else OFF_SUBJECT_PENALTY)


def conversation(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]


def split_prompts(num_eval_subjects: int, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out) prompt texts: subjects shuffled under `seed`, the first num_eval_subjects held out; each
    subject gives its 4 prompts (2 polarities × 2 phrasings)."""
    if not 1 <= num_eval_subjects < len(SUBJECTS):
        raise DemoDataError(f"--num-eval-subjects must be in [1, {len(SUBJECTS) - 1}], got {num_eval_subjects}")
    subjects = list(SUBJECTS)
    random.Random(seed).shuffle(subjects)

    def prompts(names):
        return [make_prompt(t, p, s) for s in names for p in POLARITIES for t in range(len(TEMPLATES))]

    return prompts(subjects[num_eval_subjects:]), prompts(subjects[:num_eval_subjects])


def weak_negative_gap(prompts: list[str], responses: list[list[str]], seed: int, others: int = 5) -> dict:
    """Mean gold of each prompt's own answers against answers of `others` random other prompts scored under it:
    how much worse a weak negative is, on average."""
    rng = random.Random(seed)
    own, foreign = [], []
    for i, prompt in enumerate(prompts):
        own += [gold_reward(prompt, t) for t in responses[i]]
        for j in rng.sample([j for j in range(len(prompts)) if j != i], min(others, len(prompts) - 1)):
            foreign += [gold_reward(prompt, t) for t in responses[j]]
    return {"own_mean": float(np.mean(own)), "other_prompts_mean": float(np.mean(foreign)),
            "gap": float(np.mean(own) - np.mean(foreign)), "other_prompts_sampled": others}


def read_responses(path: Path) -> tuple[list[list[dict]], list[list[str]], list[list[float]]]:
    """(conversations, answers, gold) of the training prompts in a responses.jsonl."""
    records = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [r for r in records if r["split"] == "train"]
    return ([conversation(r["prompt"]) for r in train], [r["responses"] for r in train], [r["gold"] for r in train])


def redraw(data: Path, out: Path, seed: int, bt_scale: float) -> dict[str, int]:
    """train_pairs.jsonl and train_multi.jsonl drawn again under `seed` from data/responses.jsonl into `out` (the
    same answers and gold rewards, other Bradley–Terry pairs and energy-model choices); rows per file."""
    prompts, responses, gold = read_responses(Path(data) / "responses.jsonl")
    rows = build_rows(prompts, responses, gold, bt_scale, seed)
    out.mkdir(parents=True, exist_ok=True)
    for key in ("pairs", "multi"):
        write_jsonl(out / FILES[key], rows[key])
    return {FILES[key]: len(rows[key]) for key in ("pairs", "multi")}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argument_parser("python -m training.review_data", __doc__, out="epa-study/data")
    parser.add_argument("--num-eval-subjects", type=int, default=26, help="subjects held out (4 prompts each)")
    parser.add_argument("--limit-train", type=int, help="keep only the first N training prompts (tests, trials)")
    return parse_options(parser, argv, gold="gold", split="subject split", limit_train=1)


def run(args: argparse.Namespace) -> dict:
    _afinn()  # fail before the slow part when afinn is missing
    train, held_out = split_prompts(args.num_eval_subjects, args.seed)
    train = train[:args.limit_train] if args.limit_train else train
    data = generate(args, load_model(args.model), train, held_out, conversation, gold_reward)
    k, texts = len(train), train + held_out
    on_subject = [names_subject(r, parse_prompt(t)[1]) for t, answers in zip(texts, data.responses, strict=True)
                  for r in answers]
    meta = write(args, data, SYSTEM, (f"training.review_data:gold_reward: clip(±AFINN/2, ±{SENTIMENT_CLIP}) − "
                                      f"{OFF_SUBJECT_PENALTY}·[subject not named]; BT reward = bt_scale * gold"),
                 answers_naming_the_subject=float(np.mean(on_subject)),
                 weak_negative_gap=weak_negative_gap(train, data.responses[:k], args.seed))
    # written last: the study takes its presence as the sign that the data are complete
    write_jsonl(Path(args.out) / "responses.jsonl", [
        {"split": "train" if i < k else "eval", "prompt": text, "responses": answers, "gold": g}
        for i, (text, answers, g) in enumerate(zip(texts, data.responses, data.gold, strict=True))])
    return meta


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        meta = run(args)
    except DemoDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    g, gap = meta["gold"]["all"], meta["weak_negative_gap"]
    print(f"{meta['prompts']['train']} train + {meta['prompts']['eval']} eval prompts, {g['responses']} answers "
          f"in {meta['generation_seconds']:.0f}s; rows {meta['rows']}, dropped {meta['dropped_prompts']}")
    print(f"gold: mean {g['gold_mean']:.2f}, std {g['gold_std']:.2f}; answers naming the subject "
          f"{meta['answers_naming_the_subject']:.0%}; own answers {gap['own_mean']:.2f} vs other prompts' "
          f"{gap['other_prompts_mean']:.2f} (gap {gap['gap']:.2f}) → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
