"""Regenerate the task data files in this folder from pinned packages (the ``taskdata`` extra).

Run from the repository root: ``python src/statelab/data/tasks/build_task_data.py``. The output is deterministic
for the pinned package versions; ``antonyms.tsv`` is written by hand and not touched here. Sources and licences
are listed in ``README.md`` beside this script.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import re
from pathlib import Path

import countryinfo
import pycountry
import wordfreq

HERE = Path(__file__).resolve().parent
ALPHA = re.compile(r"^[a-z]+$")
N_WORDS = 2000
N_NOUNS = 1000
N_VERBS = 500
MIN_FORM_ZIPF = 2.5  # an inflected form must itself be a word people use
MAX_ZIPF_DROP = 1.5
# frequent words left out of every table (profanity, slurs and violent words that word-frequency lists contain)
BLOCKED = {
    "shit",
    "fuck",
    "fucked",
    "fucking",
    "fucks",
    "damn",
    "bitch",
    "bitches",
    "ass",
    "asses",
    "crap",
    "dick",
    "cock",
    "piss",
    "pissed",
    "cunt",
    "porn",
    "sex",
    "sexy",
    "nigga",
    "nigger",
    "fag",
    "slut",
    "whore",
    "hell",
    "shits",
    "shitting",
    "dicks",
    "cocks",
    "tits",
    "boobs",
    "penis",
    "rape",
    "raped",
    "kill",
    "killed",
    "nude",
    "sexual",
    "murder",
    "murdered",
    "abuse",
    "abused",
    "suicide",
    "terrorist",
    "terrorists",
    "cocaine",
    "drugs",
}
# irregular plurals always in the noun table (written for statelab; they override the lexicon's first choice)
IRREGULAR_PLURALS = {
    "child": "children",
    "man": "men",
    "woman": "women",
    "person": "people",
    "mouse": "mice",
    "foot": "feet",
    "tooth": "teeth",
    "goose": "geese",
    "ox": "oxen",
    "leaf": "leaves",
    "knife": "knives",
    "wolf": "wolves",
    "life": "lives",
    "wife": "wives",
    "half": "halves",
    "shelf": "shelves",
    "sheep": "sheep",
    "fish": "fish",
    "deer": "deer",
    "cactus": "cacti",
    "crisis": "crises",
    "analysis": "analyses",
    "phenomenon": "phenomena",
    "criterion": "criteria",
    "thief": "thieves",
    "loaf": "loaves",
    "potato": "potatoes",
    "hero": "heroes",
}


def _lexicon() -> tuple[dict[str, str], dict[str, tuple[str, str, str]], set[str]]:
    """Lowercase lemmas of lemminflect's lookup table: noun -> plural, verb -> (past, gerund, 3rd person)."""
    # only the package's plain CSV table is read; lemminflect itself is not imported
    spec = importlib.util.find_spec("lemminflect")
    if spec is None or spec.origin is None:
        raise SystemExit("lemminflect is not installed: pip install -e '.[taskdata]'")
    path = Path(spec.origin).parent / "resources" / "infl_lu.csv.gz"
    nouns: dict[str, str] = {}
    verbs: dict[str, tuple[str, str, str]] = {}
    forms: set[str] = set()
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for row in csv.reader(fh):
            lemma, pos, *rest = row
            if not ALPHA.match(lemma):
                continue
            forms.add(lemma)
            for r in rest:
                forms.update(x for x in r.split("/") if ALPHA.match(x))
            if pos == "noun" and len(rest) == 1:
                first = rest[0].split("/")[0]  # the lexicon lists the usual plural first
                if ALPHA.match(first):
                    nouns[lemma] = first
            if pos == "verb" and len(rest) == 4:
                past, _participle, gerund, third = rest
                firsts = tuple(x.split("/")[0] for x in (past, gerund, third))
                if all(ALPHA.match(x) for x in firsts):
                    verbs[lemma] = firsts
    return nouns, verbs, forms


def build_words() -> None:
    nouns, verbs, forms = _lexicon()
    ranked = [w for w in wordfreq.top_n_list("en", 60000) if ALPHA.match(w) and w not in BLOCKED]
    words = [w for w in ranked if 3 <= len(w) <= 7 and w in forms][:N_WORDS]
    (HERE / "words.txt").write_text("\n".join(words) + "\n", encoding="utf-8")

    def zipf(form: str) -> float:
        return wordfreq.zipf_frequency(form, "en")

    def common(form: str, base: str) -> bool:
        # the inflected form must be used, and not be ~30x rarer than its base: that drops the lexicon's noun and
        # verb readings of function words and adjectives ("can" -> "cans", "up" -> "upped", "good" -> "goods")
        return zipf(form) >= MIN_FORM_ZIPF and zipf(form) >= zipf(base) - MAX_ZIPF_DROP

    # a plural equal to its singular is only kept for the hand-checked irregulars; a singular that is some other
    # noun's plural ("people", "means") and a plural shared by two singulars ("leaves") are dropped, so both
    # directions of the task have one answer per input
    nouns = {w: p for w, p in nouns.items() if p != w}
    nouns.update(IRREGULAR_PLURALS)
    plurals = set(nouns.values())
    noun_rows: list[tuple[str, str]] = []
    seen: set[str] = set()
    for w in ranked:
        if not (2 <= len(w) <= 9 and w in nouns and common(nouns[w], w)):
            continue
        if w in plurals and w not in IRREGULAR_PLURALS:
            continue
        if nouns[w] in seen:
            continue
        seen.add(nouns[w])
        noun_rows.append((w, nouns[w]))
    noun_rows = noun_rows[:N_NOUNS]
    listed = {w for w, _ in noun_rows} | {p for _, p in noun_rows}
    noun_rows += [(w, p) for w, p in IRREGULAR_PLURALS.items() if w not in listed and p not in listed]
    verb_rows = [(w, *verbs[w]) for w in ranked if 2 <= len(w) <= 9 and w in verbs and common(verbs[w][0], w)][:N_VERBS]
    with open(HERE / "nouns.tsv", "w", encoding="utf-8") as fh:
        fh.write("singular\tplural\n")
        fh.writelines("\t".join(r) + "\n" for r in noun_rows)
    with open(HERE / "verbs.tsv", "w", encoding="utf-8") as fh:
        fh.write("base\tpast\tgerund\tthird_person\n")
        fh.writelines("\t".join(r) + "\n" for r in verb_rows)


# states in the data that no longer exist (their capitals belong to current entries)
DISSOLVED = {"Serbia and Montenegro", "Antilles néerlandaises"}


def build_countries() -> None:
    cols = [
        "name",
        "capital",
        "currency",
        "region",
        "subregion",
        "demonym",
        "alpha2",
        "alpha3",
        "language",
        "german",
        "spanish",
        "french",
        "italian",
    ]
    rows = []
    seen_codes: set[str] = set()
    for path in sorted((Path(countryinfo.__file__).parent / "data").glob("*.json")):
        d = json.loads(path.read_text(encoding="utf-8"))
        iso = d.get("ISO") or {}
        if not d.get("name") or not d.get("capital") or not iso.get("alpha2") or d["name"] in DISSOLVED:
            continue
        # the first currency with a plain name ("Uruguay Peso en Unidades Indexadas (UI)" is an accounting unit)
        names = [pycountry.currencies.get(alpha_3=c) for c in d.get("currencies") or []]
        plain = [c.name for c in names if c is not None and "(" not in c.name]
        currency = plain[0] if plain else ""
        language = ""
        if d.get("languages"):
            lang = pycountry.languages.get(alpha_2=d["languages"][0])
            # "Modern Greek (1453-)" -> "Modern Greek", "Malay (macrolanguage)" -> "Malay"
            language = re.sub(r"\s*\(.*\)$", "", lang.name) if lang is not None else ""
        capital = d["capital"][0] if isinstance(d["capital"], list) else d["capital"]
        tr = d.get("translations") or {}
        if iso["alpha2"] in seen_codes:  # one row per ISO code (the data has the Vatican twice)
            continue
        seen_codes.add(iso["alpha2"])
        row = [
            d["name"],
            capital,
            currency,
            d.get("region", ""),
            d.get("subregion", ""),
            d.get("demonym", ""),
            iso["alpha2"],
            iso.get("alpha3", ""),
            language,
            tr.get("de", ""),
            tr.get("es", ""),
            tr.get("fr", ""),
            tr.get("it", ""),
        ]
        rows.append(["" if v is None else str(v).replace("\t", " ").strip() for v in row])
    rows.sort(key=lambda r: r[0])
    with open(HERE / "countries.tsv", "w", encoding="utf-8") as fh:
        fh.write("\t".join(cols) + "\n")
        fh.writelines("\t".join(r) + "\n" for r in rows)


if __name__ == "__main__":
    build_words()
    build_countries()
