"""Keyword extraction and keyword-list sampling for the self-prompt generator.

The paper samples 3 keywords from one RefinedWeb paragraph per list (lists from different paragraphs)
and excludes lists with stopwords or personal names (arXiv 2410.06961, Sec. 2.1 and App. C.1). It does
not say how; this module does it without any NLP dependency:

- Words: runs of letters (inner hyphens/apostrophes allowed), at least `min_word_length` letters.
  Words with digits, and the possessive "'s", never become keywords.
- Stopwords: a fixed English list (function words, pronouns, auxiliaries, number words, vague adverbs
  and adjectives such as "different" or "especially") plus the
  generic request verbs of instructions ("write", "explain", ...), which say what to do, not what about.
- Names: no NER model, so every word that looks like a proper noun in that paragraph is excluded —
  capitalised in mid-sentence ("... asked Maria ..."), written in capitals ("NASA"), or a
  capitalised sentence opener directly followed by another capitalised word ("Marie Curie ...").
  Place and brand names go too; a capitalised common word at a sentence start stays a candidate.
- Scoring (no lemmatiser): frequency in the paragraph x length (capped at 12 letters), so repeated,
  longer content words rank first; a plural is folded into its singular when both occur.
- Sampling: `per_list` keywords drawn uniformly from the paragraph's `top_k` best candidates, in a
  seeded random order (the generator must not learn that position means anything).
"""

from __future__ import annotations

import random
import re
from collections import Counter

STOPWORDS = frozenset(["a", "about", "above", "across", "after", "afterwards", "again", "against", "all", "almost", "alone", "along", "already", "also", "although", "always", "am", "among", "amongst", "an", "and", "another", "any", "anybody", "anyhow", "anyone", "anything", "anyway", "anywhere", "are", "aren't", "around", "as", "at", "away", "back", "be", "became", "because", "become", "becomes", "becoming", "been", "before", "beforehand", "behind", "being", "below", "beside", "besides", "between", "beyond", "both", "but", "by", "can", "cannot", "can't", "could", "couldn't", "did", "didn't", "do", "does", "doesn't", "doing", "done", "don't", "down", "during", "each", "either", "else", "elsewhere", "enough", "etc", "even", "ever", "every", "everybody", "everyone", "everything", "everywhere", "except", "few", "fewer", "for", "former", "formerly", "from", "further", "had", "hadn't", "has", "hasn't", "have", "haven't", "having", "he", "hence", "her", "here", "hereafter", "hereby", "herein", "hers", "herself", "him", "himself", "his", "how", "however", "i", "if", "in", "indeed", "instead", "into", "is", "isn't", "it", "its", "it's", "itself", "just", "last", "latter", "latterly", "least", "less", "let", "like", "likely", "made", "many", "may", "maybe", "me", "meanwhile", "might", "mine", "more", "moreover", "most", "mostly", "much", "must", "my", "myself", "namely", "neither", "never", "nevertheless", "next", "no", "nobody", "none", "noone", "nor", "not", "nothing", "now", "nowhere", "of", "off", "often", "on", "once", "one", "only", "onto", "or", "other", "others", "otherwise", "our", "ours", "ourselves", "out", "over", "own", "per", "perhaps", "quite", "rather", "really", "same", "seem", "seemed", "seeming", "seems", "several", "shall", "she", "should", "shouldn't", "since", "so", "some", "somebody", "somehow", "someone", "something", "sometime", "sometimes", "somewhat", "somewhere", "still", "such", "than", "that", "that's", "the", "their", "theirs", "them", "themselves", "then", "thence", "there", "thereafter", "thereby", "therefore", "therein", "thereupon", "these", "they", "thing", "things", "this", "those", "though", "through", "throughout", "thru", "thus", "to", "together", "too", "toward", "towards", "under", "until", "up", "upon", "us", "very", "via", "was", "wasn't", "we", "well", "were", "weren't", "what", "whatever", "when", "whence", "whenever", "where", "whereafter", "whereas", "whereby", "wherein", "whereupon", "wherever", "whether", "which", "while", "whither", "who", "whoever", "whole", "whom", "whose", "why", "will", "with", "within", "without", "won't", "would", "wouldn't", "yet", "you", "your", "yours", "yourself", "yourselves", "able", "actually", "already", "another", "become", "came", "come", "comes", "get", "gets", "getting", "give", "given", "gives", "go", "goes", "going", "gone", "got", "keep", "keeps", "kept", "know", "known", "make", "makes", "making", "many", "mean", "means", "often", "put", "puts", "say", "said", "says", "see", "seen", "take", "takes", "taken", "tell", "tells", "use", "used", "uses", "using", "want", "wants", "way", "ways", "went", "yes", "three", "four", "five", "seven", "eight", "nine", "twelve", "twenty", "thirty", "forty", "fifty", "hundred", "thousand", "million", "billion", "first", "second", "third", "fourth", "fifth", "half", "especially", "particularly", "usually", "generally", "probably", "certainly", "different", "various", "certain", "important", "large", "small", "long", "good", "better", "best", "great", "little"])

# Request verbs and fillers of instructions: they set the task type, not the topic of a keyword list.
INSTRUCTION_WORDS = frozenset(["answer", "briefly", "create", "describe", "detail", "detailed", "details", "develop", "discuss", "draft", "example", "examples", "explain", "following", "generate", "help", "identify", "include", "including", "list", "outline", "please", "provide", "question", "questions", "short", "simple", "suggest", "summarise", "summarize", "write", "writing"])

_WORD_RE = re.compile(r"[A-Za-z]+(?:['’-][A-Za-z]+)*")
# Characters that may sit between a sentence end and the next word (quotes, brackets, list markers).
_OPENERS = " \t\"'“”‘’([{*•#>-"
_SENTENCE_END = ".!?:;\n"


def _is_sentence_start(text: str, start: int) -> bool:
    before = text[:start].rstrip(_OPENERS)
    return not before or before[-1] in _SENTENCE_END


def _proper_nouns(text: str, words: list[re.Match]) -> set[str]:
    """Lower-cased words that look like names in this text (see the module docstring)."""
    names = set()
    for i, m in enumerate(words):
        w = m.group()
        if not w[0].isupper():
            continue
        if len(w) > 1 and w.isupper():
            names.add(w.lower())  # acronyms / all-caps names
        elif not _is_sentence_start(text, m.start()):
            names.add(w.lower())
        elif i + 1 < len(words):
            nxt = words[i + 1]
            # "Marie Curie studied ...": the opener belongs to a multi-word proper noun.
            if nxt.group()[0].isupper() and text[m.end():nxt.start()].strip() == "":
                names.add(w.lower())
    return names


def _base_form(word: str) -> str:
    return word[:-2] if word.endswith("'s") or word.endswith("’s") else word


def extract_keywords(text: str, min_word_length: int = 4) -> list[str]:
    """Candidate keywords of one paragraph, best first (lower-cased, no stopwords, no names)."""
    words = list(_WORD_RE.finditer(text))
    names = _proper_nouns(text, words)
    counts: Counter[str] = Counter()
    first_seen: dict[str, int] = {}
    for pos, m in enumerate(words):
        w = _base_form(m.group()).lower()
        letters = sum(ch.isalpha() for ch in w)
        if letters < min_word_length or w in STOPWORDS or w in INSTRUCTION_WORDS or w in names:
            continue
        counts[w] += 1
        first_seen.setdefault(w, pos)
    # Fold plurals into the singular when both occur ("plant", "plants" -> "plant").
    for w in list(counts):
        for suffix in ("es", "s"):
            stem = w[: -len(suffix)]
            if w.endswith(suffix) and stem in counts and stem != w:
                counts[stem] += counts.pop(w)
                first_seen[stem] = min(first_seen[stem], first_seen.pop(w))
                break
    return sorted(counts, key=lambda w: (-counts[w] * min(len(w), 12), first_seen[w]))


def sample_keywords(candidates: list[str], k: int, rng: random.Random, top_k: int) -> list[str] | None:
    """`k` distinct keywords drawn from the `top_k` best candidates, or None if there are fewer than k."""
    pool = candidates[:max(top_k, k)]
    if len(pool) < k:
        return None
    return rng.sample(pool, k)


def keyword_text(keywords: list[str] | tuple[str, ...]) -> str:
    """How a keyword list is written into the generator template and into the shards' `source` column."""
    return ", ".join(keywords)
