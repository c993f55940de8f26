"""Build the EPA study's preference data offline, with a gold reward that depends on the prompt (or, as a control,
one that ignores it).

    python -m training.review_data --out epa-study/data      # SmolLM2-135M-Instruct, 520 prompts, CPU
    python -m training.review_data --out epa-study-sentiment/data --gold sentiment --answers-from epa-study/data

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

``--gold sentiment`` is the control: gold = clip(AFINN/2, ±3) whatever the prompt asked (`sentiment_reward`), so
an answer written for another prompt is, on average, as good as the prompt's own and weak negatives carry no
signal. ``--answers-from DATA`` generates nothing: it scores another data folder's answers under ``--gold``
(`rescore`); with the gold they were made with, it reproduces the folder's gold rewards exactly and adds what
meta.json lacks (the weak-negative gap against the prompt's own rejected answers).

Subjects, not prompts, are split: the held-out prompts ask about subjects no training prompt names. Every subject
gets 2 polarities × 2 phrasings = 4 prompts; the defaults give 456 training and 104 held-out prompts. Generation
takes ~10 min on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import datetime
import functools
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
    gold_stats,
    load_model,
    parse_options,
    ranked_rows,
    write,
    write_atomic,
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


@functools.lru_cache(maxsize=1 << 16)
def _sentiment(response: str) -> float:
    """AFINN/2 clipped to ±SENTIMENT_CLIP; cached: the weak-negative gap scores each answer under several prompts."""
    return float(np.clip(_afinn().score(response) / 2, -SENTIMENT_CLIP, SENTIMENT_CLIP))


def _user_text(prompt: object) -> str:
    return prompt if isinstance(prompt, str) else [m["content"] for m in prompt if m["role"] == "user"][-1]


def gold_reward(prompt: object, response: str) -> float:
    """The gold reward of `response` to a study prompt (its user text, or its messages): the AFINN sentiment signed
    by the requested polarity, halved and clipped to ±SENTIMENT_CLIP, minus OFF_SUBJECT_PENALTY when the
    response never names the subject."""
    polarity, subject = parse_prompt(_user_text(prompt))
    sentiment = POLARITIES[polarity] * _sentiment(response)  # clipping is symmetric: sign and clip commute
    return sentiment - (0.0 if names_subject(response, subject) else OFF_SUBJECT_PENALTY)


def sentiment_reward(prompt: object, response: str) -> float:
    """The control's gold reward: the AFINN sentiment of `response`, halved and clipped to ±SENTIMENT_CLIP, the same
    under every prompt (which must still be a study prompt: a ValueError names any other text)."""
    parse_prompt(_user_text(prompt))
    return _sentiment(response)


# --gold: the function and how meta.json describes it (the evaluation names the same functions: epa_study.arms.GOLD)
GOLDS = {"prompt": gold_reward, "sentiment": sentiment_reward}
GOLD_DESCRIPTIONS = {
    "prompt": (f"training.review_data:gold_reward: clip(±AFINN/2, ±{SENTIMENT_CLIP}) − "
               f"{OFF_SUBJECT_PENALTY}·[subject not named]; BT reward = bt_scale * gold"),
    "sentiment": (f"training.review_data:sentiment_reward: clip(AFINN/2, ±{SENTIMENT_CLIP}), whatever the prompt "
                  "asked; BT reward = bt_scale * gold")}


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


def weak_negative_gap(prompts: list[str], responses: list[list[str]], seed: int, others: int = 5,
                      gold=gold_reward) -> dict:
    """How much worse a weak negative is, on average, under `gold`: the mean gold of each prompt's own answers, of
    its own rejected answers (all but one of its best-gold ones: what the strong negatives are drawn from) and of the
    answers of `others` random other prompts scored under it; the gaps own − other and own rejected − other."""
    if len(prompts) != len(responses) or len(prompts) < 2:
        raise ValueError(f"weak_negative_gap needs ≥ 2 prompts, one answer list each; got {len(prompts)} prompts "
                         f"and {len(responses)} answer lists")
    rng = random.Random(seed)
    own, rejected, foreign = [], [], []
    for i, prompt in enumerate(prompts):
        scores = [gold(prompt, t) for t in responses[i]]
        own += scores
        rejected += scores[:int(np.argmax(scores))] + scores[int(np.argmax(scores)) + 1:]
        for j in rng.sample([j for j in range(len(prompts)) if j != i], min(others, len(prompts) - 1)):
            foreign += [gold(prompt, t) for t in responses[j]]
    own_mean, rejected_mean, other_mean = (float(np.mean(v)) for v in (own, rejected, foreign))
    return {"own_mean": own_mean, "other_prompts_mean": other_mean, "gap": own_mean - other_mean,
            "other_prompts_sampled": others, "own_rejected_mean": rejected_mean,
            "gap_vs_rejected": rejected_mean - other_mean}


def read_records(path: Path) -> list[dict]:
    """The records of a responses.jsonl: split, prompt (user text), responses, gold."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def read_responses(path: Path) -> tuple[list[list[dict]], list[list[str]], list[list[float]]]:
    """(conversations, answers, gold) of the training prompts in a responses.jsonl."""
    train = [r for r in read_records(path) if r["split"] == "train"]
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


def _data_folder(data: Path) -> tuple[Path, dict]:
    """(data, its meta.json) of a finished data folder; a clear error otherwise."""
    data = Path(data)
    missing = [name for name in ("responses.jsonl", "meta.json") if not (data / name).is_file()]
    if missing:
        raise DemoDataError(f"{data} is not a finished training.review_data folder: no {' or '.join(missing)}")
    return data, json.loads((data / "meta.json").read_text())


def gap_of(data: Path, gold: str) -> dict:
    """weak_negative_gap of a data folder's training prompts under the gold variant `gold` (its seed and sample
    size): the gap of an existing folder, without regenerating."""
    if gold not in GOLDS:
        raise DemoDataError(f"gold must be one of {sorted(GOLDS)}, got {gold!r}")
    data, meta = _data_folder(data)
    return _gap([r for r in read_records(data / "responses.jsonl") if r["split"] == "train"], meta, gold)


def _gap(train: list[dict], meta: dict, gold: str) -> dict:
    """weak_negative_gap of training records under `gold`, with the seed and sample size recorded in meta."""
    return weak_negative_gap([r["prompt"] for r in train], [r["responses"] for r in train], meta["seed"],
                             meta["weak_negative_gap"]["other_prompts_sampled"], GOLDS[gold])


def rescore(data: Path, out: Path, gold: str, bt_scale: float | None = None) -> dict:
    """Write into `out` the files of data folder `data` with its answers scored under the gold variant `gold`:
    responses.jsonl's gold, eval.jsonl's scores, the training files (drawn as `run` draws them) and meta.json
    (gold description, statistics, weak-negative gap); no generation. bt_scale: the source's when None. Returns
    meta. With the gold the answers were made with, every gold value and file is reproduced exactly."""
    if gold not in GOLDS:
        raise DemoDataError(f"gold must be one of {sorted(GOLDS)}, got {gold!r}")
    data, meta = _data_folder(data)
    out = Path(out)
    if out.resolve() == data.resolve():
        raise DemoDataError(f"rescore writes another folder: {out} is the source itself")
    if meta["system_prompt"] != SYSTEM:
        raise DemoDataError(f"{data} was made with another system prompt ({meta['system_prompt']!r})")
    scale = meta["options"]["bt_scale"] if bt_scale is None else bt_scale
    if not (np.isfinite(scale) and scale > 0):
        raise DemoDataError(f"bt_scale must be finite and > 0, got {scale}")
    records = read_records(data / "responses.jsonl")
    for r in records:
        r["gold"] = [GOLDS[gold](r["prompt"], t) for t in r["responses"]]
    train, held_out = ([r for r in records if r["split"] == split] for split in ("train", "eval"))
    rows = build_rows([conversation(r["prompt"]) for r in train], [r["responses"] for r in train],
                      [r["gold"] for r in train], scale, meta["seed"])
    rows["eval"] = ranked_rows([conversation(r["prompt"]) for r in held_out], [r["responses"] for r in held_out],
                               [r["gold"] for r in held_out], scale)
    out.mkdir(parents=True, exist_ok=True)
    for key, name in FILES.items():
        write_jsonl(out / name, rows[key])
    counts = {"train": len(train), "eval": len(held_out)}
    parts = {"train": train, "eval": held_out, "all": records}
    meta = {**meta, "options": {**meta["options"], "out": str(out), "bt_scale": scale, "gold": gold},
            "gold_reward": GOLD_DESCRIPTIONS[gold],
            "rows": {name: len(rows[key]) for key, name in FILES.items()},
            "dropped_prompts": {name: counts["eval" if key == "eval" else "train"] - len(rows[key])
                                for key, name in FILES.items()},
            "weak_negative_gap": _gap(train, meta, gold),
            "gold": {k: gold_stats([r["responses"] for r in v], [r["gold"] for r in v]) for k, v in parts.items()},
            "rescored": {"from": str(data), "gold": gold,
                         "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}}
    write_atomic(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    write_jsonl(out / "responses.jsonl", records)  # written last, as by `run`: the sign the folder is complete
    return meta


def parse_args(argv=None) -> argparse.Namespace:
    parser = argument_parser("python -m training.review_data", __doc__, out="epa-study/data")
    parser.add_argument("--num-eval-subjects", type=int, default=26, help="subjects held out (4 prompts each)")
    parser.add_argument("--limit-train", type=int, help="keep only the first N training prompts (tests, trials)")
    parser.add_argument("--gold", choices=list(GOLDS), default="prompt",
                        help="the gold reward: 'prompt' (signed by the requested polarity, the subject named) or "
                             "'sentiment' (the control: the answer's sentiment whatever the prompt asked)")
    parser.add_argument("--answers-from", help="generate nothing: score this data folder's answers under --gold "
                        "(its prompts, answers and generation options; only --gold and --bt-scale apply)")
    return parse_options(parser, argv, gold="gold", split="subject split", limit_train=1)


def run(args: argparse.Namespace) -> dict:
    _afinn()  # fail before the slow part when afinn is missing
    train, held_out = split_prompts(args.num_eval_subjects, args.seed)
    train = train[:args.limit_train] if args.limit_train else train
    data = generate(args, load_model(args.model), train, held_out, conversation, GOLDS[args.gold])
    k, texts = len(train), train + held_out
    on_subject = [names_subject(r, parse_prompt(t)[1]) for t, answers in zip(texts, data.responses, strict=True)
                  for r in answers]
    gap = weak_negative_gap(train, data.responses[:k], args.seed, gold=GOLDS[args.gold])
    meta = write(args, data, SYSTEM, GOLD_DESCRIPTIONS[args.gold],
                 answers_naming_the_subject=float(np.mean(on_subject)), weak_negative_gap=gap)
    # written last: the study takes its presence as the sign that the data are complete
    write_jsonl(Path(args.out) / "responses.jsonl", [
        {"split": "train" if i < k else "eval", "prompt": text, "responses": answers, "gold": g}
        for i, (text, answers, g) in enumerate(zip(texts, data.responses, data.gold, strict=True))])
    return meta


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        meta = rescore(args.answers_from, args.out, args.gold, args.bt_scale) if args.answers_from else run(args)
    except DemoDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    g, gap = meta["gold"]["all"], meta["weak_negative_gap"]
    made = (f"rescored under --gold {args.gold} from {args.answers_from}" if args.answers_from
            else f"in {meta['generation_seconds']:.0f}s")
    print(f"{meta['prompts']['train']} train + {meta['prompts']['eval']} eval prompts, {g['responses']} answers "
          f"{made}; rows {meta['rows']}, dropped {meta['dropped_prompts']}")
    print(f"gold: mean {g['gold_mean']:.2f}, std {g['gold_std']:.2f}; answers naming the subject "
          f"{meta['answers_naming_the_subject']:.0%}; own answers {gap['own_mean']:.2f}, own rejected "
          f"{gap['own_rejected_mean']:.2f} vs other prompts' {gap['other_prompts_mean']:.2f} (gap {gap['gap']:.2f}, "
          f"vs rejected {gap['gap_vs_rejected']:.2f}) → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
