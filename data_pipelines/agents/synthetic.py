"""A synthetic multi-hop QA world for CPU search-agent runs, deterministic from a seed.

    world = make_world(seed=0, entities=200)
    write_world("runs/world", seed=0)     # corpus.jsonl (wiki-18), train.jsonl + test.jsonl (QA), world.json

**Entities** have made-up names built from syllables (unique across the world): countries, cities,
people (first + last name), companies and products (a name + a model number). **Relations** (each subject
has exactly one object per relation it carries)::

    city     located_in        country
    person   born_in           city
    company  founded_by        person
    company  headquartered_in  city
    product  made_by           company

**Passages** (the wiki-18 format, ``corpus.Passage``): every entity has one *main* passage, titled with
its name, stating all of its relations in short English sentences (paraphrases drawn from a few
templates) plus non-relational filler (years, sizes). People and companies also get a *profile* passage
under the same title that names a *different* city ("moved to", "opened an office in"), a near-miss for
the relation questions. **Distractors** are homonym passages ("Zorvik (river)": the name of an entity used
for a river, festival, ship ...) and news passages naming a few random entities without stating any
relation. Passage ids are ``"0" .. "N-1"`` in a seeded shuffle (their order tells nothing).

**Questions** follow relation paths from a subject, one search per hop, e.g. 3 hops::

    "In which country was the founder of Zorvik born?"
        Zorvik --founded_by--> Tavi Morek --born_in--> Lunaro --located_in--> Velmoria

``TEMPLATES`` lists the 13 paths (5 one-hop, 5 two-hop, 3 three-hop). ``supporting_passages`` holds the
main passage of the entity at each hop, in order: hop ``i``'s passage states the relation that leads to
the next entity and contains its name, so the last one contains the answer. ``golden_answers`` is the
answer's name (countries also "Republic of NAME", named in their passage). Each split has about
``questions / 3`` questions per hop count (fewer when the world has fewer distinct ones; half of the
candidates at most go to each split); train and test share no question.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import random
from typing import Any

from data_pipelines.agents.corpus import Passage, write_passages
from data_pipelines.agents.qa import QARecord, write_qa

KINDS = ("country", "city", "person", "company", "product")
SHARES = {"country": 0.04, "city": 0.16, "person": 0.25, "company": 0.25}  # product: the rest
RELATIONS = {
    "located_in": ("city", "country"),
    "born_in": ("person", "city"),
    "founded_by": ("company", "person"),
    "headquartered_in": ("company", "city"),
    "made_by": ("product", "company"),
}
TEMPLATES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("located_in",), "In which country is {x}?"),
    (("born_in",), "In which city was {x} born?"),
    (("headquartered_in",), "In which city is {x} headquartered?"),
    (("founded_by",), "Who founded {x}?"),
    (("made_by",), "Which company makes {x}?"),
    (("born_in", "located_in"), "In which country was {x} born?"),
    (("headquartered_in", "located_in"), "In which country is {x} headquartered?"),
    (("founded_by", "born_in"), "In which city was the founder of {x} born?"),
    (("made_by", "founded_by"), "Who founded the company that makes {x}?"),
    (("made_by", "headquartered_in"), "In which city is the maker of {x} headquartered?"),
    (("founded_by", "born_in", "located_in"), "In which country was the founder of {x} born?"),
    (("made_by", "founded_by", "born_in"), "In which city was the founder of the company that makes {x} born?"),
    (("made_by", "headquartered_in", "located_in"), "In which country is the maker of {x} headquartered?"),
)
SENTENCES = {
    "located_in": ("{s} is a city in {o}.", "{s} lies in {o}.", "The city of {s} is located in {o}."),
    "born_in": ("{s} was born in {o}.", "{s} is a native of {o}.", "{s} was born and raised in {o}."),
    "founded_by": ("{s} was founded by {o}.", "{o} founded {s}.", "{s} was started by {o}."),
    "headquartered_in": ("{s} is headquartered in {o}.", "The headquarters of {s} are in {o}.",
                         "{s} has its head office in {o}."),
    "made_by": ("{s} is made by {o}.", "{s} is manufactured by {o}.", "{o} produces the {s}."),
}
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ou")
_CODAS = ("", "", "", "n", "r", "l", "k", "s", "m", "x")
_COUNTRY_ENDINGS = ("ia", "land", "ora", "stan", "esh")
_PROFESSIONS = ("engineer", "painter", "chemist", "architect", "economist", "composer", "physician", "pilot")
_INDUSTRIES = ("software", "shipping", "textile", "mining", "robotics", "food", "energy", "toy")
_CATEGORIES = ("phone", "bicycle", "kettle", "drone", "camera", "tractor", "lamp", "guitar")
_HOMONYMS = ("river", "festival", "ship", "mountain", "novel", "song", "comet", "dance")


@dataclasses.dataclass(frozen=True)
class Entity:
    id: str  # "<kind>_<n>"
    kind: str
    name: str
    aliases: tuple[str, ...] = ()


@dataclasses.dataclass
class World:
    """``facts[(subject id, relation)] = object id``; ``main_passage[entity id] = passage id``."""

    seed: int
    entities: dict[str, Entity]
    facts: dict[tuple[str, str], str]
    passages: list[Passage]
    main_passage: dict[str, str]
    questions: dict[str, list[QARecord]]

    def summary(self) -> dict[str, Any]:
        counts = {k: sum(e.kind == k for e in self.entities.values()) for k in KINDS}
        hops = {s: {h: sum(q.hops == h for q in qs) for h in (1, 2, 3)} for s, qs in self.questions.items()}
        return {"seed": self.seed, "entities": len(self.entities), "per_kind": counts, "facts": len(self.facts),
                "passages": len(self.passages), "questions": {s: len(q) for s, q in self.questions.items()},
                "questions_per_hop": hops}


# ----------------------------------------------------------------------------- names and entities


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


def _unique(rng: random.Random, used: set[str], make) -> str:
    for _ in range(1000):
        name = make()
        if name not in used and name.lower() not in {"a", "an", "the"}:
            used.add(name)
            return name
    raise RuntimeError("could not draw a unique name (too many entities for the syllable space)")


def _name(rng: random.Random, kind: str, used: set[str], stems: set[str]) -> str:
    """A unique name of ``kind``; stems (single words) are unique too, so a name's words point to it."""
    def stem(syl: tuple[int, int]) -> str:
        return _unique(rng, stems, lambda: _word(rng, rng.randint(*syl)).capitalize())

    if kind == "country":
        return _unique(rng, used, lambda: stem((1, 2)) + rng.choice(_COUNTRY_ENDINGS))
    if kind == "person":
        return _unique(rng, used, lambda: f"{stem((1, 2))} {stem((2, 2))}")
    if kind == "product":
        return _unique(rng, used, lambda: f"{stem((2, 2))} {rng.randint(2, 99) * 10}")
    return _unique(rng, used, lambda: stem((2, 2)))


def entity_counts(entities: int) -> dict[str, int]:
    """How many entities of each kind a world of ``entities`` holds (at least 2 of each)."""
    if entities < 10:
        raise ValueError(f"a world needs at least 10 entities, got {entities}")
    n = {k: max(2, round(entities * f)) for k, f in SHARES.items()}
    n["product"] = max(2, entities - sum(n.values()))
    return n


def _entities(rng: random.Random, entities: int) -> dict[str, Entity]:
    used: set[str] = set()
    stems: set[str] = set()
    out = {}
    for kind, count in entity_counts(entities).items():
        for i in range(count):
            name = _name(rng, kind, used, stems)
            aliases = (f"Republic of {name}",) if kind == "country" else ()
            out[f"{kind}_{i}"] = Entity(f"{kind}_{i}", kind, name, aliases)
    return out


def _facts(rng: random.Random, ents: dict[str, Entity]) -> dict[tuple[str, str], str]:
    by_kind = {k: [e.id for e in ents.values() if e.kind == k] for k in KINDS}
    facts = {}
    for rel, (subj, obj) in RELATIONS.items():
        objects = by_kind[obj]
        for i, s in enumerate(by_kind[subj]):
            # every object used at least once where there are enough subjects, the rest at random
            facts[(s, rel)] = objects[i] if i < len(objects) else rng.choice(objects)
    return facts


# ----------------------------------------------------------------------------- passages


def _main_text(rng: random.Random, e: Entity, ents: dict[str, Entity], facts: dict) -> str:
    name = e.name
    lead = {
        "country": f"{name} (officially the Republic of {name}) is a country with about "
                   f"{rng.randint(2, 90)} million people.",
        "city": f"{name} has about {rng.randint(20, 900) * 1000} inhabitants.",
        "person": f"{name} is a {rng.choice(_PROFESSIONS)}.",
        "company": f"{name} is a {rng.choice(_INDUSTRIES)} company established in {rng.randint(1890, 2015)}.",
        "product": f"The {name} is a {rng.choice(_CATEGORIES)} first sold in {rng.randint(1970, 2020)}.",
    }[e.kind]
    sentences = [rng.choice(SENTENCES[rel]).format(s=name, o=ents[facts[(e.id, rel)]].name)
                 for rel, (subj, _) in RELATIONS.items() if subj == e.kind]
    rng.shuffle(sentences)
    text = " ".join([lead, *sentences])
    return text[0].upper() + text[1:]


def _profile_text(rng: random.Random, e: Entity, ents: dict[str, Entity], facts: dict, cities: list[str]) -> str:
    own = facts[(e.id, "born_in" if e.kind == "person" else "headquartered_in")]
    other = ents[rng.choice([c for c in cities if c != own])].name
    year = rng.randint(1950, 2020)
    if e.kind == "person":
        return f"In {year} {e.name} moved to {other}, where {e.name.split()[0]} worked for {rng.randint(3, 30)} years."
    return f"In {year} {e.name} opened an office in {other} with {rng.randint(10, 500)} employees."


def _homonym(rng: random.Random, e: Entity, ents: dict[str, Entity], countries: list[str]) -> Passage:
    word = e.name.split()[0] if e.kind in ("person", "product") else e.name
    thing = rng.choice(_HOMONYMS)
    where = ents[rng.choice(countries)].name
    return Passage("", f"{word} ({thing})",
                   f"{word} is also the name of a {thing} in {where}. It is mentioned in records from "
                   f"{rng.randint(1700, 1990)}.")


def _news(rng: random.Random, ents: dict[str, Entity]) -> Passage:
    a, b, c = (ents[i].name for i in rng.sample(sorted(ents), 3))
    year = rng.randint(1990, 2023)
    return Passage("", f"News {year}", f"In {year} a report compared {a} and {b}. Later that year {c} was "
                                       f"discussed at a conference.")


def _passages(rng: random.Random, ents: dict[str, Entity], facts: dict, distractors: int
              ) -> tuple[list[Passage], dict[str, str]]:
    cities = [i for i, e in ents.items() if e.kind == "city"]
    countries = [i for i, e in ents.items() if e.kind == "country"]
    drafts: list[tuple[str | None, Passage]] = []  # (entity id of a main passage, passage)
    for e in ents.values():
        drafts.append((e.id, Passage("", e.name, _main_text(rng, e, ents, facts))))
        if e.kind in ("person", "company"):
            drafts.append((None, Passage("", e.name, _profile_text(rng, e, ents, facts, cities))))
    pool = sorted(ents)
    for i in range(distractors):
        p = _homonym(rng, ents[rng.choice(pool)], ents, countries) if i % 2 == 0 else _news(rng, ents)
        drafts.append((None, p))
    rng.shuffle(drafts)
    passages, main = [], {}
    for i, (eid, p) in enumerate(drafts):
        passages.append(p._replace(id=str(i)))
        if eid is not None:
            main[eid] = str(i)
    return passages, main


# ----------------------------------------------------------------------------- questions


def _chain(subject: str, path: tuple[str, ...], facts: dict) -> list[str] | None:
    chain = [subject]
    for rel in path:
        nxt = facts.get((chain[-1], rel))
        if nxt is None:
            return None
        chain.append(nxt)
    return chain


def _candidates(ents: dict[str, Entity], facts: dict, main: dict[str, str]) -> dict[int, list[QARecord]]:
    out: dict[int, list[QARecord]] = {1: [], 2: [], 3: []}
    for t, (path, template) in enumerate(TEMPLATES):
        subj_kind = RELATIONS[path[0]][0]
        for e in ents.values():
            chain = _chain(e.id, path, facts) if e.kind == subj_kind else None
            if chain is None:
                continue
            answer = ents[chain[-1]]
            out[len(path)].append(QARecord(
                id="", question=template.format(x=e.name), golden_answers=(answer.name, *answer.aliases),
                hops=len(path), supporting_passages=tuple(main[c] for c in chain[:-1]),
                metadata={"template": t, "relations": list(path), "chain": [ents[c].name for c in chain]}))
    return out


def _split_questions(rng: random.Random, cands: dict[int, list[QARecord]], questions: int
                     ) -> dict[str, list[QARecord]]:
    splits: dict[str, list[QARecord]] = {"train": [], "test": []}
    for hops, qs in sorted(cands.items()):
        qs = list(qs)
        rng.shuffle(qs)
        take = min(-(-questions // 3), len(qs) // 2)
        splits["train"] += qs[:take]
        splits["test"] += qs[take:2 * take]
    for name, qs in splits.items():
        rng.shuffle(qs)
        splits[name] = [dataclasses.replace(q, id=f"{name}_{i}") for i, q in enumerate(qs)]
    return splits


# ----------------------------------------------------------------------------- the world


def make_world(seed: int = 0, entities: int = 200, *, distractors: int | None = None,
               questions: int = 200) -> World:
    """The world of ``seed``: ``entities`` entities, ``distractors`` distractor passages (default
    ``1.5 * entities``) and about ``questions`` questions per split, a third per hop count."""
    if questions < 3:
        raise ValueError(f"questions must be >= 3 (a third per hop count), got {questions}")
    rng = random.Random(seed)
    ents = _entities(rng, entities)
    facts = _facts(rng, ents)
    n_distract = round(1.5 * entities) if distractors is None else int(distractors)
    if n_distract < 0:
        raise ValueError(f"distractors must be >= 0, got {distractors}")
    passages, main = _passages(rng, ents, facts, n_distract)
    qs = _split_questions(rng, _candidates(ents, facts, main), questions)
    return World(seed, ents, facts, passages, main, qs)


def write_world(out: str | os.PathLike, seed: int = 0, entities: int = 200, *, distractors: int | None = None,
                questions: int = 200) -> dict[str, Any]:
    """Writes ``out/corpus.jsonl`` (wiki-18), ``out/{train,test}.jsonl`` (QA JSONL) and ``out/world.json``
    (the entities, facts and counts); returns the summary."""
    w = make_world(seed, entities, distractors=distractors, questions=questions)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_passages(out / "corpus.jsonl", w.passages)
    for split, qs in w.questions.items():
        write_qa(out / f"{split}.jsonl", qs)
    summary = w.summary()
    world = {**summary, "format": "ecomax.agents_world/1",
             "entity_list": [dataclasses.asdict(e) for e in w.entities.values()],
             "fact_list": [[s, r, o] for (s, r), o in w.facts.items()],
             "main_passage": w.main_passage}
    (out / "world.json").write_text(json.dumps(world, indent=1, ensure_ascii=False))
    return summary
