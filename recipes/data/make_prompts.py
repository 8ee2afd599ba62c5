"""Builds recipes/data/{train,heldout}.jsonl: the default recipe's prompts, deterministic (seeded).

    python recipes/data/make_prompts.py

Five task types; the recipes' ``tasks:`` sections say how each gold answer is checked:
  fact      short factual questions (gold: the answer; metric contains)
  summary   one-sentence summary of a short paragraph (gold: the person's first name and the words the
            achievement cannot be told without; metric keywords, at most 30 words)
  formal    rewrite an informal sentence formally (no gold: scored by agreement with the teacher)
  extract   pull one entity out of a sentence (gold: the entity; metric exact, so an echo is wrong)
  classify  sentiment or topic label (gold: the label; metric label)
Held-out prompts use entities and sentences that never appear in train.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Russia": "Moscow", "Egypt": "Cairo",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Argentina": "Buenos Aires",
    "Peru": "Lima", "Chile": "Santiago", "Colombia": "Bogota", "Venezuela": "Caracas", "Cuba": "Havana",
    "Australia": "Canberra", "New Zealand": "Wellington", "Kenya": "Nairobi", "Nigeria": "Abuja",
    "Ghana": "Accra", "Ethiopia": "Addis Ababa", "Morocco": "Rabat", "Algeria": "Algiers", "Tunisia": "Tunis",
    "Greece": "Athens", "Turkey": "Ankara", "Iran": "Tehran", "Iraq": "Baghdad", "Syria": "Damascus",
    "Lebanon": "Beirut", "Israel": "Jerusalem", "Jordan": "Amman", "Saudi Arabia": "Riyadh",
    "Pakistan": "Islamabad", "Afghanistan": "Kabul", "Bangladesh": "Dhaka", "Nepal": "Kathmandu",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Indonesia": "Jakarta", "Philippines": "Manila",
    "Malaysia": "Kuala Lumpur", "South Korea": "Seoul", "North Korea": "Pyongyang", "Mongolia": "Ulaanbaatar",
    "Sweden": "Stockholm", "Norway": "Oslo", "Denmark": "Copenhagen", "Finland": "Helsinki",
    "Iceland": "Reykjavik", "Ireland": "Dublin", "United Kingdom": "London", "Netherlands": "Amsterdam",
    "Belgium": "Brussels", "Switzerland": "Bern", "Austria": "Vienna", "Poland": "Warsaw",
    "Czech Republic": "Prague", "Hungary": "Budapest", "Romania": "Bucharest", "Bulgaria": "Sofia",
    "Serbia": "Belgrade", "Croatia": "Zagreb", "Ukraine": "Kyiv", "Belarus": "Minsk", "Lithuania": "Vilnius",
    "Latvia": "Riga", "Estonia": "Tallinn", "Slovakia": "Bratislava", "Slovenia": "Ljubljana",
    "Albania": "Tirana", "Cyprus": "Nicosia", "Malta": "Valletta", "Luxembourg": "Luxembourg",
    "Uganda": "Kampala", "Tanzania": "Dodoma", "Zimbabwe": "Harare", "Zambia": "Lusaka", "Senegal": "Dakar",
    "Sudan": "Khartoum", "Libya": "Tripoli", "Qatar": "Doha", "Kuwait": "Kuwait City", "Oman": "Muscat",
    "Yemen": "Sanaa", "Sri Lanka": "Colombo", "Myanmar": "Naypyidaw", "Cambodia": "Phnom Penh",
    "Laos": "Vientiane", "Singapore": "Singapore", "Uzbekistan": "Tashkent", "Kazakhstan": "Astana",
    "Georgia": "Tbilisi", "Armenia": "Yerevan", "Azerbaijan": "Baku", "Ecuador": "Quito", "Bolivia": "Sucre",
    "Uruguay": "Montevideo", "Paraguay": "Asuncion", "Panama": "Panama City", "Jamaica": "Kingston",
    "Costa Rica": "San Jose", "Honduras": "Tegucigalpa", "Guatemala": "Guatemala City",
}
CONTINENT = {
    "Europe": ["France", "Germany", "Italy", "Spain", "Portugal", "Greece", "Sweden", "Norway", "Denmark",
               "Finland", "Ireland", "Netherlands", "Belgium", "Switzerland", "Austria", "Poland", "Hungary",
               "Romania", "Bulgaria", "Serbia", "Croatia", "Ukraine", "Iceland", "Estonia", "Latvia"],
    "Asia": ["Japan", "China", "India", "Thailand", "Vietnam", "Indonesia", "Philippines", "Malaysia",
             "South Korea", "Mongolia", "Nepal", "Bangladesh", "Pakistan", "Sri Lanka", "Cambodia", "Laos"],
    "Africa": ["Egypt", "Kenya", "Nigeria", "Ghana", "Ethiopia", "Morocco", "Algeria", "Uganda", "Tanzania",
               "Zimbabwe", "Zambia", "Senegal", "Sudan", "Libya", "Tunisia"],
    "South America": ["Brazil", "Argentina", "Peru", "Chile", "Colombia", "Venezuela", "Ecuador", "Bolivia",
                      "Uruguay", "Paraguay"],
    "North America": ["Canada", "Mexico", "Cuba", "Jamaica", "Panama", "Honduras", "Guatemala", "Costa Rica"],
}
ELEMENTS = {
    "hydrogen": "H", "helium": "He", "lithium": "Li", "carbon": "C", "nitrogen": "N", "oxygen": "O",
    "fluorine": "F", "neon": "Ne", "sodium": "Na", "magnesium": "Mg", "aluminium": "Al", "silicon": "Si",
    "phosphorus": "P", "sulfur": "S", "chlorine": "Cl", "argon": "Ar", "potassium": "K", "calcium": "Ca",
    "iron": "Fe", "copper": "Cu", "zinc": "Zn", "silver": "Ag", "gold": "Au", "tin": "Sn", "lead": "Pb",
    "mercury": "Hg", "uranium": "U", "nickel": "Ni", "cobalt": "Co", "platinum": "Pt", "iodine": "I",
    "titanium": "Ti", "chromium": "Cr", "manganese": "Mn", "tungsten": "W", "bromine": "Br",
}
FACTS_MISC = [
    ("How many days are in a week?", "7"), ("How many legs does a spider have?", "8"),
    ("How many continents are there?", "7"), ("What is the largest planet in the solar system?", "Jupiter"),
    ("What planet is known as the Red Planet?", "Mars"), ("What is the boiling point of water in Celsius?", "100"),
    ("How many minutes are in an hour?", "60"), ("What is the freezing point of water in Celsius?", "0"),
    ("What gas do plants absorb from the air?", "carbon dioxide"), ("How many hours are in a day?", "24"),
    ("What is the largest ocean on Earth?", "Pacific"), ("What is the closest star to Earth?", "Sun"),
    ("How many sides does a triangle have?", "3"), ("How many sides does a hexagon have?", "6"),
    ("What is the longest river in Africa?", "Nile"), ("How many months are in a year?", "12"),
    ("What do bees make?", "honey"), ("What is the tallest animal in the world?", "giraffe"),
    ("What is the largest mammal?", "whale"), ("How many players are on a soccer team on the field?", "11"),
]

FIRST = ["Maria", "James", "Aisha", "Kenji", "Lucia", "Omar", "Sofia", "Daniel", "Priya", "Lukas", "Chen",
         "Fatima", "Noah", "Elena", "Mateo", "Hana", "Ivan", "Grace", "Samuel", "Leila", "Tomas", "Nadia",
         "Oliver", "Yuki", "Amara", "Pedro", "Ingrid", "Rahul", "Zoe", "Mohammed", "Clara", "Felix", "Ana",
         "Victor", "Mei", "Hugo", "Sara", "Diego", "Emma", "Karim"]
LAST = ["Garcia", "Smith", "Khan", "Tanaka", "Rossi", "Haddad", "Novak", "Brown", "Patel", "Weber", "Wang",
        "Ali", "Johnson", "Petrova", "Silva", "Kim", "Ivanov", "Taylor", "Okafor", "Nasser", "Berg", "Costa",
        "Muller", "Sato", "Mensah", "Lopez", "Larsen", "Gupta", "Martin", "Hassan"]
CITIES = ["Lisbon", "Toronto", "Osaka", "Nairobi", "Lyon", "Krakow", "Austin", "Seville", "Melbourne", "Dublin",
          "Hamburg", "Porto", "Denver", "Mumbai", "Cairo", "Oslo", "Vienna", "Chicago", "Lagos", "Seoul",
          "Boston", "Milan", "Zurich", "Manila", "Lima", "Athens", "Helsinki", "Prague", "Quito", "Perth"]
JOBS = ["teacher", "nurse", "engineer", "chef", "farmer", "pilot", "baker", "librarian", "architect", "doctor",
        "painter", "mechanic", "scientist", "journalist", "firefighter", "gardener", "musician", "carpenter"]
# Each achievement with the words a summary of it must keep ('|' separates alternatives): a summary's gold is
# the person's first name and these, so restating the first sentence ("X is a nurse from Y") is not a summary.
ACHIEVEMENTS = {
    "opened a small bakery that now sells bread to the whole neighbourhood": "bakery|bread",
    "built a community garden on an empty lot behind the train station": "garden",
    "ran a marathon to raise money for the local children's hospital": "marathon",
    "won a regional prize for a design of a low-cost water filter": "filter",
    "started a free evening class that teaches adults to read": "class|classes|read|reading",
    "repaired more than a hundred old bicycles and gave them to students": "bicycles|bicycle|bikes",
    "organised a festival that brought music to every park in the city": "festival",
    "planted two thousand trees along the river with a group of volunteers": "trees",
    "wrote a cookbook of family recipes collected from the whole street": "cookbook|recipes",
    "designed an app that helps farmers share tractors and tools": "app",
    "cleaned up the beach every weekend for a year with friends": "beach",
    "founded a choir for older people who live alone": "choir",
}
DETAILS = [
    "Local newspapers wrote about the project, and the mayor visited last spring.",
    "Neighbours say the project changed how people in the area talk to each other.",
    "The idea started as a weekend hobby and grew over three years.",
    "Several other towns have since asked for advice on doing the same.",
    "Funding came from small donations rather than from any large company.",
    "The work was done mostly in the evenings after a full day of work.",
]

INFORMAL = [
    "hey, can u send me the report asap?", "gonna be late, traffic is crazy", "that meeting was kinda pointless",
    "thx for the help yesterday, u rock", "we need to fix this bug like right now", "can't make it tomorrow, sorry",
    "the new boss is super chill", "lemme know if u need anything", "this price is way too high for us",
    "i dunno why the server keeps crashing", "the party was awesome, u missed out", "pls don't forget the keys",
    "we're outta coffee again", "ur idea is pretty cool actually", "i'm totally swamped this week",
    "the train got cancelled so i'm stuck", "grab some snacks on ur way", "the client is kinda mad at us",
    "wanna grab lunch later?", "the wifi here is super slow", "just checking if u got my email",
    "no worries, we'll sort it out", "the deadline got pushed, yay", "my laptop died in the middle of the call",
    "can we move the call to friday?", "the hotel was a total dump", "i'll ping u when i'm done",
    "that movie was so boring lol", "we gotta cut costs somehow", "ur package is gonna arrive late",
    "the printer's broken again, ugh", "gimme a sec to find the file", "the food there is really good tbh",
    "did u see the new numbers? they're bad", "i'm gonna take friday off", "the kids loved the trip",
    "sorry for the mess in the kitchen", "we're running outta time here", "the test results look kinda weird",
    "can u double check the invoice?", "my flight got delayed like three hours", "the app keeps logging me out",
    "we should totally hire her", "the rent went up again, crazy", "i forgot my password again lol",
    "the game last night was insane", "pls call me back when u can", "the new phone is kinda pricey",
    "we're done for today, see ya", "the shop closes early on sundays",
]

POSITIVE = [
    "The {x} arrived early and works perfectly.", "I love this {x}; it is the best I have ever owned.",
    "Great {x}, friendly staff, and a fair price.", "The {x} exceeded every expectation I had.",
    "Absolutely wonderful {x}, I would buy it again.", "This {x} made my mornings so much easier.",
    "Excellent quality {x} and fast delivery.", "The {x} is beautiful and very comfortable.",
]
NEGATIVE = [
    "The {x} broke after two days.", "I regret buying this {x}; it is a waste of money.",
    "Terrible {x}, rude staff, and a long wait.", "The {x} stopped working and support never replied.",
    "Awful {x}, I want a refund.", "This {x} is cheaply made and uncomfortable.",
    "The {x} arrived damaged and late.", "Worst {x} I have ever used.",
]
PRODUCTS = ["blender", "laptop", "chair", "jacket", "headphones", "coffee maker", "backpack", "lamp", "phone",
            "kettle", "mattress", "printer", "bicycle", "watch", "camera", "tent", "vacuum cleaner", "desk",
            "restaurant", "hotel room"]
TOPICS = {
    "sports": ["The striker scored twice as {c} won the final.", "The tennis match in {c} went to five sets.",
               "A new record was set at the swimming championship in {c}.",
               "The coach praised the defence after the derby in {c}."],
    "technology": ["A start-up in {c} released a faster battery for phones.",
                   "Engineers in {c} tested a new chip that uses less power.",
                   "The software update fixed a security flaw found by researchers in {c}.",
                   "A robot built in {c} can now sort recycling by itself."],
    "food": ["A bakery in {c} is famous for its sourdough bread.", "The new restaurant in {c} serves spicy noodles.",
             "Chefs in {c} held a contest for the best tomato soup.",
             "A market in {c} sells fresh cheese every Saturday."],
    "politics": ["The parliament in {c} voted on a new tax law.", "The mayor of {c} announced an election date.",
                 "Ministers met in {c} to discuss a trade agreement.",
                 "Voters in {c} will decide on the new budget next month."],
}
COMPANIES = ["Northwind", "Bluepeak", "Solvera", "Quantix", "Greenfield Labs", "Harbor Foods", "Atlas Motors",
             "Brightwave", "Cedar Systems", "Orbitel", "Pinecrest Bank", "Riverstone", "Lumina Health",
             "Ironclad Tools", "Silverline Air"]
EXTRACT_TEMPLATES = [
    ("person", "Extract the person's full name from this sentence: \"{s}\" Answer with the name only.",
     ["Yesterday {p} signed the contract in {c}.", "The award went to {p}, a {j} from {c}.",
      "According to {p}, the bridge in {c} will reopen soon.", "In {c}, {p} presented the new plan to {o}."]),
    ("city", "Which city is mentioned in this sentence? \"{s}\" Answer with the city only.",
     ["{p} moved to {c} last year to work for {o}.", "{o} opened a new office in {c} this week.",
      "The conference in {c} was attended by {p}.", "After the storm, {c} asked {o} for help."]),
    ("company", "Extract the company name from this sentence: \"{s}\" Answer with the company name only.",
     ["{o} hired {p} as its new {j} in {c}.", "Shares of {o} rose after {p} spoke in {c}.",
      "{p} said {o} will build a factory near {c}.", "A {j} from {c} sued {o} over unpaid wages."]),
]


def _facts(rng: random.Random) -> list[dict]:
    items = []
    for country, capital in CAPITALS.items():
        q = rng.choice(["What is the capital of {x}?", "Name the capital city of {x}.", "Which city is the capital of {x}?"])
        items.append(("fact", q.format(x=country), capital, f"capital:{country}"))
    for cont, countries in CONTINENT.items():
        for country in countries:
            items.append(("fact", f"On which continent is {country}? Answer with the continent only.", cont, f"continent:{country}"))
    for el, sym in ELEMENTS.items():
        items.append(("fact", f"What is the chemical symbol for {el}?", sym, f"element:{el}"))
    for q, a in FACTS_MISC:
        items.append(("fact", q, a, f"misc:{q}"))
    return items


def _summaries(rng: random.Random, n: int) -> list[dict]:
    items, seen = [], set()
    while len(items) < n:
        p = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        c, j, a, d = rng.choice(CITIES), rng.choice(JOBS), rng.choice(sorted(ACHIEVEMENTS)), rng.choice(DETAILS)
        if (p, a) in seen:
            continue
        seen.add((p, a))
        text = f"{p} is a {j} from {c}. Last year, {p.split()[0]} {a}. {d}"
        gold = f"{p.split()[0]}; {ACHIEVEMENTS[a]}"
        items.append(("summary", f"Summarize the following text in one sentence.\n\n{text}", gold, f"summary:{p}:{a}"))
    return items


def _formal(rng: random.Random) -> list[dict]:
    asks = ["Rewrite this message in a formal, professional tone: ", "Make this sentence formal: ",
            "Rewrite the following in polite business English: "]
    openers = ["", "hey, ", "ok so ", "btw ", "hi all, "]
    closers = ["", " lol", " thx", "!!", " pls"]
    items = []
    for s in INFORMAL:  # four variants of each sentence; the sentence is the split group
        combos = rng.sample([(a, o, c) for a in asks for o in openers for c in closers], 4)
        items += [("formal", a + f"\"{o}{s}{c}\"", None, s) for a, o, c in combos]
    return items


def _extract(rng: random.Random, n: int) -> list[dict]:
    items, seen = [], set()
    while len(items) < n:
        kind, ask, sents = rng.choice(EXTRACT_TEMPLATES)
        p = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        c, o, j = rng.choice(CITIES), rng.choice(COMPANIES), rng.choice(JOBS)
        s = rng.choice(sents).format(p=p, c=c, o=o, j=j)
        if s in seen:
            continue
        seen.add(s)
        gold = {"person": p, "city": c, "company": o}[kind]
        items.append(("extract", ask.format(s=s), gold, f"extract:{s}"))
    return items


def _classify(rng: random.Random, n: int) -> list[dict]:
    items, seen = [], set()
    while len(items) < n:
        if rng.random() < 0.5:
            label = rng.choice(["positive", "negative"])
            s = rng.choice(POSITIVE if label == "positive" else NEGATIVE).format(x=rng.choice(PRODUCTS))
            prompt = f"Classify the sentiment of this review as positive or negative. Answer with one word.\n\nReview: {s}"
        else:
            label = rng.choice(sorted(TOPICS))
            s = rng.choice(TOPICS[label]).format(c=rng.choice(CITIES))
            prompt = ("Classify the topic of this headline as sports, technology, food, or politics. Answer with one "
                      f"word.\n\nHeadline: {s}")
        if prompt in seen:
            continue
        seen.add(prompt)
        items.append(("classify", prompt, label, f"classify:{prompt}"))
    return items


# Held-out prompts per task: 60 for each task with gold answers, so that a student that keeps about what the
# teacher has is judged within about +-0.1 of retention (docs/evaluation.md); 24 for formal, which has no gold
# answer and is reported, never gated.
HELDOUT = {"fact": 60, "summary": 60, "extract": 60, "classify": 60, "formal": 24}


def build(seed: int = 1234, heldout_per_task: dict[str, int] | None = None) -> tuple[list[dict], list[dict]]:
    heldout_per_task = heldout_per_task or HELDOUT
    rng = random.Random(seed)
    pools = {
        "fact": _facts(rng),
        "summary": _summaries(rng, 260),
        "formal": _formal(rng),
        "extract": _extract(rng, 300),
        "classify": _classify(rng, 260),
    }
    train, heldout = [], []
    for task, items in pools.items():
        # Split by group (a country, a sentence...) so no held-out group is ever seen in training.
        groups = sorted({g for *_, g in items})
        rng.shuffle(groups)
        held_groups: set[str] = set()
        for g in groups:
            if sum(1 for *_, gg in items if gg in held_groups) >= heldout_per_task[task]:
                break
            held_groups.add(g)
        for t, prompt, gold, g in items:
            (heldout if g in held_groups else train).append({"task": t, "prompt": prompt, "gold": gold})
    for split, rows in (("train", train), ("heldout", heldout)):
        rng.shuffle(rows)
        for i, row in enumerate(rows):
            row["id"] = f"{split}-{i:05d}"
    return train, heldout


def main() -> None:
    train, heldout = build()
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    for name, rows in (("train", train), ("heldout", heldout)):
        with open(HERE / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps({"id": r["id"], "task": r["task"], "prompt": r["prompt"], "gold": r["gold"]},
                                    ensure_ascii=False) + "\n")
        counts = {}
        for r in rows:
            counts[r["task"]] = counts.get(r["task"], 0) + 1
        print(name, len(rows), counts)


if __name__ == "__main__":
    main()
