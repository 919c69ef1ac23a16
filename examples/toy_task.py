"""A toy instruction task, generated offline from a seed: the data of the quickstart and of the
method comparison (benchmarks/compare_methods.py).

    python examples/toy_task.py runs/toy --seed 0 --num-train 4000 --num-test 250

Five task families in chat form. Three have exactly one right answer:
    arith    "What number comes after 3499?"       -> "3500"   (or "before": multi-digit
                                                               increment/decrement with carries)
    reverse  "Reverse the list: cat, sun, box"     -> "box, sun, cat"
    count    "How many words are in: dog cat dog?" -> "3"
and two have many, so that a teacher's soft distribution carries information beyond its argmax:
    name     "Name a fruit that starts with b."   -> any of banana, blackberry, blueberry
             (against a fixed lexicon; the training reply is one of them drawn at random)
    pick     "Pick a word that starts with s from: cat, sun, box, sea"  -> sun or sea

Every row is {"messages": [user, assistant], "answers": [accepted replies], "family": ...}; eval.py
scores exact match against `answers`. No prompt text appears twice, within or across the splits.
For `name`, the (category, letter) facts live in a fixed lexicon, so a held-out prompt asks a
known fact in a phrasing never seen with that (category, letter) in training; every other family
is compositional (new numbers and word lists).
"""

import argparse
import json
import random
from collections import Counter
from pathlib import Path

FAMILIES = ("arith", "reverse", "count", "name", "pick")
SINGLE_ANSWER = ("arith", "reverse", "count")

LEXICON = {
    "fruit": ["apple", "apricot", "avocado", "banana", "blackberry", "blueberry", "cherry",
              "coconut", "cranberry", "date", "fig", "grape", "guava", "kiwi", "lemon", "lime",
              "lychee", "mango", "melon", "nectarine", "olive", "orange", "papaya", "peach",
              "pear", "plum", "pineapple", "raspberry", "strawberry", "tangerine"],
    "animal": ["ant", "bear", "bee", "camel", "cat", "cow", "deer", "dog", "duck", "eagle",
               "eel", "fox", "frog", "goat", "goose", "horse", "hawk", "lion", "lynx", "mouse",
               "mole", "owl", "otter", "pig", "panda", "rabbit", "rat", "seal", "sheep", "snake",
               "tiger", "toad", "wolf", "whale"],
    "color": ["amber", "azure", "beige", "black", "blue", "brown", "coral", "crimson", "cyan",
              "gold", "gray", "green", "indigo", "ivory", "magenta", "maroon", "navy", "pink",
              "purple", "red", "rose", "ruby", "silver", "tan", "teal", "violet", "white"],
    "vegetable": ["bean", "beet", "broccoli", "cabbage", "carrot", "celery", "corn", "garlic",
                  "kale", "leek", "lettuce", "onion", "pea", "pepper", "potato", "pumpkin",
                  "radish", "spinach", "squash", "tomato", "turnip", "yam"],
    "country": ["austria", "australia", "brazil", "belgium", "canada", "chile", "china", "cuba",
                "egypt", "france", "finland", "germany", "greece", "india", "iran", "iraq",
                "italy", "japan", "jordan", "kenya", "mexico", "mali", "nepal", "norway", "peru",
                "poland", "spain", "sweden", "togo", "turkey"],
}

NAME_PHRASINGS = ("Name {article} {category} that starts with {letter}.",
                  "Give me {article} {category} beginning with the letter {letter}.",
                  "Which {category} starts with {letter}?")
# Openers and closers make every training prompt distinct (as prompts of a real instruction set
# are): sequence_level.py keeps one teacher completion per distinct prompt, so repeated prompts
# would shrink this family in its data and nowhere else.
NAME_OPENERS = ("", "Quick question: ", "Hi! ", "Please help. ", "Hello. ", "One more: ")
NAME_CLOSERS = ("", " One word, please.", " Just one.", " Any will do.", " Keep it short.")

# Short, common words for the list families (reverse, count, pick).
WORDS = ["cat", "dog", "sun", "box", "sea", "map", "cup", "hat", "pen", "key", "bus", "bed",
         "car", "egg", "ice", "jar", "kit", "leg", "net", "oil", "pot", "rug", "sky", "toy",
         "van", "web", "yak", "zip", "arm", "bag", "cow", "fan", "gum", "hut", "ink", "lid",
         "mud", "nut", "owl", "pig", "rod", "saw", "tin", "urn", "wax"]


def name_facts():
    """{(category, letter): sorted answers} for every pair with at least two answers."""
    facts = {}
    for category, words in LEXICON.items():
        by_letter = {}
        for word in words:
            by_letter.setdefault(word[0], []).append(word)
        for letter, answers in by_letter.items():
            if len(answers) >= 2:
                facts[(category, letter)] = sorted(answers)
    return facts


def _row(family, question, reply, answers):
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": reply}],
            "answers": answers, "family": family}


def make_arith(rng, max_digits):
    """n + 1 or n - 1 for a number of 2..max_digits digits; a third of them end in 9s (after) or
    0s (before), so carries and borrows across several digits are common."""
    digits = rng.randint(2, max_digits)
    number = rng.randrange(10 ** (digits - 1), 10 ** digits)
    after = rng.random() < 0.5
    if rng.random() < 1 / 3:
        run = rng.randint(1, digits - 1)
        number = number - number % 10 ** run + ((10 ** run - 1) if after else 0)
        if not after and number < 10:
            number += 10
    if after:
        return _row("arith", f"What number comes after {number}?", str(number + 1),
                    [str(number + 1)])
    return _row("arith", f"What number comes before {number}?", str(number - 1),
                [str(number - 1)])


def make_reverse(rng, max_words):
    words = rng.sample(WORDS, rng.randint(3, max_words))
    answer = ", ".join(reversed(words))
    return _row("reverse", "Reverse the list: " + ", ".join(words), answer, [answer])


def make_count(rng, max_words):
    words = [rng.choice(WORDS) for _ in range(rng.randint(2, max_words))]
    answer = str(len(words))
    return _row("count", f"How many words are in: {' '.join(words)}?", answer, [answer])


def make_pick(rng, max_words):
    """Two words of the list start with the letter asked for; the list has 4..max_words words."""
    by_letter = {}
    for word in WORDS:
        by_letter.setdefault(word[0], []).append(word)
    letter = rng.choice(sorted(letter for letter, words in by_letter.items() if len(words) >= 2))
    matching = rng.sample(by_letter[letter], 2)
    others = rng.sample([w for w in WORDS if w[0] != letter], rng.randint(2, max_words - 2))
    words = matching + others
    rng.shuffle(words)
    answers = sorted(matching)
    return _row("pick", f"Pick a word that starts with {letter} from: {', '.join(words)}",
                rng.choice(answers), answers)


def make_name(rng, prompt):
    """The row of one `prompt` (category, letter, phrasing, opener, closer), its reply drawn from
    the accepted answers."""
    category, letter, phrasing, opener, closer = prompt
    answers = name_facts()[(category, letter)]
    article = "an" if category[0] in "aeiou" else "a"
    question = NAME_OPENERS[opener] + NAME_PHRASINGS[phrasing].format(
        article=article, category=category, letter=letter) + NAME_CLOSERS[closer]
    return _row("name", question, rng.choice(answers), answers)


def split_name_prompts(rng):
    """(train prompts, test prompts), each shuffled: every (category, letter) has one phrasing
    that only the test split uses, in one prompt with a random opener and closer."""
    train, test = [], []
    for category, letter in sorted(name_facts()):
        held_out = rng.randrange(len(NAME_PHRASINGS))
        test.append((category, letter, held_out, rng.randrange(len(NAME_OPENERS)),
                     rng.randrange(len(NAME_CLOSERS))))
        train += [(category, letter, phrasing, opener, closer)
                  for phrasing in range(len(NAME_PHRASINGS)) if phrasing != held_out
                  for opener in range(len(NAME_OPENERS)) for closer in range(len(NAME_CLOSERS))]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def prompt_text(row):
    return row["messages"][0]["content"]


def generate_task(seed=0, num_train=10000, num_test=250, max_digits=4, reverse_words=4,
                  max_words=6):
    """(train rows, test rows); the same arguments always give the same rows.

    Families are interleaved round-robin, so every split holds them in equal shares (except that
    the test split has at most one `name` row per fact). Every prompt is distinct, within and
    across the splits.
    """
    train, test, _ = _generate(seed, num_train, num_test, 0, max_digits, reverse_words, max_words)
    return train, test


def generate_validation(num_val, seed=0, num_train=10000, num_test=250, max_digits=4,
                        reverse_words=4, max_words=6):
    """`num_val` rows for choosing hyper-parameters, disjoint from generate_task's train and test
    rows for the same arguments (which they leave unchanged: they are drawn after both).

    Their `name` prompts use training phrasings with an opener and closer no training row has.
    """
    return _generate(seed, num_train, num_test, num_val, max_digits, reverse_words, max_words)[2]


def _generate(seed, num_train, num_test, num_val, max_digits, reverse_words, max_words):
    if max_digits < 2 or reverse_words < 3 or max_words < 4:
        raise ValueError("max_digits must be >= 2, reverse_words >= 3 and max_words >= 4")
    rng = random.Random(seed)
    name_train, name_test = split_name_prompts(rng)
    makers = {
        "arith": lambda: make_arith(rng, max_digits),
        "reverse": lambda: make_reverse(rng, reverse_words),
        "count": lambda: make_count(rng, max_words),
        "pick": lambda: make_pick(rng, max_words),
    }

    test, test_prompts = [], set()
    # `name` has one held-out prompt per fact; once they are used up, the other families fill in.
    name_left = list(name_test)
    turn, attempts = 0, 0
    while len(test) < num_test:
        family = FAMILIES[turn % len(FAMILIES)]
        turn += 1
        if family == "name":
            if not name_left:
                continue
            row = make_name(rng, name_left.pop())
        else:
            row = makers[family]()
        attempts += 1
        if attempts > 100 * num_test:
            raise ValueError("could not draw enough distinct test prompts; lower num_test")
        if prompt_text(row) not in test_prompts:
            test_prompts.add(prompt_text(row))
            test.append(row)

    seen = set(test_prompts)
    train = _draw_rows(rng, makers, num_train, name_train, seen, "train")
    # Drawn after train from the same stream, so train and test do not depend on num_val.
    val = _draw_rows(rng, makers, num_val, name_train, seen, "val")
    return train, test, val


def _draw_rows(rng, makers, count, name_pool, seen, split):
    """`count` rows with prompts not in `seen` (which they join), families in turn; `name` rows
    take prompts from the end of `name_pool`."""
    rows, attempts = [], 0
    while len(rows) < count:
        family = FAMILIES[len(rows) % len(FAMILIES)]
        if family == "name":
            if not name_pool:
                raise ValueError(f"the name family has no distinct prompt left for the {split} "
                                 f"rows; lower num_{split}")
            row = make_name(rng, name_pool.pop())
        else:
            row = makers[family]()
        attempts += 1
        if attempts > 100 * count:
            raise ValueError(f"could not draw enough distinct {split} prompts; lower num_{split} "
                             f"or raise max_digits / max_words")
        if prompt_text(row) not in seen:
            seen.add(prompt_text(row))
            rows.append(row)
    return rows


def corpus(rows):
    """Every message text of `rows`: what the tokenizers are trained on."""
    for row in rows:
        for message in row["messages"]:
            yield message["content"]


def write_jsonl(path, rows):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_task(out_dir, **task):
    """Write train.jsonl, test.jsonl and test_<family>.jsonl into `out_dir`; returns the paths.

    `task` holds generate_task's keyword arguments."""
    out = Path(out_dir)
    train, test = generate_task(**task)
    paths = {"train": out / "train.jsonl", "test": out / "test.jsonl"}
    write_jsonl(paths["train"], train)
    write_jsonl(paths["test"], test)
    for family in FAMILIES:
        paths[f"test_{family}"] = out / f"test_{family}.jsonl"
        write_jsonl(paths[f"test_{family}"], [r for r in test if r["family"] == family])
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir",
                        help="directory for train.jsonl, test.jsonl, test_<family>.jsonl")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    parser.add_argument("--num-train", type=int, default=10000,
                        help="training rows (default 10000)")
    parser.add_argument("--num-test", type=int, default=250, help="held-out rows (default 250)")
    parser.add_argument("--max-digits", type=int, default=4,
                        help="longest number of `arith`, in digits (default 4)")
    parser.add_argument("--reverse-words", type=int, default=4,
                        help="longest list to reverse (default 4)")
    parser.add_argument("--max-words", type=int, default=6,
                        help="longest word list of count and pick (default 6)")
    cli = parser.parse_args()
    written = write_task(cli.out_dir, seed=cli.seed, num_train=cli.num_train,
                         num_test=cli.num_test, max_digits=cli.max_digits,
                         reverse_words=cli.reverse_words, max_words=cli.max_words)
    train_rows = read_jsonl(written["train"])
    print(f"wrote {len(train_rows)} train and {len(read_jsonl(written['test']))} test rows to "
          f"{cli.out_dir} ({dict(Counter(r['family'] for r in train_rows))})")
